"""The real backends opened by name on a MockKernel (`open_session("bpf_link", kernel=...)`,
`open_session("netlink", kernel=...)`), end to end: attach, query, update, pin, adoption in a new session,
monitor events, severing, detach, and nothing left behind.

The devices have names the host does not have, in an order that gives them ifindexes the host uses for
other devices: a backend that asks the host's kernel anything instead of the session's shows here.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
from _mockutil import kernel_entries, qdiscs

import asynctc
from asynctc import After, Direction, First, State
from asynctc.events import AttachmentSevered, DeviceRemoved, FilterAdded, FilterRemoved
from asynctc_mock import MockKernel

IN = Direction.INGRESS
EG = Direction.EGRESS
DEVICES = ("lo", "mockdev0", "mockdev1")

pytestmark = pytest.mark.parametrize("backend", ["bpf_link", "netlink"])


def _kinds(hook: asynctc.Hook) -> list[tuple[str, int, bool]]:
    return [(e.kind, e.prog_id, e.owned) for e in hook.entries]


async def _events(mon: asynctc.Monitor, want: type, n: int) -> Sequence[object]:
    got: list[object] = []
    with trio.fail_after(10):
        async for ev in mon:
            if isinstance(ev, want):
                got.append(ev)
                if len(got) == n:
                    return got
    raise AssertionError(f"the monitor ended before {n} {want.__name__} events")


async def test_attach_query_update_detach(backend: str) -> None:
    kernel = MockKernel(devices=DEVICES)
    a, b, c = kernel.program("pass", name="a"), kernel.program("drop", name="b"), kernel.program("next", name="c")
    kind = "tcx" if backend == "bpf_link" else "cls_bpf"
    async with asynctc.open_session(backend, kernel=kernel) as s:
        assert s.backend_name == backend and s.kernel is kernel
        first = await s.attach("mockdev0", "ingress", a)
        assert (first.info.backend, first.info.dev, first.info.ifindex) == (backend, "mockdev0", 2)
        second = await s.attach("mockdev0", IN, c, position=First())
        third = await s.attach("mockdev0", IN, b, position=After(second))
        hook = await s.query("mockdev0", IN)
        assert _kinds(hook) == [(kind, c.id, True), (kind, b.id, True), (kind, a.id, True)]
        assert len(s.attachments) == 3
        if backend == "bpf_link":
            assert hook.revision == 4  # 1 on the empty hook, +1 per attach
            assert [e.link_id for e in hook.entries] == [x.info.link_id for x in (second, third, first)]
        # the kernel runs them in this order: c says next, b drops
        assert kernel.send("mockdev0", IN) == "drop"
        result = await third.update(a if backend == "netlink" else kernel.program("pass"), expected=b)
        assert result.method == ("link_update" if backend == "bpf_link" else "netlink_replace")
        assert kernel.send("mockdev0", IN) == "pass"
        with pytest.raises(asynctc.Conflict):
            await third.update(b, expected=b)
        await second.detach()
        await second.detach()  # idempotent
        assert second.state is State.DETACHED and len(s.attachments) == 2
        assert [e.prog_id for e in (await s.query("mockdev0", IN)).entries][-1] == a.id
        with pytest.raises(asynctc.DeviceNotFound):
            await s.attach("eth0", IN, a)  # the host's device, not the session's kernel's
    assert kernel_entries(kernel) == set() and qdiscs(kernel) == {}
    assert first.state is State.DETACHED


async def test_pin_close_and_adopt(backend: str) -> None:
    kernel = MockKernel(devices=DEVICES)
    prog = kernel.program("drop")
    async with asynctc.open_session(backend, kernel=kernel) as s1:
        att = await s1.attach("mockdev1", EG, prog)
        await att.pin("/sys/fs/bpf/p")
        assert att.info.pinned == "/sys/fs/bpf/p"
        gone = await s1.attach("mockdev0", EG, kernel.program())
    assert gone.state is State.DETACHED
    assert [e.prog_id for e in kernel.hook("mockdev0", EG).entries] == []
    async with asynctc.open_session(backend, kernel=kernel) as s2:
        hook = await s2.query("mockdev1", EG)
        assert [(e.prog_id, e.owned) for e in hook.entries] == [(prog.id, False)]
        again = await s2.adopt_pinned("/sys/fs/bpf/p")
        # the device's name comes from the session's kernel (ifindex 3 is another device on the host)
        assert (again.info.dev, again.info.ifindex, again.info.direction) == ("mockdev1", 3, EG)
        assert (again.info.prog_id, again.info.pinned, again.info.backend) == (prog.id, "/sys/fs/bpf/p", backend)
        assert [e.owned for e in (await s2.query("mockdev1", EG)).entries] == [True]
        assert kernel.send("mockdev1", EG) == "drop"
        await again.unpin()
        assert not again.pinned
    assert kernel_entries(kernel) == set() and kernel.pins() == {}


async def test_monitor_events_and_severing(backend: str) -> None:
    kernel = MockKernel(devices=DEVICES)
    async with asynctc.open_session(backend, kernel=kernel) as s, s.open_monitor() as mon:
        att = await s.attach("mockdev1", IN, kernel.program())
        if backend == "netlink":
            (added,) = await _events(mon, FilterAdded, 1)
            assert isinstance(added, FilterAdded) and (added.ifindex, added.direction, added.owned) == (3, IN, True)
            await att.detach()
            (removed,) = await _events(mon, FilterRemoved, 1)
            assert isinstance(removed, FilterRemoved) and removed.owned
            att = await s.attach("mockdev1", IN, kernel.program())
        kernel.remove_device("mockdev1")
        (severed,) = await _events(mon, AttachmentSevered, 1)
        assert isinstance(severed, AttachmentSevered) and severed.attachment is att
        await att.wait_severed()
        assert att.state is State.SEVERED and s.attachments == ()
        await att.detach()  # a no-op on a severed attachment
    assert kernel_entries(kernel) == set() and kernel.links() == ()


async def test_device_removed_event(backend: str) -> None:
    kernel = MockKernel(devices=DEVICES)
    async with asynctc.open_session(backend, kernel=kernel) as s, s.open_monitor() as mon:
        kernel.remove_device("mockdev0")
        (ev,) = await _events(mon, DeviceRemoved, 1)
        assert isinstance(ev, DeviceRemoved) and (ev.ifindex, ev.name) == (2, "mockdev0")
