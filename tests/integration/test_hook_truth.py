"""`Session.query` lists a hook as the kernel runs it, on the real kernel: proven with counting programs and
real frames over a veth pair (BPF_PROG_TEST_RUN cannot show run order), one fresh namespace pair per test.

- within one priority the newest filter runs first, and query lists it first;
- filters on a legacy `ingress` qdisc run on the ingress hook whatever their parent was spelled (`ffff:`,
  `ffff:fff1`, `ffff:fff2`) and are listed there, not on egress;
- u32 filters are listed with kind "u32" and no program, and one with a classid keeps the packets it
  matches from the cls_bpf filters behind it.

Foreign filters are made with `tc` or with asynctc's codec over a raw transport, never through a session.
"""

from __future__ import annotations

import json

import pytest
import trio
from _netlinkutil import raw_netlink

import asynctc
from asynctc import programs
from asynctc.lowlevel import codec
from asynctc.testing import VethPair, ip, send_frames, tc

pytestmark = pytest.mark.kernel

BACKENDS = ["bpf_link", "netlink"]
INGRESS_QDISC_SPELLINGS = {"ffff:": 0xFFFF0000, "ffff:fff1": 0xFFFFFFF1, "ffff:fff2": 0xFFFFFFF2}


async def frames(veth: VethPair, count: int) -> None:
    """Send frames from the peer end: they cross veth0's ingress hook."""
    await trio.to_thread.run_sync(lambda: send_frames(veth.b, count, netns=veth.netns_b))




def ifindex_of(netns: str, dev: str) -> int:
    return int(json.loads(ip("-j", "link", "show", "dev", dev, netns=netns).stdout)[0]["ifindex"])


async def add_bpf_filter(netns: str, dev: str, parent: int, prio: int, handle: int, prog: asynctc.Program) -> None:
    """A foreign cls_bpf filter (direct action) at exactly `parent` as spelled, made without a session."""
    ifx = ifindex_of(netns, dev)
    flags = codec.NLM_F_REQUEST | codec.NLM_F_ACK | codec.NLM_F_CREATE | codec.NLM_F_EXCL
    async with raw_netlink(netns) as nl:
        await nl.request(lambda seq: codec.encode_filter(seq, codec.RTM_NEWTFILTER, flags, ifx, parent, prio, handle,
                                                         prog_fd=prog.fd, name="foreign"), op="filter_add")


async def dumped_parents(netns: str, dev: str, parent: int) -> set[int]:
    """The parents a raw filter dump at `parent` reports (per-priority heads left out)."""
    ifx = ifindex_of(netns, dev)
    async with raw_netlink(netns) as nl:
        msgs = await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETTFILTER, ifx, parent))
    return {m.parent for m in msgs if isinstance(m, codec.FilterMsg) and m.handle != 0}


def rows(hook: asynctc.Hook) -> list[tuple[str, int, int | None, int | None, bool]]:
    return [(e.kind, e.prog_id, e.priority, e.handle, e.owned) for e in hook.entries]


# --------------------------------------------------------------------------------------------------------


async def test_same_priority_filters_run_and_are_listed_newest_first(veth: VethPair) -> None:
    """Three filters at one priority, added with handles 3, 1, 2: the kernel runs 2, 1, 3 (newest first),
    and query lists them so, after the tcx program that runs before every filter. Each filter drops
    what it sees, so only the first to run counts; detaching it hands the packets to the next one."""
    ns = veth.netns_a
    async with asynctc.open_session("bpf_link", netns=ns) as s:
        t_prog = programs.counting("next")
        await s.attach("veth0", "ingress", t_prog)
        progs = {h: programs.counting("drop") for h in (3, 1, 2)}
        atts = {h: await s.attach("veth0", "ingress", p, backend="netlink", priority=10, handle=h)
                for h, p in progs.items()}
        hook = await s.query("veth0", "ingress")
        assert rows(hook) == [("tcx", t_prog.id, None, None, True)] + [
            ("cls_bpf", progs[h].id, 10, h, True) for h in (2, 1, 3)]
        # another session sees the same order, nothing of it owned
        async with asynctc.open_session("netlink", netns=ns) as other:
            assert [(e.kind, e.prog_id, e.handle) for e in (await other.query("veth0", "ingress")).entries] == [
                (e.kind, e.prog_id, e.handle) for e in hook.entries]

        sent = 0
        for h in (2, 1, 3):
            listed = [e.handle for e in (await s.query("veth0", "ingress")).entries if e.kind == "cls_bpf"]
            assert listed[0] == h
            before = {k: p.count() for k, p in progs.items()}
            await frames(veth, 3)
            sent += 3
            assert {k: p.count() - before[k] for k, p in progs.items()} == {k: 3 if k == h else 0 for k in progs}
            assert t_prog.count() == sent  # the tcx program saw every frame first
            await atts[h].detach()
        assert rows(await s.query("veth0", "ingress")) == [("tcx", t_prog.id, None, None, True)]


@pytest.mark.parametrize("spelling", sorted(INGRESS_QDISC_SPELLINGS))
@pytest.mark.parametrize("backend", BACKENDS)
async def test_ingress_qdisc_filters_are_listed_however_their_parent_was_spelled(
    veth: VethPair, backend: str, spelling: str
) -> None:
    ns = veth.netns_a
    parent = INGRESS_QDISC_SPELLINGS[spelling]
    tc("qdisc", "add", "dev", "veth0", "ingress", netns=ns)
    first, last = programs.counting("next"), programs.counting("pass")
    await add_bpf_filter(ns, "veth0", parent, 10, 1, first)
    tc("filter", "add", "dev", "veth0", "parent", spelling, "prio", "15", "u32", "match", "u32", "0", "0", netns=ns)
    await add_bpf_filter(ns, "veth0", parent, 20, 1, last)
    # The dump keeps the spelling: query must not select filters by the parent they report.
    assert await dumped_parents(ns, "veth0", codec.INGRESS_PARENT) == {parent}

    async with asynctc.open_session(backend, netns=ns) as s:
        hook = await s.query("veth0", "ingress")
        assert rows(hook) == [
            ("cls_bpf", first.id, 10, 1, False),
            ("u32", 0, 15, 0x80000800, False),  # one entry for the u32 filter: its key 800::800, not its table
            ("cls_bpf", last.id, 20, 1, False),
        ]
        assert hook.prog_ids == (first.id, last.id)
        # an ingress qdisc has no egress hook: nothing of it runs there, nothing is listed there
        assert (await s.query("veth0", "egress")).entries == ()
        await frames(veth, 4)
        assert (first.count(), last.count()) == (4, 4)
        # a foreign ingress qdisc's filters are never reaped, nor is the qdisc touched
        assert await s.reap_orphans() == ()
        assert rows(await s.query("veth0", "ingress")) == rows(hook)


async def test_egress_of_an_ingress_qdisc_is_empty_even_when_spelled_as_egress(veth: VethPair) -> None:
    """`ffff:fff3` on an `ingress` qdisc reaches its one (ingress) block: the filter runs on ingress and
    is listed there, never on egress, though the dump reports ffff:fff3 for every filter of the block."""
    ns = veth.netns_a
    tc("qdisc", "add", "dev", "veth0", "ingress", netns=ns)
    prog = programs.counting("pass")
    await add_bpf_filter(ns, "veth0", codec.EGRESS_PARENT, 10, 1, prog)
    assert await dumped_parents(ns, "veth0", codec.EGRESS_PARENT) == {codec.EGRESS_PARENT}
    async with asynctc.open_session("netlink", netns=ns) as s:
        assert rows(await s.query("veth0", "ingress")) == [("cls_bpf", prog.id, 10, 1, False)]
        assert (await s.query("veth0", "egress")).entries == ()
        await frames(veth, 3)
        assert prog.count() == 3


@pytest.mark.parametrize("backend", BACKENDS)
async def test_u32_filters_are_listed_and_a_classid_stops_the_filters_behind_it(veth: VethPair, backend: str) -> None:
    ns = veth.netns_a
    async with asynctc.open_session(backend, netns=ns) as s:
        a, b, c = programs.counting("next"), programs.counting("next"), programs.counting("next")
        await s.attach("veth0", "ingress", a, backend="netlink", priority=5)
        tc("filter", "add", "dev", "veth0", "ingress", "prio", "7", "u32", "match", "u32", "0", "0", netns=ns)
        await s.attach("veth0", "ingress", b, backend="netlink", priority=9)
        tc("filter", "add", "dev", "veth0", "ingress", "prio", "11", "u32", "match", "u32", "0", "0",
           "classid", "1:1", netns=ns)
        await s.attach("veth0", "ingress", c, backend="netlink", priority=13)

        hook = await s.query("veth0", "ingress")
        assert rows(hook) == [
            ("cls_bpf", a.id, 5, 1, True),
            ("u32", 0, 7, 0x80000800, False),  # each u32 filter once, by its key (800::800, 801::800)
            ("cls_bpf", b.id, 9, 1, True),
            ("u32", 0, 11, 0x80100800, False),
            ("cls_bpf", c.id, 13, 1, True),
        ]
        for e in hook.entries:
            if e.kind == "u32":
                assert (e.prog_name, e.prog_tag, e.link_id, e.has_program) == ("", "", None, False)
            else:
                assert e.has_program and e.prog_name == "atc_count_next"
        assert hook.prog_ids == (a.id, b.id, c.id)

        # the u32 without classid lets packets on; the one with a classid ends classification for them
        await frames(veth, 5)
        assert (a.count(), b.count(), c.count()) == (5, 5, 0)

        # the u32 priorities count as taken and u32 filters are no anchors: placement works around them
        first = await s.attach("veth0", "ingress", programs.constant("pass"), backend="netlink",
                               position=asynctc.First())
        after_b = await s.attach("veth0", "ingress", programs.constant("pass"), backend="netlink",
                                 position=asynctc.After(b))
        assert first.info.priority is not None and first.info.priority < 5
        assert after_b.info.priority == 10  # between b (9) and the u32 at 11
        assert await s.reap_orphans() == ()
        kinds = [(e.kind, e.priority) for e in (await s.query("veth0", "ingress")).entries]
        assert kinds.count(("u32", 7)) == 1 and kinds.count(("u32", 11)) == 1


async def test_a_u32_hash_table_is_no_entry_but_its_priority_is_taken(veth: VethPair) -> None:
    """`tc filter add ... prio 7 handle 1: u32 divisor 1` makes a u32 instance holding only hash tables (1:
    and the root 800:), no key: nothing to list, but the priority is taken (a cls_bpf filter there is
    refused with EINVAL, the kind does not match), so placement between 5 and 9 must not pick 7."""
    ns = veth.netns_a
    async with asynctc.open_session("netlink", netns=ns) as s:
        a, c = programs.constant("pass"), programs.constant("pass")
        await s.attach("veth0", "ingress", a, priority=5)
        await s.attach("veth0", "ingress", c, priority=9)
        tc("filter", "add", "dev", "veth0", "ingress", "prio", "7", "handle", "1:", "u32", "divisor", "1", netns=ns)
        ifx = ifindex_of(ns, "veth0")
        async with raw_netlink(ns) as nl:
            msgs = await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETTFILTER, ifx,
                                                                       codec.INGRESS_PARENT))
        assert sorted(m.handle for m in msgs if isinstance(m, codec.FilterMsg) and m.priority == 7 and m.handle) == [
            0x00100000, 0x80000000]  # the tables are there
        assert rows(await s.query("veth0", "ingress")) == [("cls_bpf", a.id, 5, 1, True), ("cls_bpf", c.id, 9, 1, True)]
        b = programs.constant("pass")
        att = await s.attach("veth0", "ingress", b, position=asynctc.After(a))
        assert att.info.priority == 6  # between a (5) and the table's priority 7, not their midpoint with 9
        assert rows(await s.query("veth0", "ingress")) == [
            ("cls_bpf", a.id, 5, 1, True), ("cls_bpf", b.id, 6, 1, True), ("cls_bpf", c.id, 9, 1, True)]
