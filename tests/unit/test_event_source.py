"""The netlink event source's filter bookkeeping (asynctc.lowlevel.events.NetlinkEventSource) with constructed
messages: a scripted multicast socket and a fake kernel that answers the baseline and resync dumps. No
privileges.

What the real kernel does (pinned by tests/integration/test_event_directions.py): on a legacy `ingress`
qdisc a filter message reports the parent as the request spelled it (`ffff:`, `ffff:fff1`, `ffff:fff2`,
`ffff:fff3`), a dump reports the spelling last used on the block, and a dump at any of them returns the one
block; on clsact only ffff:fff2 (ingress) and ffff:fff3 (egress) reach a block. A chain message names the
qdisc (`ffff:`), not the block. u32 dumps its hash table (`800:`) beside its key (`800::800`) but announces
only the key.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from asynctc import Direction
from asynctc.events import FilterAdded, FilterRemoved, KernelEvent, QdiscRemoved, Resynced
from asynctc.lowlevel import codec as c
from asynctc.lowlevel.events import NetlinkEventSource, hook_direction
from asynctc.lowlevel.multicast import EventsLost

IFX = 3
IN, EG = Direction.INGRESS, Direction.EGRESS
SPELLINGS = {"ffff:": 0xFFFF0000, "ffff:fff1": 0xFFFFFFF1, "ffff:fff2": 0xFFFFFFF2, "ffff:fff3": 0xFFFFFFF3}
U32_TABLE, U32_KEY = 0x80000000, 0x80000800


def flt(prio: int, handle: int = 1, *, parent: int = c.INGRESS_PARENT, kind: str = "bpf", prog: int | None = None,
        new: bool = True, ifindex: int = IFX, chain: int = 0) -> c.FilterMsg:
    bpf = kind == "bpf" and handle != 0
    return c.FilterMsg(type=c.RTM_NEWTFILTER if new else c.RTM_DELTFILTER, seq=0, ifindex=ifindex, parent=parent,
                       priority=prio, protocol=c.ETH_P_ALL, handle=handle, kind=kind, chain=chain,
                       bpf_name="f" if bpf else None, bpf_id=(prog if prog is not None else prio) if bpf else None)


def qdisc(kind: str, *, new: bool = True, ifindex: int = IFX, parent: int = c.CLSACT_PARENT,
          handle: int = c.CLSACT_HANDLE) -> c.QdiscMsg:
    return c.QdiscMsg(type=c.RTM_NEWQDISC if new else c.RTM_DELQDISC, seq=0, ifindex=ifindex, parent=parent,
                      handle=handle, kind=kind)


@dataclass
class FakeKernel:
    """What the dumps answer: one device, the qdisc in its ingress slot, and its blocks' filters as
    (priority, handle, kind, prog id). `reported` is the parent a dump reports for every filter of a block
    (an `ingress` qdisc's last spelling); on clsact a dump reports the block's own parent."""

    slot: str | None = None
    blocks: dict[Direction, list[tuple[int, int, str, int | None]]] = field(
        default_factory=lambda: {IN: [], EG: []})
    reported: int = c.INGRESS_PARENT
    filter_dumps: list[int] = field(default_factory=list)

    def answer(self, request: bytes) -> list[c.Message]:
        mtype = struct.unpack_from("=H", request, 4)[0]
        if mtype == c.RTM_GETLINK:
            return [c.LinkMsg(type=c.RTM_NEWLINK, seq=0, ifindex=IFX, name="veth0", flags=1)]
        if mtype == c.RTM_GETQDISC:
            return [] if self.slot is None else [qdisc(self.slot)]
        assert mtype == c.RTM_GETTFILTER
        ifindex, _handle, parent = struct.unpack_from("=iII", request, 16 + 4)
        assert ifindex == IFX
        self.filter_dumps.append(parent)
        if self.slot == "ingress":
            block, reported = IN, self.reported  # every minor of ffff: reaches the one block
        elif self.slot == "clsact" and parent in (c.INGRESS_PARENT, c.EGRESS_PARENT):
            block, reported = (IN if parent == c.INGRESS_PARENT else EG), parent
        else:
            return []
        out: list[c.Message] = []
        for prio, handle, kind, prog in self.blocks[block]:
            out.append(flt(prio, 0, parent=reported, kind=kind))  # the priority's classifier head
            out.append(flt(prio, handle, parent=reported, kind=kind, prog=prog))
        return out


class FakeTransport:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.runner = self

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    async def dump(self, make: Callable[[int], bytes], *, op: object = None) -> list[c.Message]:
        return self.kernel.answer(make(1))


class ScriptEnded(Exception):
    pass


class ScriptedEvents:
    """The multicast socket: each receive() returns the next batch, or raises EventsLost; ScriptEnded once
    the script is played."""

    def __init__(self) -> None:
        self.script: list[list[c.Message] | EventsLost] = []

    async def receive(self) -> list[c.Message]:
        if not self.script:
            raise ScriptEnded
        item = self.script.pop(0)
        if isinstance(item, EventsLost):
            raise item
        return item

    def drain(self) -> int:
        return 0


async def source_over(kernel: FakeKernel) -> tuple[NetlinkEventSource, ScriptedEvents]:
    mc = ScriptedEvents()
    src = NetlinkEventSource(cast(Any, mc), cast(Any, FakeTransport(kernel)))
    await src.baseline()
    return src, mc


async def events_of(src: NetlinkEventSource, mc: ScriptedEvents, *msgs: c.Message) -> list[KernelEvent | Resynced]:
    mc.script.append(list(msgs))
    out: list[KernelEvent | Resynced] = []
    try:
        while True:
            out.extend(await src.receive())
    except ScriptEnded:
        return out


async def resync(src: NetlinkEventSource, mc: ScriptedEvents) -> list[KernelEvent | Resynced]:
    mc.script.append(EventsLost())
    return await src.receive()


def sig(events: list[KernelEvent | Resynced]) -> list[tuple[str, Direction | None, int, int, int | None]]:
    out = []
    for e in events:
        assert isinstance(e, FilterAdded | FilterRemoved), e
        out.append((type(e).__name__, e.direction, e.priority, e.handle, e.prog_id))
    return out


# --------------------------------------------------------------------------------------------------------


def test_hook_direction_rules() -> None:
    for parent in SPELLINGS.values():
        assert hook_direction("ingress", parent) is IN
    assert hook_direction("ingress", 0x00010000) is None  # not a parent on the ingress qdisc
    for kind in ("clsact", None):
        assert hook_direction(kind, c.INGRESS_PARENT) is IN
        assert hook_direction(kind, c.EGRESS_PARENT) is EG
        assert hook_direction(kind, 0xFFFF0000) is None
        assert hook_direction(kind, 0xFFFFFFF1) is None


async def test_every_filter_of_an_ingress_qdisc_is_ingress_however_it_is_spelled() -> None:
    src, mc = await source_over(FakeKernel(slot="ingress"))
    spelled = list(SPELLINGS.values())
    added = await events_of(src, mc, *[flt(10 + i, parent=p) for i, p in enumerate(spelled)])
    assert sig(added) == [("FilterAdded", IN, 10 + i, 1, 10 + i) for i in range(4)]
    # each deleted with another spelling than it was added with: still the same filter
    deleted = await events_of(src, mc, *[flt(10 + i, parent=spelled[(i + 1) % 4], new=False) for i in range(4)])
    assert sig(deleted) == [("FilterRemoved", IN, 10 + i, 1, 10 + i) for i in range(4)]
    assert src.filters == {}
    # a replace reported with another spelling is the same filter: no second addition
    await events_of(src, mc, flt(20, parent=0xFFFF0000))
    assert await events_of(src, mc, flt(20, parent=c.EGRESS_PARENT)) == []
    # a whole priority deleted (handle 0) with yet another spelling
    assert sig(await events_of(src, mc, flt(20, 0, parent=0xFFFFFFF1, new=False))) == [
        ("FilterRemoved", IN, 20, 1, 20)]


async def test_clsact_parents_tell_the_hooks_apart() -> None:
    src, mc = await source_over(FakeKernel(slot="clsact"))
    added = await events_of(src, mc, flt(5, parent=c.INGRESS_PARENT), flt(5, parent=c.EGRESS_PARENT, prog=55))
    assert sig(added) == [("FilterAdded", IN, 5, 1, 5), ("FilterAdded", EG, 5, 1, 55)]
    # the egress priority flushed: the ingress filter at the same slot stays
    assert sig(await events_of(src, mc, flt(5, 0, parent=c.EGRESS_PARENT, new=False))) == [
        ("FilterRemoved", EG, 5, 1, 55)]
    assert list(src.filters) == [(IFX, IN, 0, 5, 1)]


async def test_a_filter_outside_the_hooks_has_no_direction_and_is_not_kept() -> None:
    src, mc = await source_over(FakeKernel(slot="ingress"))
    got = await events_of(src, mc, flt(1, parent=0x00010000, kind="u32", handle=U32_KEY))
    assert sig(got) == [("FilterAdded", None, 1, U32_KEY, None)]
    assert src.filters == {}
    assert sig(await events_of(src, mc, flt(1, parent=0x00010000, kind="u32", handle=U32_KEY, new=False))) == [
        ("FilterRemoved", None, 1, U32_KEY, None)]


async def test_the_baseline_of_an_ingress_qdisc_is_one_dump_and_ingress() -> None:
    kernel = FakeKernel(slot="ingress", reported=c.EGRESS_PARENT)  # last spelled ffff:fff3
    kernel.blocks[IN] = [(10, 1, "bpf", 100), (15, U32_TABLE, "u32", None), (15, U32_KEY, "u32", None)]
    src, mc = await source_over(kernel)
    assert len(kernel.filter_dumps) == 1  # one block: dumping it at ffff:fff3 as well would list it twice
    assert src.filters == {(IFX, IN, 0, 10, 1): ("bpf", 100), (IFX, IN, 0, 15, U32_KEY): ("u32", None)}
    # the key is deleted (the kernel's message names only the key; the table goes with the last key)
    assert sig(await events_of(src, mc, flt(15, U32_KEY, kind="u32", parent=0xFFFF0000, new=False))) == [
        ("FilterRemoved", IN, 15, U32_KEY, None)]


@pytest.mark.parametrize("slot", ["ingress", "clsact"])
async def test_a_resync_reports_no_spurious_changes(slot: str) -> None:
    kernel = FakeKernel(slot=slot, reported=0xFFFF0000)
    kernel.blocks[IN] = [(10, 1, "bpf", 100), (15, U32_TABLE, "u32", None), (15, U32_KEY, "u32", None)]
    src, mc = await source_over(kernel)
    added = await events_of(src, mc, flt(12, parent=c.INGRESS_PARENT if slot == "clsact" else 0xFFFFFFF1))
    kernel.blocks[IN].append((12, 1, "bpf", 12))
    kernel.reported = c.EGRESS_PARENT  # someone used ffff:fff3 on the ingress qdisc's block since
    assert sig(added) == [("FilterAdded", IN, 12, 1, 12)]
    assert await resync(src, mc) == [Resynced("the kernel dropped events (ENOBUFS)")]
    # a change missed during a loss is reported once, in its hook, and only it
    kernel.blocks[IN] = [(10, 1, "bpf", 100), (12, 1, "bpf", 12), (16, U32_TABLE, "u32", None),
                         (16, U32_KEY, "u32", None)]
    got = await resync(src, mc)
    assert isinstance(got[-1], Resynced)
    assert sig(got[:-1]) == [("FilterRemoved", IN, 15, U32_KEY, None), ("FilterAdded", IN, 16, U32_KEY, None)]


async def test_u32_hash_tables_are_no_filters() -> None:
    src, mc = await source_over(FakeKernel(slot="clsact"))
    # `tc filter add ... prio 9 handle 1: u32 divisor 1`: the kernel announces the table itself
    assert await events_of(src, mc, flt(9, 0x00100000, kind="u32")) == []
    assert await events_of(src, mc, flt(9, 0x00100000, kind="u32", new=False)) == []
    assert sig(await events_of(src, mc, flt(7, U32_KEY, kind="u32"))) == [("FilterAdded", IN, 7, U32_KEY, None)]
    assert list(src.filters) == [(IFX, IN, 0, 7, U32_KEY)]


async def test_chain_deletions() -> None:
    """A chain message names the qdisc (ffff:), not the block: under clsact it removes nothing (the kernel
    reports the flushed filters one by one); under an `ingress` qdisc its chain's filters are gone."""
    src, mc = await source_over(FakeKernel(slot="clsact"))
    await events_of(src, mc, flt(5, parent=c.INGRESS_PARENT), flt(6, parent=c.EGRESS_PARENT))
    chain_gone = c.ChainMsg(type=c.RTM_DELCHAIN, seq=0, ifindex=IFX, parent=0xFFFF0000, chain=0)
    assert await events_of(src, mc, chain_gone) == []
    assert len(src.filters) == 2

    src, mc = await source_over(FakeKernel(slot="ingress"))
    await events_of(src, mc, flt(5, parent=0xFFFF0000), flt(6, parent=c.EGRESS_PARENT))
    assert sig(await events_of(src, mc, chain_gone)) == [("FilterRemoved", IN, 5, 1, 5), ("FilterRemoved", IN, 6, 1, 6)]


async def test_the_slot_follows_the_qdisc_events() -> None:
    src, mc = await source_over(FakeKernel(slot=None))
    await events_of(src, mc, qdisc("ingress"))
    assert sig(await events_of(src, mc, flt(5, parent=c.EGRESS_PARENT))) == [("FilterAdded", IN, 5, 1, 5)]
    # a stale deletion of another kind in the slot changes nothing
    assert await events_of(src, mc, qdisc("clsact", new=False)) == []
    got = await events_of(src, mc, qdisc("ingress", new=False))
    assert sig(got[:-1]) == [("FilterRemoved", IN, 5, 1, 5)]
    assert isinstance(got[-1], QdiscRemoved) and got[-1].kind == "ingress"
    await events_of(src, mc, qdisc("clsact"))
    assert sig(await events_of(src, mc, flt(5, parent=c.EGRESS_PARENT))) == [("FilterAdded", EG, 5, 1, 5)]
    assert src.slot_kind(IFX) == "clsact"
