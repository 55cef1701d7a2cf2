"""The conformance suite against every built-in backend (the mock without privileges, the others for real)
and the from-scratch example backend of docs/backends.md, plus backends broken on purpose: each check must
catch its fault."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from dummy_backend import DummyAttachment, DummyBackend, DummyNet, DummyPlugin

import asynctc
from asynctc import HookEntry, programs
from asynctc.backend import Backend
from asynctc.testing import CheckReport, SessionFactory, VethPair, check_backend, ip
from asynctc_mock import MockKernel

DEADLINE = 60  # seconds: no conformance run may hang the suite


async def run_check(backend: str | SessionFactory, **kwargs: Any) -> CheckReport:
    """check_backend under a deadline."""
    with trio.fail_after(DEADLINE):
        return await check_backend(backend, **kwargs)


ALL_CHECKS = ("placement", "update", "detach", "open_attachment", "errors", "session close", "reaping",
              "pin/adopt", "severing", "events")


async def test_mock_tcx() -> None:
    kernel = MockKernel()
    report = await run_check("mock", kernel=kernel, dev="eth0", program=kernel.program)
    assert report.backend == "mock"
    assert set(report.skipped) == {"pin/adopt", "severing", "events"}
    assert "no pin_dir given" in report.skipped["pin/adopt"]


async def test_mock_legacy_filters() -> None:
    kernel = MockKernel()
    await run_check("mock", kernel=kernel, dev="eth0", program=kernel.program, direction="egress",
                        mode="legacy")


@pytest.mark.parametrize("mode", ["tcx", "legacy"])
async def test_mock_every_check(mode: str) -> None:
    kernel = MockKernel()

    async def remove(dev: str) -> None:
        await trio.to_thread.run_sync(kernel.remove_device, dev)

    report = await run_check(lambda: asynctc.open_session("mock", kernel=kernel), dev="veth0",
                                 program=kernel.program, pin_dir="/sys/fs/bpf/atc", remove_device=remove,
                                 events=True, mode=mode)
    assert report.passed == ALL_CHECKS and not report.skipped and report.kernel_events


async def test_dummy_every_check() -> None:
    net = DummyNet()

    async def remove(dev: str) -> None:
        net.remove_device(dev)

    report = await run_check(lambda: asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()]),
                                 dev="dummy0", program=net.program, pin_dir="/pins", remove_device=remove,
                                 events=False)
    assert report.backend == "dummy"
    assert report.passed == ALL_CHECKS and not report.skipped and not report.kernel_events


async def test_dummy_by_name_and_events_unknown() -> None:
    """Name form with plugins=; events=None on a backend without an event source skips the events check."""
    net = DummyNet()

    async def remove(dev: str) -> None:
        net.remove_device(dev)

    report = await run_check("dummy", kernel=net, plugins=[DummyPlugin()], dev="dummy1", program=net.program,
                                 direction="egress", remove_device=remove)
    assert "severing" in report.passed
    assert "pass events=True or False" in report.skipped["events"]


@pytest.mark.kernel
async def test_bpf_link(veth: VethPair, bpffs: str) -> None:
    async def remove(dev: str) -> None:
        await trio.to_thread.run_sync(lambda: ip("link", "del", dev, netns=veth.netns_a))

    report = await run_check("bpf_link", netns=veth.netns_a, dev=veth.a, program=programs.constant,
                                 pin_dir=bpffs, remove_device=remove, events=True)
    assert report.passed == ALL_CHECKS and not report.skipped


@pytest.mark.kernel
async def test_netlink(veth: VethPair, bpffs: str) -> None:
    pytest.importorskip("asynctc_netlink", reason="the netlink backend is not installed")

    async def remove(dev: str) -> None:
        await trio.to_thread.run_sync(lambda: ip("link", "del", dev, netns=veth.netns_a))

    report = await run_check("netlink", netns=veth.netns_a, dev=veth.a, program=programs.constant,
                                 direction="egress", pin_dir=bpffs, remove_device=remove, events=True)
    assert report.passed == ALL_CHECKS and not report.skipped


# -- backends broken on purpose ---------------------------------------------------------------------------
class _Plugin:
    def __init__(self, cls: type[Backend[DummyAttachment]]) -> None:
        self.cls = cls

    @asynctc.hookimpl
    def asynctc_register_backends(self, registry: asynctc.BackendRegistry) -> None:
        registry.add(self.cls)


async def _check(cls: type[DummyBackend], **kwargs: object) -> CheckReport:
    net = DummyNet()

    async def remove(dev: str) -> None:
        net.remove_device(dev)

    return await run_check(lambda: asynctc.open_session(cls.name, kernel=net, plugins=[_Plugin(cls)]),
                               dev="dummy0", program=net.program, pin_dir="/pins", remove_device=remove,
                               **kwargs)


class CannotPin(DummyBackend):
    """Honest about pins: the base class's pin/unpin/adopt_pinned."""

    name = "dummy-nopin"
    pin = Backend.pin
    unpin = Backend.unpin
    adopt_pinned = Backend.adopt_pinned


async def test_a_backend_that_cannot_pin_is_skipped() -> None:
    report = await _check(CannotPin, events=False)
    assert "pin/adopt" not in report.passed
    assert "cannot pin" in report.skipped["pin/adopt"]
    assert "severing" in report.passed


class ReapsEverything(DummyBackend):
    name = "dummy-greedy-reaper"

    async def reap_orphans(self) -> tuple[HookEntry, ...]:
        """Removes every link, a live session's included (what reap_orphans must never do)."""
        removed = [HookEntry(link.program.id, link.program.name, link.program.tag, "tcx", link.link_id, None, None,
                             False) for links in self.net.hooks.values() for link in links]
        for links in self.net.hooks.values():
            links.clear()
        return tuple(removed)


class ForgetsPins(DummyBackend):
    name = "dummy-forgetful"

    async def adopt_pinned(self, path: str, *, foreign: bool = False) -> DummyAttachment | None:
        return None


class NeverSevered(DummyBackend):
    name = "dummy-blind"

    async def is_attached(self, att: DummyAttachment) -> bool:
        return True


class ClaimsEvents(DummyBackend):
    name = "dummy-claims-events"


@pytest.mark.parametrize(("cls", "kwargs", "check"), [
    (ReapsEverything, {}, "reaping"),
    (ForgetsPins, {}, "pin/adopt"),
    # fails whatever the timeout: it is never found severed
    (NeverSevered, {"sever_timeout": 1.0}, "severing"),
    # severing is found by polling (every second) well within the timeout; then no DeviceRemoved comes
    (ClaimsEvents, {"events": True, "sever_timeout": 5.0}, "events"),
])
async def test_each_check_catches_its_fault(cls: type[DummyBackend], kwargs: dict[str, object], check: str) -> None:
    with pytest.raises(AssertionError, match=f"check_backend: {check}: "):
        await _check(cls, **kwargs)


async def test_default_programs() -> None:
    """Without program=, the programs come from the session's in-memory kernel."""
    net = DummyNet()
    report = await run_check(lambda: asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()]),
                             dev="dummy1")
    assert "placement" in report.passed
    kernel = MockKernel()
    report = await run_check("mock", kernel=kernel, dev="eth0", direction="egress")
    assert "session close" in report.passed


@pytest.mark.kernel
async def test_default_programs_on_the_kernel(netns: str) -> None:
    """Without program= on the real kernel: asynctc.programs.constant."""
    report = await run_check("bpf_link", netns=netns, dev="lo")
    assert report.backend == "bpf_link" and "update" in report.passed


async def test_bad_arguments() -> None:
    net = DummyNet()

    def factory() -> SessionFactory:
        return lambda: asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()])

    with pytest.raises(TypeError, match="give netns=, kernel= and plugins= to the factory"):
        await run_check(factory(), kernel=net, dev="dummy0", program=net.program)
    with pytest.raises(TypeError, match="backend name or a session factory"):
        await run_check(42, dev="dummy0", program=net.program)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pin_dir must be an absolute"):
        await run_check(factory(), dev="dummy0", program=net.program, pin_dir="pins")
    with pytest.raises(TypeError, match="events must be True, False or None"):
        await run_check(factory(), dev="dummy0", program=net.program, events="yes")
    with pytest.raises(TypeError, match="remove_device must be an async callable"):
        await run_check(factory(), dev="dummy0", program=net.program, remove_device="dummy0")
    with pytest.raises(ValueError, match="sever_timeout must be > 0 seconds"):
        await run_check(factory(), dev="dummy0", program=net.program, sever_timeout=0)
    assert net.hooks == {}  # refused before anything was attached
