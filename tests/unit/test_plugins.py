"""The plugin system: hook validation, backend registration and selection, lifecycle observers, and a
third-party backend package discovered through its entry point."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
from _children import run as run_child

import asynctc
from asynctc import events
from asynctc._plugins import BackendRegistry, PluginError, make_plugin_manager
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


async def test_attachment_events_reach_observers_and_a_failing_observer_is_harmless(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[str, int, str | None]] = []

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
    async with asynctc.open_session("mock", kernel=kernel, plugins=[Observer(), Broken()]) as s:
        a = await s.attach("eth0", "ingress", p1)
        await a.update(p2)
        await a.detach()
        b = await s.attach("veth0", "egress", p3)
        await trio.to_thread.run_sync(kernel.remove_device, "veth0")
        with trio.fail_after(10):
            await b.wait_severed()
    assert seen == [
        ("attach", p1.id, None), ("update", p2.id, "link_update"), ("detach", p2.id, None),
        ("attach", p3.id, None), ("sever", p3.id, None),
    ]
    assert "observer bug" in caplog.text


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


async def test_a_session_never_mixes_kernel_kinds() -> None:
    class PickMockForAttaches:
        @asynctc.hookimpl
        def asynctc_select_backend(self, request: BackendRequest) -> str | None:
            return "mock" if request.purpose == "attach" else None

    kernel = MockKernel()
    async with asynctc.open_session("mock", kernel=kernel) as s:
        with pytest.raises(asynctc.TCError, match="needs the real kernel"):
            await s.attach("eth0", "ingress", kernel.program(), backend="bpf_link")
        assert s.attachments == ()
    if not (await_probe_real()):
        pytest.skip("needs a real-kernel backend (root) for the other direction")
    async with asynctc.open_session(plugins=[PickMockForAttaches()]) as s:
        with pytest.raises(asynctc.TCError, match="in-memory"):
            await s.attach("lo", "ingress", kernel.program(), backend="mock")


def await_probe_real() -> bool:
    from asynctc.testing import can_run_kernel_tests

    return can_run_kernel_tests()
