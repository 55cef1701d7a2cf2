"""How a hook's legacy filters become query entries (asynctc.lowlevel.hook), without privileges: a recorded
kernel dump, scripted dumps (the parents asked for, the order kept), and what the core does with entries
that run no program (ownership marks, Hook.prog_ids, filter placement).

The real-kernel side of each rule is pinned in tests/integration/test_hook_truth.py."""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from asynctc import AnchorNotFound, DeviceNotFound, Direction, Hook, HookEntry
from asynctc._registry import AttachmentRecord, Registry
from asynctc._types import AttachmentInfo, Placement
from asynctc.backend import BackendAttachment
from asynctc.lowlevel import codec as c
from asynctc.lowlevel import hook as hooklib
from asynctc.lowlevel.tcpolicy import place_filter
from asynctc.lowlevel.transport import NetlinkError, NetlinkTransport

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "netlink"
IFX = 3


def fmsg(prio: int, handle: int, kind: str = "bpf", *, prog: int | None = None, parent: int = c.INGRESS_PARENT,
         ifindex: int = IFX, chain: int = 0, tag: str | None = None) -> c.FilterMsg:
    bpf = kind == "bpf"
    return c.FilterMsg(type=c.RTM_NEWTFILTER, seq=1, ifindex=ifindex, parent=parent, priority=prio,
                       protocol=c.ETH_P_ALL, handle=handle, kind=kind, chain=chain,
                       bpf_name="x" if bpf and handle else None, bpf_id=prog if bpf else None,
                       bpf_tag=tag if bpf else None)


class FakeRunner:
    """Runs a worker function inline (what NetnsRunner.run does in a thread)."""

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)


class FakeDumps:
    """A transport answering filter dumps from a script: parent -> messages (or an errno to raise)."""

    def __init__(self, by_parent: dict[int, list[c.Message] | int]) -> None:
        self.by_parent = by_parent
        self.asked: list[int] = []
        self.runner = FakeRunner()

    async def dump(self, build: Callable[[int], bytes], *, op: str = "dump") -> list[c.Message]:
        await trio.lowlevel.checkpoint()
        data = build(7)
        mtype, = struct.unpack_from("=H", data, 4)
        _family, ifindex, _handle, parent, _info = struct.unpack_from("=BxxxiIII", data, 16)
        assert (mtype, ifindex) == (c.RTM_GETTFILTER, IFX)
        self.asked.append(parent)
        got = self.by_parent.get(parent, [])
        if isinstance(got, int):
            raise NetlinkError(got, op)
        return list(got)


def nl(fake: FakeDumps) -> NetlinkTransport:
    return cast(NetlinkTransport, fake)


class Names(hooklib.ProgNameCache):
    """Program names by id without the kernel; records what was looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.looked_up: list[int] = []

    def get(self, prog_id: int) -> tuple[str, str]:
        self.looked_up.append(prog_id)
        return f"prog{prog_id}", f"tag{prog_id}"


# -- the dump's messages ---------------------------------------------------------------------------------


def test_a_recorded_dump_lists_cls_bpf_then_the_u32_key_only() -> None:
    """tests/fixtures/netlink/dump_filters_ingress.bin, recorded on the real kernel: a cls_bpf filter at
    priority 1, then `tc filter add ... prio 7 u32 match u32 0 0`, which the kernel dumps as its hash
    table (800:) and its key (800::800). One filter added, one entry: the key."""
    msgs = c.decode_messages((FIXTURES / "dump_filters_ingress.bin").read_bytes())
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    dumped = [(m.priority, m.handle) for m in msgs if isinstance(m, c.FilterMsg) and m.handle]
    assert dumped == [(1, 1), (7, 0x80000000), (7, 0x80000800)]  # the recording does hold the table
    filters = hooklib.hook_filters(msgs, manifest["ifindex"])
    entries = [hooklib.filter_entry(f, "x", "") for f in filters]
    assert entries == [
        HookEntry(manifest["prog_id"], "x", manifest["prog_tag"], "cls_bpf", None, 1, 1, False),
        HookEntry(0, "", "", "u32", None, 0x80000800, 7, False),
    ]
    assert [e.has_program for e in entries] == [True, False]
    # for priority choice the table is kept: a priority holding only a table is taken
    assert [(f.priority, f.handle) for f in hooklib.hook_filters(msgs, manifest["ifindex"], tables=True)] == [
        (1, 1), (7, 0x80000000), (7, 0x80000800)]


def test_hook_filters_keep_the_dump_order_and_any_parent_spelling() -> None:
    """The kernel dumps a priority's filters newest first, as it runs them: no re-sorting by handle. The
    parent a filter reports is the block's last spelling, so it selects nothing; heads (handle 0), other
    devices, other chains and u32 hash tables are left out."""
    msgs: list[c.Message] = [
        fmsg(5, 0),  # the head of priority 5
        fmsg(5, 2, prog=12, parent=0xFFFF0000),
        fmsg(5, 1, prog=11, parent=0xFFFFFFF1),
        fmsg(5, 3, prog=13, parent=0xFFFFFFF3),
        fmsg(6, 1, prog=21, chain=1),  # another chain: runs only when an action jumps there
        fmsg(6, 1, prog=31, ifindex=IFX + 1),
        fmsg(7, 0, "u32"),
        fmsg(7, 0x80000000, "u32"),
        fmsg(7, 0x80000800, "u32"),
        fmsg(8, 0x00100000, "u32"),  # a table made with `handle 1: u32 divisor 1`, no key: nothing to list
        c.NlDone(seq=1),
    ]
    got = [(f.priority, f.handle) for f in hooklib.hook_filters(msgs, IFX)]
    assert got == [(5, 2), (5, 1), (5, 3), (7, 0x80000800)]
    with_tables = [(f.priority, f.handle) for f in hooklib.hook_filters(msgs, IFX, tables=True)]
    assert with_tables == [(5, 2), (5, 1), (5, 3), (7, 0x80000000), (7, 0x80000800), (8, 0x00100000)]


def test_u32_tables_are_the_u32_nodes_with_node_id_0() -> None:
    assert [hooklib.is_u32_table(fmsg(7, h, "u32")) for h in (0x80000000, 0x00100000, 0x80100000)] == [True] * 3
    assert [hooklib.is_u32_table(fmsg(7, h, "u32")) for h in (0x80000800, 0x80000801, 0x80001800)] == [False] * 3
    assert not hooklib.is_u32_table(fmsg(7, 0x80000000, "bpf", prog=1))  # only u32 has tables


def test_filter_entry_of_each_kind() -> None:
    assert hooklib.filter_entry(fmsg(9, 4, prog=40, tag="abcd"), "name", "fromid") == HookEntry(
        40, "name", "abcd", "cls_bpf", None, 4, 9, False)
    assert hooklib.filter_entry(fmsg(9, 4, prog=40), "name", "fromid").prog_tag == "fromid"
    # cls_bpf running a classic BPF program: no eBPF program id, so no program
    assert hooklib.filter_entry(fmsg(9, 5, prog=None), "ignored", "ignored") == HookEntry(
        0, "", "", "cls_bpf", None, 5, 9, False)
    # any other classifier: its tc kind, no program, whatever names are passed
    assert hooklib.filter_entry(fmsg(3, 0x80000800, "u32"), "ignored", "ignored") == HookEntry(
        0, "", "", "u32", None, 0x80000800, 3, False)
    assert hooklib.filter_entry(fmsg(3, 1, "matchall")).kind == "matchall"


# -- which blocks are dumped ----------------------------------------------------------------------------


async def test_ingress_is_one_dump_of_the_ingress_block() -> None:
    fake = FakeDumps({c.INGRESS_PARENT: [fmsg(1, 2, prog=2), fmsg(1, 1, prog=1)]})
    got = await hooklib.dump_filters(nl(fake), IFX, Direction.INGRESS)
    assert [f.handle for f in got] == [2, 1]
    assert fake.asked == [c.INGRESS_PARENT]


async def test_dump_filters_keep_u32_tables_only_for_priority_choice() -> None:
    block: list[c.Message] = [fmsg(7, 0x80000000, "u32"), fmsg(7, 0x80000800, "u32"), fmsg(9, 0x00100000, "u32")]
    fake = FakeDumps({c.INGRESS_PARENT: block})
    assert [f.handle for f in await hooklib.dump_filters(nl(fake), IFX, Direction.INGRESS)] == [0x80000800]
    assert await hooklib.dump_filters(nl(fake), IFX, Direction.INGRESS, tables=True) == block


async def test_egress_of_clsact_is_checked_against_an_ingress_qdisc() -> None:
    """On clsact, a dump at ffff:fff1 finds no class: empty, so the egress filters stand."""
    egress: list[c.Message] = [fmsg(4, 1, prog=4, parent=c.EGRESS_PARENT),
                               fmsg(8, 0x80000800, "u32", parent=c.EGRESS_PARENT)]
    fake = FakeDumps({c.EGRESS_PARENT: egress, c.CLSACT_PARENT: []})
    assert await hooklib.dump_filters(nl(fake), IFX, Direction.EGRESS) == egress
    assert fake.asked == [c.EGRESS_PARENT, c.CLSACT_PARENT]


async def test_egress_under_an_ingress_qdisc_is_empty() -> None:
    """An `ingress` qdisc answers a dump at ffff:fff3 with its one block (the ingress hook's filters):
    found again at ffff:fff1, they are not egress filters."""
    block: list[c.Message] = [fmsg(4, 1, prog=4, parent=c.EGRESS_PARENT)]
    fake = FakeDumps({c.EGRESS_PARENT: block, c.CLSACT_PARENT: block})
    assert await hooklib.dump_filters(nl(fake), IFX, Direction.EGRESS) == []


async def test_an_empty_egress_hook_needs_one_dump() -> None:
    fake = FakeDumps({})
    assert await hooklib.dump_filters(nl(fake), IFX, Direction.EGRESS) == []
    assert fake.asked == [c.EGRESS_PARENT]


@pytest.mark.parametrize("direction", list(Direction))
async def test_a_device_gone_during_the_dump(direction: Direction) -> None:
    fake = FakeDumps({c.INGRESS_PARENT: errno.ENODEV, c.EGRESS_PARENT: errno.ENODEV})
    with pytest.raises(DeviceNotFound, match="veth9"):
        await hooklib.dump_filters(nl(fake), IFX, direction, dev="veth9")
    other = FakeDumps({c.INGRESS_PARENT: errno.EPERM, c.EGRESS_PARENT: errno.EPERM})
    with pytest.raises(NetlinkError):  # raw: the backend translates it
        await hooklib.dump_filters(nl(other), IFX, direction)


async def test_filter_entries_name_only_the_programs() -> None:
    names = Names()
    fake = FakeDumps({c.INGRESS_PARENT: [
        fmsg(2, 2, prog=22), fmsg(2, 1, prog=21), fmsg(7, 0x80000000, "u32"), fmsg(7, 0x80000800, "u32"),
        fmsg(9, 1, prog=22)]})
    entries = await hooklib.filter_entries(nl(fake), IFX, Direction.INGRESS, names)
    assert [(e.kind, e.prog_id, e.prog_name, e.priority, e.handle) for e in entries] == [
        ("cls_bpf", 22, "prog22", 2, 2), ("cls_bpf", 21, "prog21", 2, 1),
        ("u32", 0, "", 7, 0x80000800), ("cls_bpf", 22, "prog22", 9, 1)]
    assert sorted(set(names.looked_up)) == [21, 22]
    assert 0 not in names.looked_up


async def test_query_hook_puts_tcx_first_and_keeps_the_filters_order(monkeypatch: pytest.MonkeyPatch) -> None:
    tcx = [HookEntry(50, "t", "tt", "tcx", 7, None, None, False)]
    monkeypatch.setattr(hooklib, "tcx_entries", lambda ifindex, direction, names: (4, list(tcx)))
    filters = [HookEntry(0, "", "", "u32", None, 0x80000800, 1, False),
               HookEntry(60, "f", "ff", "cls_bpf", None, 1, 2, False)]

    async def lister(ifindex: int, direction: Direction) -> list[HookEntry]:
        return filters

    hook = await hooklib.query_hook(cast(Any, FakeRunner()), IFX, Direction.INGRESS, names=Names(),
                                    backend="test", filters=lister)
    assert hook == Hook(4, (*tcx, *filters))
    assert hook.prog_ids == (50, 60)  # entries without a program have no id to list


# -- the core with entries that run no program ----------------------------------------------------------


def _record(prio: int, handle: int) -> AttachmentRecord:
    info = AttachmentInfo(backend="netlink", netns=None, dev="veth0", ifindex=IFX, direction=Direction.INGRESS,
                          prog_id=70, link_id=None, handle=handle, priority=prio, offloaded=False, pinned=None)
    return AttachmentRecord(cast(Any, None), BackendAttachment(info), cast(Any, lambda rec: None))


def test_an_entry_without_a_program_is_never_owned() -> None:
    reg = Registry()
    reg.add(_record(7, 0x80000800))  # a slot of ours (as recorded) that a u32 filter now reports
    reg.add(_record(9, 1))
    entries = (HookEntry(0, "", "", "u32", None, 0x80000800, 7, False),
               HookEntry(0, "", "", "cls_bpf", None, 0x80000800, 7, False),  # classic BPF in that slot
               HookEntry(70, "p", "t", "cls_bpf", None, 1, 9, False),
               HookEntry(71, "q", "u", "cls_bpf", None, 2, 9, False))
    marked = reg.mark_owned(entries, IFX, Direction.INGRESS)
    assert [e.owned for e in marked] == [False, False, True, False]
    assert reg.mark_owned(marked, IFX, Direction.EGRESS) == entries


def test_u32_priorities_are_taken_and_u32_slots_are_no_anchors() -> None:
    slots = [(5, 1, "bpf", 50), (7, 0x80000000, "u32", None), (7, 0x80000800, "u32", None), (9, 1, "bpf", 90)]
    kw: dict[str, Any] = dict(dev="veth0", direction=Direction.INGRESS, backend="netlink")
    assert place_filter(Placement("after", prog_id=50), slots, **kw) == 6  # between 5 and the u32 at 7
    assert place_filter(Placement("before", prog_id=90), slots, **kw) == 8  # between the u32 at 7 and 9
    with pytest.raises(AnchorNotFound):
        place_filter(Placement("after", priority=7, handle=0x80000800), slots, **kw)
    with pytest.raises(AnchorNotFound):
        place_filter(Placement("before", prog_id=0), slots, **kw)
