"""The plugin system: hook validation, backend registration and selection, lifecycle observers, and a
third-party backend package discovered through its entry point."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import threading
from collections.abc import Generator, Mapping
from pathlib import Path

import pytest
import trio
from _children import run as run_child

import asynctc
from asynctc import events
from asynctc._plugins import (
    BackendRegistry,
    PluginError,
    PluginLoadWarning,
    collect_backends,
    load_plugins,
    make_plugin_manager,
    notify,
)
from asynctc.hookspecs import BackendRequest
from asynctc_mock import MockBackend, MockKernel

FIXTURES = Path(__file__).parent.parent / "fixtures"


def test_async_hook_implementations_are_rejected() -> None:
    class AsyncPlugin:
        @asynctc.hookimpl
        async def asynctc_register_backends(self, registry: BackendRegistry) -> None:
            pass

    with pytest.raises(PluginError, match="async def.*synchronous"):
        make_plugin_manager(entry_points=False, plugins=[AsyncPlugin()])


def test_unknown_hooks_are_rejected() -> None:
    class Typo:
        @asynctc.hookimpl
        def asynctc_register_backend(self, registry: BackendRegistry) -> None:  # missing "s"
            pass

    with pytest.raises(PluginError, match="unknown hook"):
        make_plugin_manager(entry_points=False, plugins=[Typo()])


def test_registry_rejects_bad_classes_and_duplicates() -> None:
    reg = BackendRegistry()
    with pytest.raises(PluginError, match="not a subclass"):
        reg.add(object)  # type: ignore[arg-type]
    reg.add(MockBackend)

    class Other(MockBackend):
        name = "mock"

    with pytest.raises(PluginError, match="two plugins register a backend named 'mock'"):
        reg.add(Other)
    with pytest.raises(asynctc.BackendUnavailable, match="no backend named 'nope'.*installed: mock"):
        reg.get("nope")


async def test_unknown_backend_name_says_what_is_installed() -> None:
    with pytest.raises(asynctc.BackendUnavailable, match="no backend named 'nope'.*mock"):
        async with asynctc.open_session("nope"):
            pass


def test_default_selection_prefers_bpf_link_and_netlink_for_offload() -> None:
    pm = make_plugin_manager(entry_points=False)
    ok, no = asynctc.Probe(True, "ok"), asynctc.Probe(False, "no")

    def pick(offload: str, available: Mapping[str, asynctc.Probe]) -> str | None:
        req = BackendRequest(requested="auto", purpose="attach", offload=offload, netns=None)  # type: ignore[arg-type]
        result: str | None = pm.hook.asynctc_select_backend(request=req, available=available)
        return result

    assert pick("never", {"bpf_link": ok, "netlink": ok}) == "bpf_link"
    assert pick("never", {"bpf_link": no, "netlink": ok}) == "netlink"
    assert pick("prefer", {"bpf_link": ok, "netlink": ok}) == "netlink"
    assert pick("require", {"bpf_link": ok, "netlink": no}) == "bpf_link"
    assert pick("never", {"bpf_link": no, "netlink": no}) is None


async def test_a_selection_plugin_overrides_the_default() -> None:
    asked: list[BackendRequest] = []

    class PreferMock:
        @asynctc.hookimpl
        def asynctc_select_backend(self, request: BackendRequest) -> str | None:  # fewer args than the spec
            asked.append(request)
            return "mock"

    async with asynctc.open_session(plugins=[PreferMock()]) as s:
        assert s.backend_name == "mock"
    assert asked and asked[0].purpose == "session" and asked[0].requested == "auto"


class _Recorder:
    """Hook implementations of every kind pluggy offers, each appending what it saw to `calls`."""

    def __init__(self, calls: list[str], tag: str) -> None:
        self.calls, self.tag = calls, tag


def _plain(calls: list[str], tag: str, *, tryfirst: bool = False, trylast: bool = False) -> object:
    class Plain(_Recorder):
        @asynctc.hookimpl(tryfirst=tryfirst, trylast=trylast)
        def asynctc_attachment_event(self, event: events.AttachmentEvent) -> None:
            self.calls.append(self.tag)

    return Plain(calls, tag)


class _Wrapper(_Recorder):
    @asynctc.hookimpl(wrapper=True)
    def asynctc_attachment_event(self, event: events.AttachmentEvent) -> Generator[None, None, None]:
        self.calls.append(f"{self.tag}-before")
        try:
            yield
        except Exception as exc:
            self.calls.append(f"{self.tag}-saw {exc}")
            raise
        self.calls.append(f"{self.tag}-after")


class _OldStyleWrapper(_Recorder):
    @asynctc.hookimpl(hookwrapper=True)
    def asynctc_attachment_event(self, event: events.AttachmentEvent) -> Generator[None, object, None]:
        self.calls.append(f"{self.tag}-before")
        yield
        self.calls.append(f"{self.tag}-after")


async def test_observer_hooks_run_in_pluggys_documented_order() -> None:
    """Wrappers around everything, tryfirst before the rest, the rest in LIFO registration order, trylast
    at the end: asynctc calls the hook through pluggy, not its implementations one by one."""
    calls: list[str] = []
    plugins = [
        _plain(calls, "A"), _plain(calls, "B"), _plain(calls, "T-tryfirst", tryfirst=True),
        _Wrapper(calls, "W"),
    ]
    kernel = MockKernel()
    async with asynctc.open_session("mock", kernel=kernel, plugins=plugins) as s:
        await s.attach("eth0", "ingress", kernel.program())
    assert calls[:5] == ["W-before", "T-tryfirst", "B", "A", "W-after"]

    calls.clear()
    pm = make_plugin_manager(entry_points=False, plugins=[
        _plain(calls, "L-trylast", trylast=True), _plain(calls, "A"), _Wrapper(calls, "W"),
        _OldStyleWrapper(calls, "H"), _plain(calls, "B"),
    ])
    notify(pm, object())
    assert calls == ["H-before", "W-before", "B", "A", "L-trylast", "W-after", "H-after"]


async def test_attachment_events_reach_observers_and_a_failing_observer_is_harmless(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing observer ends that hook call as pluggy documents (wrappers see its exception, the
    implementations after it miss that event); the exception is logged and the lifecycle goes on."""
    seen: list[tuple[str, int, str | None]] = []
    wrapped: list[str] = []

    class Observer:
        @asynctc.hookimpl
        def asynctc_attachment_event(self, event: events.AttachmentEvent) -> None:
            seen.append((event.kind, event.info.prog_id, event.method))

    class Broken:
        @asynctc.hookimpl
        def asynctc_attachment_event(self, event: events.AttachmentEvent) -> None:
            raise RuntimeError("observer bug")

    kernel = MockKernel()
    p1, p2, p3 = kernel.program("pass"), kernel.program("pass"), kernel.program("pass")
    # Registered last, Observer is called first (LIFO); Broken then raises in every call.
    plugins = [Broken(), Observer(), _Wrapper(wrapped, "W")]
    with caplog.at_level(logging.ERROR, logger="asynctc"):
        async with asynctc.open_session("mock", kernel=kernel, plugins=plugins) as s:
            a = await s.attach("eth0", "ingress", p1)
            await a.update(p2)
            await a.detach()
            b = await s.attach("veth0", "egress", p3)
            await trio.to_thread.run_sync(kernel.remove_device, "veth0")
            with trio.fail_after(10):
                await b.wait_severed()
            assert a.state is asynctc.State.DETACHED
    assert seen == [
        ("attach", p1.id, None), ("update", p2.id, "link_update"), ("detach", p2.id, None),
        ("attach", p3.id, None), ("sever", p3.id, None),
    ]
    assert wrapped == ["W-before", "W-saw observer bug"] * 5
    assert caplog.text.count("observer bug") >= 5
    assert "asynctc_attachment_event implementation raised" in caplog.text


async def test_an_observer_registered_after_the_session_opened_sees_the_events_from_then_on() -> None:
    """With no observer the lifecycle builds no event; the hook is asked at every event, so an observer
    registered on the process-wide plugin manager while a session runs is called from its first event on."""
    seen: list[str] = []
    kernel = MockKernel()
    pm = make_plugin_manager()  # the installed backends, as the process-wide manager has them
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("asynctc._plugins._default_pm", pm)
        async with asynctc.open_session("mock", kernel=kernel) as s:
            unseen = await s.attach("eth0", "ingress", kernel.program())
            pm.register(_plain(seen, "late"))
            seen_att = await s.attach("veth0", "ingress", kernel.program())
            await unseen.detach()
            await seen_att.detach()
    assert seen == ["late"] * 3


def _install_distribution(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Install a distribution the way pip leaves one in site-packages: its modules and a .dist-info with
    METADATA and entry_points.txt (importlib.metadata finds it on sys.path)."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[asynctc]\n{lines}")
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))


async def test_a_broken_or_async_entry_point_plugin_is_reported_and_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_distribution(
        tmp_path, "asynctc-broken-plugins",
        {"fails_to_import": "asynctc_test_fails_to_import", "async_hook": "asynctc_test_async_hook"},
        {
            "asynctc_test_fails_to_import": "raise ImportError('needs libfoo, which is not installed')\n",
            "asynctc_test_async_hook": """
                import asynctc

                @asynctc.hookimpl
                async def asynctc_attachment_event(event):
                    pass
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginLoadWarning) as record:
        pm = make_plugin_manager()
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2, messages
    assert "'async_hook'" in messages[0] and "'asynctc-broken-plugins'" in messages[0]
    assert "async def" in messages[0] and "is malformed" in messages[0]
    assert "'fails_to_import'" in messages[1] and "'asynctc-broken-plugins'" in messages[1]
    assert "needs libfoo" in messages[1] and "could not be imported" in messages[1]
    assert pm.get_plugin("async_hook") is None and pm.get_plugin("fails_to_import") is None
    assert {"mock", "netlink", "bpf_link"} <= set(collect_backends(pm).names())

    # Sessions still open: the broken distribution is reported again and left out again.
    class Noop:
        @asynctc.hookimpl
        def asynctc_attachment_event(self, event: events.AttachmentEvent) -> None:
            pass

    with pytest.warns(PluginLoadWarning, match="asynctc-broken-plugins"):
        async with asynctc.open_session("mock", plugins=[Noop()]) as s:
            assert s.backend_name == "mock"


async def test_plugins_are_imported_in_a_worker_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing plugins (and their dependencies) takes tens of milliseconds: never on the trio thread."""
    _install_distribution(
        tmp_path, "asynctc-thread-probe", {"thread_probe": "asynctc_test_thread_probe"},
        {"asynctc_test_thread_probe": "import threading\nIMPORTED_IN = threading.get_ident()\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "asynctc_test_thread_probe", raising=False)

    class Noop:
        @asynctc.hookimpl
        def asynctc_attachment_event(self, event: events.AttachmentEvent) -> None:
            pass

    pm, registry = await load_plugins([Noop()])
    assert pm.get_plugin("thread_probe") is not None and "mock" in registry
    assert threading.get_ident() != sys.modules["asynctc_test_thread_probe"].IMPORTED_IN
    default, default_registry = await load_plugins()
    assert (default, default_registry) == await load_plugins()  # built once per process


@pytest.mark.timeout(120)  # a pip install, then a fresh interpreter: two children of up to 50 and 30 s
def test_a_third_party_backend_package_is_discovered_by_its_entry_point(tmp_path: Path) -> None:
    """Install tests/fixtures/example_backend (its own pyproject, entry point "example") into a private
    directory and select the backend by name in a fresh interpreter."""
    target = tmp_path / "site"
    proc = run_child(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(FIXTURES / "example_backend")],
        timeout=50,
    )
    if proc.returncode != 0:
        pytest.fail(f"installing the example backend failed:\n{proc.stdout}\n{proc.stderr}")
    code = textwrap.dedent("""
        import trio, asynctc
        from asynctc.testing import check_backend
        import asynctc_example

        async def main():
            async with asynctc.open_session("example") as s:
                print("backend", s.backend_name)
                probes = await s.probe()
                print("probed", probes["example"].available)
                async with s.open_attachment("eth0", "ingress", s.kernel.program("pass")):
                    pass
            print("ops", asynctc_example.OPERATIONS)
            from asynctc_mock import MockKernel
            k = MockKernel()
            await check_backend("example", kernel=k, dev="eth0", program=k.program)
            print("conformance ok")

        trio.run(main)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    run = run_child([sys.executable, "-c", code], env=env)
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    assert out[:3] == ["backend example", "probed True", "ops ['attach eth0 ingress', 'detach eth0 ingress']"]
    assert out[3] == "conformance ok"


def test_the_public_api_contract_names_exist() -> None:
    for name in [
        "open_session", "Session", "Attachment", "AttachmentInfo", "Program", "programs", "events", "Direction",
        "State", "First", "Last", "Before", "After", "Hook", "HookEntry", "UpdateResult", "Probe", "TCError",
        "DeviceNotFound", "ProgramError", "PermissionDenied", "AlreadyAttached", "StaleRevision", "HookFull",
        "Conflict", "Severed", "NotOwned", "BackendUnavailable", "OffloadError", "hookimpl",
    ]:
        assert hasattr(asynctc, name), name
    for name in ["DeviceAdded", "DeviceRemoved", "QdiscAdded", "QdiscRemoved", "FilterAdded", "FilterRemoved",
                 "AttachmentSevered", "Resynced"]:
        assert hasattr(asynctc.events, name), name
    for method in ["attach", "open_attachment", "query", "open_monitor", "adopt_pinned", "probe", "reap_orphans"]:
        assert callable(getattr(asynctc.Session, method)), method
    for method in ["update", "pin", "unpin", "detach", "wait_severed"]:
        assert callable(getattr(asynctc.Attachment, method)), method
    for ctor in ["from_fd", "from_pinned", "from_id"]:
        assert callable(getattr(asynctc.Program, ctor)), ctor
    assert callable(asynctc.programs.constant) and callable(asynctc.programs.counting)
    for err in ["DeviceNotFound", "ProgramError", "PermissionDenied", "AlreadyAttached", "StaleRevision",
                "HookFull", "Conflict", "Severed", "NotOwned", "BackendUnavailable", "OffloadError"]:
        assert issubclass(getattr(asynctc, err), asynctc.TCError), err


async def test_a_session_runs_on_one_kernel() -> None:
    """The real backends run on the session's MockKernel; the mock never joins a real-kernel session."""

    class PickMockForAttaches:
        @asynctc.hookimpl
        def asynctc_select_backend(self, request: BackendRequest) -> str | None:
            return "mock" if request.purpose == "attach" else None

    kernel = MockKernel()
    async with asynctc.open_session("mock", kernel=kernel) as s:
        att = await s.attach("eth0", "ingress", kernel.program("drop"), backend="bpf_link")
        assert att.info.backend == "bpf_link" and att.info.link_id is not None
        assert kernel.send("eth0", "ingress") == "drop"
    assert kernel.send("eth0", "ingress") == "pass"
    if not (await_probe_real()):
        pytest.skip("needs a real-kernel backend (root) for the other direction")
    async with asynctc.open_session(plugins=[PickMockForAttaches()]) as s:
        with pytest.raises(asynctc.TCError, match="runs on a MockKernel, this session on the real kernel"):
            await s.attach("lo", "ingress", kernel.program(), backend="mock")


def await_probe_real() -> bool:
    from asynctc.testing import can_run_kernel_tests

    return can_run_kernel_tests()
