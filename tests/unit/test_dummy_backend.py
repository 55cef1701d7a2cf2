"""The from-scratch example backend of docs/backends.md (docs/examples/dummy_backend.py): its own rules,
its errors (translated once with asynctc.from_errno), and living beside the mock, another in-memory backend.
The conformance suite runs against it in tests/conformance."""

from __future__ import annotations

import pytest
import trio
from dummy_backend import DummyNet, DummyPlugin

import asynctc
from asynctc import After, First

DEADLINE = 20


async def test_errors_are_asynctc_errors() -> None:
    net = DummyNet()
    with trio.fail_after(DEADLINE):
        async with asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()]) as session:
            p = net.program()
            att = await session.attach("dummy0", "ingress", p)
            with pytest.raises(asynctc.AlreadyAttached, match=r"link create on dummy0 ingress .*\[dummy backend\]"):
                await session.attach("dummy0", "ingress", p)
            with pytest.raises(asynctc.AnchorNotFound, match="not on this hook"):
                await session.attach("dummy0", "ingress", net.program(), position=After(12345))
            with pytest.raises(asynctc.DeviceNotFound, match="dummy9"):
                await session.attach("dummy9", "ingress", net.program())
            with pytest.raises(TypeError, match="takes no attach option 'priority'"):
                await session.attach("dummy0", "ingress", net.program(), priority=1)
            with pytest.raises(ValueError, match="not absolute"):
                await att.pin("relative/pin")
            await att.pin("/pins/a")
            other = await session.attach("dummy0", "ingress", net.program(), position=First())
            with pytest.raises(asynctc.PinError, match="already pinned at this path|is taken"):
                await other.pin("/pins/a")
            assert other.info.pinned is None and net.pins == {"/pins/a": att.info.link_id}
            await att.detach()  # a pinned attachment's pin goes with it
            assert net.pins == {}
            hook = await session.query("dummy0", "ingress")
            assert [(e.prog_id, e.owned) for e in hook.entries] == [(other.info.prog_id, True)]
            assert hook.revision is None


async def test_adopting_a_severed_pin() -> None:
    net = DummyNet()
    with trio.fail_after(DEADLINE):
        async with asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()]) as session:
            att = await session.attach("dummy1", "egress", net.program())
            await att.pin("/pins/b")
        net.remove_device("dummy1")
        async with asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()]) as session:
            with pytest.raises(asynctc.Severed, match="the pinned link was severed; its pin was removed"):
                await session.adopt_pinned("/pins/b")
            assert net.pins == {}


async def test_beside_the_mock() -> None:
    """A session of the dummy (kernel kind "mock", its own kernel) asks every in-memory backend in
    reap_orphans and adopt_pinned: the mock says it cannot work over a DummyNet and is left out (it used
    to raise TypeError from its constructor), and the dummy is left out of a mock session the same way."""
    net = DummyNet()
    with trio.fail_after(DEADLINE):
        async with asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()]) as session:
            probes = await session.probe()
            assert probes["dummy"].available
            assert not probes["mock"].available and "not a MockKernel" in probes["mock"].reason
            assert await session.reap_orphans() == ()
            with pytest.raises(asynctc.PinError, match="no backend recognised it"):
                await session.adopt_pinned("/pins/nothing")
        async with asynctc.open_session("mock", plugins=[DummyPlugin()]) as session:
            probes = await session.probe()
            assert not probes["dummy"].available and "not a DummyNet" in probes["dummy"].reason
            assert await session.reap_orphans() == ()


async def test_a_session_without_kernel_gets_a_fresh_network() -> None:
    with trio.fail_after(DEADLINE):
        async with asynctc.open_session("dummy", plugins=[DummyPlugin()]) as session:
            assert isinstance(session.kernel, DummyNet)
            assert (await session.resolve_device("dummy0"))[1] == "dummy0"
    with pytest.raises(TypeError, match="the bpf_link backend cannot run on .*DummyNet"):
        async with asynctc.open_session("bpf_link", kernel=DummyNet()):
            pass


def test_dummy_programs() -> None:
    net = DummyNet()
    p = net.program("drop")
    assert (p.name, p.type_name, p.closed, p.simulated) == ("dummy_drop", "SCHED_CLS", False, True)
    assert net.program().id != p.id
    with pytest.raises(asynctc.ProgramError, match="exists only in a DummyNet"):
        _ = p.fd
    p.close()
    with pytest.raises(asynctc.ProgramError, match="closed"):
        p.check_usable()
