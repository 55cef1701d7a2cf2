"""The netlink backend (clsact + cls_bpf) on the real kernel: one fresh namespace (and veth pair) per test.

Foreign objects are made with the `tc` command (u32 filters, qdiscs) or with asynctc's own codec and
transport (a foreign cls_bpf filter named "foreign"), never through a session, so that the session has no
claim on them.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio
from _children import CHILD_TIMEOUT, stop
from _netlinkutil import raw_netlink

import asynctc
from asynctc import After, Before, Direction, First, Last, programs
from asynctc.lowlevel import bpf, codec
from asynctc.testing import VethPair, ip, run_without_capabilities, send_frames, tc

pytestmark = pytest.mark.kernel

PARENTS = {"ingress": codec.INGRESS_PARENT, "egress": codec.EGRESS_PARENT}


def qdisc_kinds(netns: str, dev: str = "veth0") -> list[str]:
    """Kinds of the qdiscs in the device's ingress slot (clsact or ingress)."""
    out = json.loads(tc("-j", "qdisc", "show", "dev", dev, netns=netns).stdout or "[]")
    return [q["kind"] for q in out if q["kind"] in ("clsact", "ingress")]


async def frames(veth: VethPair, count: int) -> None:
    """Send frames from the peer end: they cross veth0's ingress hook."""
    await trio.to_thread.run_sync(lambda: send_frames(veth.b, count, netns=veth.netns_b))


def ids(hook: asynctc.Hook) -> list[int]:
    return [e.prog_id for e in hook.entries]




async def ifindex_of(netns: str, dev: str) -> int:
    out = json.loads(ip("-j", "link", "show", "dev", dev, netns=netns).stdout)
    return int(out[0]["ifindex"])


async def add_foreign_bpf(netns: str, dev: str, direction: str, prio: int, prog: asynctc.Program,
                          name: str = "foreign") -> None:
    """A cls_bpf filter made without asynctc's backend (what another tool would leave): handle 1."""
    ifx = await ifindex_of(netns, dev)
    flags = codec.NLM_F_REQUEST | codec.NLM_F_ACK | codec.NLM_F_CREATE | codec.NLM_F_EXCL
    async with raw_netlink(netns) as nl:
        await nl.request(lambda seq: codec.encode_filter(seq, codec.RTM_NEWTFILTER, flags, ifx, PARENTS[direction],
                                                         prio, 1, prog_fd=prog.fd, name=name), op="filter_add")


async def filters(netns: str, dev: str, direction: str) -> list[codec.FilterMsg]:
    """Every filter of a hook (any kind), without the per-priority heads."""
    ifx = await ifindex_of(netns, dev)
    async with raw_netlink(netns) as nl:
        msgs = await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETTFILTER, ifx,
                                                                   PARENTS[direction]))
    return [m for m in msgs if isinstance(m, codec.FilterMsg) and m.handle != 0]


# --------------------------------------------------------------------------------------------------------


async def test_probe_says_available(netns: str) -> None:
    async with asynctc.open_session("netlink", netns=netns) as s:
        assert s.backend_name == "netlink"
        probe = (await s.probe())["netlink"]
        assert probe.available, probe.reason
        assert "CAP_NET_ADMIN" in probe.reason


async def test_devices_resolve_in_the_session_namespace(veth: VethPair) -> None:
    """Devices are resolved in the session's namespace (by the device names opened there, on the trio
    thread): an alternative name gives the device's own name, an ifindex its name, and what is not there
    (the peer's device, in the other namespace) a clear DeviceNotFound."""
    ip("link", "property", "add", "dev", veth.a, "altname", "nl-alt-0", netns=veth.netns_a)
    async with asynctc.open_session("netlink", netns=veth.netns_a) as s:
        with trio.fail_after(30):
            ifindex, name = await s.resolve_device("nl-alt-0")
            assert name == veth.a
            assert await s.resolve_device(ifindex) == (ifindex, veth.a)
            att = await s.attach("nl-alt-0", "ingress", programs.constant("pass"))
            assert (att.info.dev, att.info.ifindex) == (veth.a, ifindex)
            for missing in (veth.b, "nosuchdev", 0x7FFFFFF0):
                with pytest.raises(asynctc.DeviceNotFound) as exc:
                    await s.resolve_device(missing)
                assert exc.value.errno == errno.ENODEV
                assert repr(veth.netns_a) in str(exc.value)
    with pytest.raises(asynctc.TCError, match="closed"):
        await s.resolve_device(veth.a)


async def test_attach_query_update_detach_with_packets(veth: VethPair) -> None:
    ns = veth.netns_a
    async with asynctc.open_session("netlink", netns=ns) as s:
        old = programs.counting("pass")
        att = await s.attach("veth0", "ingress", old)
        i = att.info
        assert (i.backend, i.dev, i.direction, i.prog_id, i.link_id) == ("netlink", "veth0", Direction.INGRESS,
                                                                          old.id, None)
        assert (i.priority, i.handle, i.offloaded, i.pinned) == (0x8000, 1, False, None)
        assert qdisc_kinds(ns) == ["clsact"]
        hook = await s.query("veth0", "ingress")
        assert hook.revision == 1  # the tcx revision of the (empty) tcx hook
        (e,) = hook.entries
        assert (e.prog_id, e.prog_name, e.prog_tag, e.kind, e.priority, e.handle, e.owned) == (
            old.id, old.name, old.tag, "cls_bpf", 0x8000, 1, True)
        # the owner tag in the kernel
        (f,) = await filters(ns, "veth0", "ingress")
        assert f.bpf_name is not None and f.bpf_name.startswith(f"asynctc:asynctc:{os.getpid()}.")
        assert f.bpf_name.endswith(f":{old.name}")
        assert f.direct_action and f.protocol == codec.ETH_P_ALL

        await frames(veth, 5)
        assert old.count() == 5

        new = programs.counting("drop")
        result = await att.update(new, expected=old)
        assert result.method == "netlink_replace" and result.revision == 1
        assert att.info.prog_id == new.id and (att.info.priority, att.info.handle) == (0x8000, 1)
        await frames(veth, 3)
        assert (old.count(), new.count()) == (5, 3)

        # compare-and-swap: another program is expected -> Conflict, nothing changed
        with pytest.raises(asynctc.Conflict, match="nothing was changed"):
            await att.update(programs.counting("pass"), expected=old)
        assert ids(await s.query("veth0", "ingress")) == [new.id]
        await frames(veth, 2)
        assert new.count() == 5

        await att.detach()
        assert att.state is asynctc.State.DETACHED
        assert (await s.query("veth0", "ingress")).entries == ()
        assert qdisc_kinds(ns) == []  # ours, and empty: deleted
        await att.detach()  # idempotent
        await frames(veth, 2)
        assert new.count() == 5


async def test_positions_become_priorities_around_foreign_filters(veth: VethPair) -> None:
    ns = veth.netns_a
    tc("qdisc", "add", "dev", "veth0", "clsact", netns=ns)  # a foreign clsact
    tc("filter", "add", "dev", "veth0", "ingress", "prio", "7", "u32", "match", "u32", "0", "0", netns=ns)
    foreign = programs.counting("next")
    await add_foreign_bpf(ns, "veth0", "ingress", 20, foreign)
    before_all = [(f.priority, f.handle, f.kind, f.bpf_id) for f in await filters(ns, "veth0", "ingress")]

    async with asynctc.open_session("netlink", netns=ns) as s:
        p = {k: programs.counting("drop" if k == "after_f" else "next")
             for k in ("last", "first", "before_f", "after_f", "head", "prio")}
        a_last = await s.attach("veth0", "ingress", p["last"], position=Last())
        a_first = await s.attach("veth0", "ingress", p["first"], position=First())
        a_bf = await s.attach("veth0", "ingress", p["before_f"], position=Before(foreign))
        a_af = await s.attach("veth0", "ingress", p["after_f"], position=After(foreign.id))
        a_head = await s.attach("veth0", "ingress", p["head"], position=Before(a_first))
        a_prio = await s.attach("veth0", "ingress", p["prio"], priority=500, handle=9)
        got = {a.info.prog_id: (a.info.priority, a.info.handle) for a in (a_last, a_first, a_bf, a_af, a_head, a_prio)}
        assert got == {
            p["last"].id: (20 + 0x100, 1),  # above the highest
            p["first"].id: (3, 1),  # below the u32 at 7, no room for a full step
            p["before_f"].id: (13, 1),  # between the u32 (7) and the foreign filter (20)
            p["after_f"].id: (148, 1),  # between the foreign filter (20) and ours at 276
            p["head"].id: (1, 1),  # before ours at 3
            p["prio"].id: (500, 9),  # explicit
        }
        # no gap left before priority 1: an error with advice, nothing added
        with pytest.raises(asynctc.HookFull, match="priority="):
            await s.attach("veth0", "ingress", programs.constant("pass"), position=Before(a_head))
        # a tcx-only anchor or a stray program is no filter on this hook
        with pytest.raises(asynctc.AnchorNotFound, match="cls_bpf filter"):
            await s.attach("veth0", "ingress", programs.constant("pass"), position=After(programs.constant("pass")))

        hook = await s.query("veth0", "ingress")
        assert [(e.priority, e.kind, e.owned) for e in hook.entries] == [
            (1, "cls_bpf", True), (3, "cls_bpf", True), (7, "u32", False),
            (13, "cls_bpf", True), (20, "cls_bpf", False), (148, "cls_bpf", True), (276, "cls_bpf", True),
            (500, "cls_bpf", True)]
        assert hook.entries[4].prog_id == foreign.id
        assert [(e.prog_id, e.handle) for e in hook.entries if e.kind == "u32"] == [(0, 0x80000800)]
        # run order is priority order: the u32 filter at 7 (one entry, its key 800::800, with no program;
        # its hash table 800: is no entry) matches without a classid and so goes on to the next filter, the
        # foreign program says
        # "next", ours at 148 drops, so the filters after it see nothing
        await frames(veth, 4)
        assert [p[k].count() for k in ("head", "first", "before_f", "after_f", "last", "prio")] == [4, 4, 4, 4, 0, 0]
        assert foreign.count() == 4

    after = [(f.priority, f.handle, f.kind, f.bpf_id) for f in await filters(ns, "veth0", "ingress")]
    assert after == before_all  # the foreign filters are untouched, ours are gone
    assert qdisc_kinds(ns) == ["clsact"]  # a pre-existing clsact is never deleted


async def test_clsact_is_created_and_removed_only_when_ours(veth: VethPair) -> None:
    ns = veth.netns_a
    async with asynctc.open_session("netlink", netns=ns) as s:
        a_in = await s.attach("veth0", "ingress", programs.constant("pass"))
        a_out = await s.attach("veth0", "egress", programs.constant("pass"))
        assert qdisc_kinds(ns) == ["clsact"]
        await a_in.detach()
        assert qdisc_kinds(ns) == ["clsact"]  # our egress filter is still on it
        await a_out.detach()
        assert qdisc_kinds(ns) == []

        # a foreign filter on our clsact keeps it
        a = await s.attach("veth0", "ingress", programs.constant("pass"))
        tc("filter", "add", "dev", "veth0", "egress", "prio", "7", "u32", "match", "u32", "0", "0", netns=ns)
        await a.detach()
        assert qdisc_kinds(ns) == ["clsact"]
        assert [f.kind for f in await filters(ns, "veth0", "egress")] == ["u32", "u32"]  # raw dump: table + key
        tc("filter", "del", "dev", "veth0", "egress", "prio", "7", netns=ns)

        assert qdisc_kinds(ns) == ["clsact"]
    # ours and empty once the foreign filter went: the session's close deletes it
    assert qdisc_kinds(ns) == []

    # a pre-existing clsact is used and kept, however empty
    tc("qdisc", "add", "dev", "veth0", "clsact", netns=ns)
    async with asynctc.open_session("netlink", netns=ns) as s:
        a = await s.attach("veth0", "egress", programs.constant("pass"))
        await a.detach()
        assert qdisc_kinds(ns) == ["clsact"]
        await s.attach("veth0", "ingress", programs.constant("pass"))
    assert qdisc_kinds(ns) == ["clsact"]
    assert await filters(ns, "veth0", "ingress") == []


async def test_clsact_goes_with_our_last_filter_even_when_another_was_deleted_under_us(veth: VethPair) -> None:
    """While the backend holds filters on a device it skips the emptiness check (its own filters keep the
    clsact non-empty). A held filter that someone else deleted must not keep the clsact forever: once it
    is found severed, the clsact we created is deleted if nothing is left on it."""
    ns = veth.netns_a
    async with asynctc.open_session("netlink", netns=ns) as s:
        a_in = await s.attach("veth0", "ingress", programs.constant("pass"))
        a_out = await s.attach("veth0", "egress", programs.constant("pass"))
        tc("filter", "del", "dev", "veth0", "egress", "prio", str(a_out.info.priority), netns=ns)
        await a_in.detach()  # possibly before the session has seen the deletion: the clsact may stay...
        with trio.fail_after(10):
            await a_out.wait_severed()
        assert qdisc_kinds(ns) == []  # ...but not once a_out is known severed


async def test_an_ingress_qdisc_in_the_way(veth: VethPair) -> None:
    ns = veth.netns_a
    tc("qdisc", "add", "dev", "veth0", "ingress", netns=ns)
    async with asynctc.open_session("netlink", netns=ns) as s:
        with pytest.raises(asynctc.AlreadyAttached, match="tc qdisc del dev veth0 ingress") as exc:
            await s.attach("veth0", "ingress", programs.constant("pass"))
        assert exc.value.errno == errno.EEXIST
        assert "bpf_link" in str(exc.value)
        assert s.attachments == ()
    assert qdisc_kinds(ns) == ["ingress"]  # untouched, and nothing of ours left


async def test_tcx_runs_before_cls_bpf_on_one_device(veth: VethPair) -> None:
    ns = veth.netns_a
    async with asynctc.open_session("bpf_link", netns=ns) as s:
        legacy = programs.counting("pass")
        t_prog = programs.counting("next")
        n_att = await s.attach("veth0", "ingress", legacy, backend="netlink")
        t_att = await s.attach("veth0", "ingress", t_prog)
        assert n_att.backend_name == "netlink" and t_att.backend_name == "bpf_link"
        hook = await s.query("veth0", "ingress")
        assert [(e.kind, e.prog_id, e.owned) for e in hook.entries] == [
            ("tcx", t_prog.id, True), ("cls_bpf", legacy.id, True)]
        await frames(veth, 4)
        assert (t_prog.count(), legacy.count()) == (4, 4)

        # another session (netlink) sees the same hook in the same order, nothing of it owned
        async with asynctc.open_session("netlink", netns=ns) as other:
            hook2 = await other.query("veth0", "ingress")
            assert [(e.kind, e.prog_id, e.owned) for e in hook2.entries] == [
                ("tcx", t_prog.id, False), ("cls_bpf", legacy.id, False)]
            assert hook2.revision == hook.revision

        # a tcx program that decides ends the run: the filter sees nothing more
        await t_att.update(programs.counting("pass"))
        await frames(veth, 3)
        assert legacy.count() == 4
    assert qdisc_kinds(ns) == []


async def test_offload_require_and_prefer_on_veth(veth: VethPair) -> None:
    ns = veth.netns_a
    async with asynctc.open_session("netlink", netns=ns) as s:
        with pytest.raises(asynctc.OffloadError, match="offload") as exc:
            await s.attach("veth0", "ingress", programs.constant("pass"), offload="require")
        assert exc.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
        assert s.attachments == ()
        assert qdisc_kinds(ns) == []  # the clsact we made for it is gone again
        assert (await s.query("veth0", "ingress")).entries == ()

        prog = programs.counting("pass")
        att = await s.attach("veth0", "ingress", prog, offload="prefer")
        assert att.info.offloaded is False and att.info.backend == "netlink"
        (f,) = await filters(ns, "veth0", "ingress")
        assert not f.in_hw and not f.skip_sw and f.skip_hw
        await frames(veth, 2)
        assert prog.count() == 2
        # an update of a software filter stays in software
        new = programs.counting("pass")
        await att.update(new)
        assert att.info.offloaded is False
        await frames(veth, 1)
        assert new.count() == 1

    # with a foreign clsact present, a refused offload leaves it alone
    tc("qdisc", "add", "dev", "veth0", "clsact", netns=ns)
    async with asynctc.open_session("netlink", netns=ns) as s:
        with pytest.raises(asynctc.OffloadError):
            await s.attach("veth0", "egress", programs.constant("pass"), offload="require")
    assert qdisc_kinds(ns) == ["clsact"]


async def test_a_filter_deleted_under_us_is_severed(veth: VethPair) -> None:
    ns = veth.netns_a
    async with asynctc.open_session("netlink", netns=ns) as s:
        att = await s.attach("veth0", "ingress", programs.constant("pass"))
        keep = await s.attach("veth0", "egress", programs.constant("pass"))
        tc("filter", "del", "dev", "veth0", "ingress", "prio", str(att.info.priority), netns=ns)
        with trio.fail_after(10):
            await att.wait_severed()
        assert att.state is asynctc.State.SEVERED
        await att.detach()  # a no-op
        assert att.state is asynctc.State.SEVERED
        with pytest.raises(asynctc.Severed):
            await att.update(programs.constant("drop"))
        assert s.attachments == (keep,)
        assert qdisc_kinds(ns) == ["clsact"]  # still carries the egress filter
        await keep.detach()
        assert qdisc_kinds(ns) == []


async def test_a_foreign_filter_in_our_slot_is_not_ours(veth: VethPair) -> None:
    """Someone deletes our filter and puts their own in the same slot: we neither delete nor replace it."""
    ns = veth.netns_a
    async with asynctc.open_session("netlink", netns=ns) as s:
        att = await s.attach("veth0", "ingress", programs.constant("pass"), priority=40)
        tc("filter", "del", "dev", "veth0", "ingress", "prio", "40", netns=ns)
        theirs = programs.constant("pass")
        await add_foreign_bpf(ns, "veth0", "ingress", 40, theirs)
        with trio.fail_after(10):
            await att.wait_severed()
        with pytest.raises(asynctc.Severed):
            await att.update(programs.constant("drop"))
        await att.detach()
    assert [(f.priority, f.bpf_id, f.bpf_name) for f in await filters(ns, "veth0", "ingress")] == [
        (40, theirs.id, "foreign")]
    assert qdisc_kinds(ns) == ["clsact"]  # carries their filter


async def test_bad_inputs_are_specific_and_leave_nothing(veth: VethPair) -> None:
    ns = veth.netns_a
    async with asynctc.open_session("netlink", netns=ns) as s:
        prog = programs.constant("pass")
        with pytest.raises(asynctc.DeviceNotFound, match="no device named 'nope0'"):
            await s.attach("nope0", "ingress", prog)
        with pytest.raises(asynctc.DeviceNotFound, match="only valid in its own namespace"):
            await s.attach(4242, "ingress", prog)
        closed = programs.constant("pass")
        closed.close()
        with pytest.raises(asynctc.ProgramError, match="closed"):
            await s.attach("veth0", "ingress", closed)
        xdp_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_XDP, bpf.asm.mov64_imm(0, 2) + bpf.asm.exit())
        try:
            with asynctc.Program.from_fd(xdp_fd) as wrong:
                with pytest.raises(asynctc.ProgramError, match=r"XDP program.*SCHED_CLS"):
                    await s.attach("veth0", "ingress", wrong)
        finally:
            os.close(xdp_fd)
        for bad in (0, 65536, -1):
            with pytest.raises(ValueError, match=r"1\.\.65535"):
                await s.attach("veth0", "ingress", prog, priority=bad)
        for wrong_type in ("7", True):
            with pytest.raises(TypeError, match=r"priority= of the netlink backend takes a int"):
                await s.attach("veth0", "ingress", prog, priority=wrong_type)
        with pytest.raises(ValueError, match="handle"):
            await s.attach("veth0", "ingress", prog, handle=0)
        with pytest.raises(TypeError, match=r"netlink backend takes no attach option 'mode'.*priority="):
            await s.attach("veth0", "ingress", prog, mode="legacy")
        # the slot of an explicit priority+handle is taken: the kernel's EEXIST
        await s.attach("veth0", "ingress", prog, priority=9)
        with pytest.raises(asynctc.AlreadyAttached) as exc:
            await s.attach("veth0", "ingress", programs.constant("drop"), priority=9)
        assert exc.value.errno == errno.EEXIST
        assert len(s.attachments) == 1
    assert qdisc_kinds(ns) == []
    assert await filters(ns, "veth0", "ingress") == []


async def test_concurrent_attaches_on_64_devices(netns: str) -> None:
    count = 64
    batch = "".join(f"link add vc{i} type veth peer name vp{i}\nlink set vc{i} up\nlink set vp{i} up\n"
                    for i in range(count))
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input=batch, text=True, check=True, capture_output=True,
                   timeout=CHILD_TIMEOUT)
    per_device = 3
    prog = [programs.constant("next") for _ in range(per_device)]
    async with asynctc.open_session("netlink", netns=netns) as s:
        atts: list[asynctc.Attachment] = []

        async def one(dev: str, p: asynctc.Program, position: asynctc.Position) -> None:
            atts.append(await s.attach(dev, "ingress", p, position=position))

        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                for i in range(count):
                    for j in range(per_device):
                        n.start_soon(one, f"vc{i}", prog[j], First() if j % 2 else Last())
        assert len(atts) == count * per_device == len(s.attachments)
        for i in range(0, count, 7):
            hook = await s.query(f"vc{i}", "ingress")
            prios = [e.priority for e in hook.entries if e.priority is not None]
            assert len(prios) == per_device and len(set(prios)) == per_device and prios == sorted(prios)
            assert sorted(e.prog_id for e in hook.entries) == sorted(p.id for p in prog)
            assert all(e.owned for e in hook.entries)
            assert qdisc_kinds(netns, f"vc{i}") == ["clsact"]

        async def detach(a: asynctc.Attachment) -> None:
            await a.detach()

        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                for a in atts[: len(atts) // 2]:
                    n.start_soon(detach, a)
    # the rest was detached at session close, and every clsact with it
    for i in range(count):
        assert qdisc_kinds(netns, f"vc{i}") == []


async def test_pin_survives_the_session_and_is_adopted(veth: VethPair, bpffs: str) -> None:
    ns = veth.netns_a
    path = os.path.join(bpffs, "ingress_filter")
    prog = programs.counting("pass")
    async with asynctc.open_session("netlink", netns=ns) as s:
        att = await s.attach("veth0", "ingress", prog, priority=77, handle=5)
        await att.pin(path)
        assert att.info.pinned == path
        assert os.path.exists(path) and os.path.exists(path + "_record")
        (f,) = await filters(ns, "veth0", "ingress")
        assert f.bpf_name is not None and f.bpf_name.endswith(":pinned") and f.bpf_id == prog.id
        with pytest.raises(asynctc.PinError, match="already pinned"):
            await att.pin(path + "2")
        with pytest.raises(asynctc.PinError, match="dot"):
            await (await s.attach("veth0", "egress", programs.constant("pass"))).pin(path + ".x")
    # the session closed: the pinned filter stays and runs
    await frames(veth, 2)
    assert prog.count() == 2
    assert qdisc_kinds(ns) == ["clsact"]

    # a bpf_link session passes the path on to the netlink backend (a program is pinned there, no link)
    async with asynctc.open_session("bpf_link", netns=ns) as s:
        assert [e.owned for e in (await s.query("veth0", "ingress")).entries] == [False]
        adopted = await s.adopt_pinned(path)
        assert adopted.backend_name == "netlink"
        i = adopted.info
        assert (i.dev, i.direction, i.priority, i.handle, i.prog_id, i.pinned) == (
            "veth0", Direction.INGRESS, 77, 5, prog.id, path)
        assert [e.owned for e in (await s.query("veth0", "ingress")).entries] == [True]
        new = programs.counting("pass")
        assert (await adopted.update(new, expected=prog)).method == "netlink_replace"
        await frames(veth, 3)
        assert (prog.count(), new.count()) == (2, 3)
    # still pinned (re-pinned with the new program): adopt again, unpin, detach
    async with asynctc.open_session("netlink", netns=ns) as s:
        again = await s.adopt_pinned(path)
        assert again.info.prog_id == new.id
        await again.unpin()
        assert not os.path.exists(path) and not os.path.exists(path + "_record")
        (f,) = await filters(ns, "veth0", "ingress")
        assert f.bpf_name is not None and not f.bpf_name.endswith(":pinned")
        assert f.bpf_name.startswith(f"asynctc:asynctc:{os.getpid()}.")
    # unpinned: detached when that session closed, with the clsact the first session made... which was
    # not this session's, so it stays
    assert await filters(ns, "veth0", "ingress") == []


async def test_adopting_a_pin_whose_filter_is_gone(veth: VethPair, bpffs: str) -> None:
    ns = veth.netns_a
    path = os.path.join(bpffs, "gone")
    async with asynctc.open_session("netlink", netns=ns) as s:
        att = await s.attach("veth0", "egress", programs.constant("pass"), priority=30)
        await att.pin(path)
    tc("filter", "del", "dev", "veth0", "egress", "prio", "30", netns=ns)
    async with asynctc.open_session("netlink", netns=ns) as s:
        with pytest.raises(asynctc.Severed, match="gone"):
            await s.adopt_pinned(path)
        with pytest.raises(asynctc.PinError, match="nothing is pinned"):
            await s.adopt_pinned(os.path.join(bpffs, "nothing"))
        # a plain pinned program is no attachment
        plain = programs.constant("pass")
        bpf.obj_pin(plain.fd, os.path.join(bpffs, "plain"))
        with pytest.raises(asynctc.PinError, match="no backend recognised it"):
            await s.adopt_pinned(os.path.join(bpffs, "plain"))


def _attach_and_wait(netns: str, owner: str, dev_dirs: list[tuple[str, str]], pin: str | None = None) -> str:
    return textwrap.dedent(f"""
        import trio, asynctc
        from asynctc import programs
        async def main():
            async with asynctc.open_session("netlink", netns={netns!r}, owner={owner!r}) as s:
                atts = [await s.attach(d, direction, programs.constant("pass", name="orphan"))
                        for d, direction in {dev_dirs!r}]
                if {pin!r} is not None:
                    await atts[0].pin({pin!r})
                print(" ".join(str(a.info.prog_id) for a in atts), flush=True)
                await trio.sleep_forever()
        trio.run(main)
    """)


async def _run_and_kill(code: str) -> list[int]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
        prog_ids = [int(x) for x in line.split()]
        assert prog_ids, "the child did not attach"
        os.kill(proc.pid, signal.SIGKILL)
        await trio.to_thread.run_sync(proc.wait, CHILD_TIMEOUT)
        return prog_ids
    finally:
        stop(proc)


async def test_a_killed_process_filters_are_reaped(veth: VethPair, bpffs: str) -> None:
    ns = veth.netns_a
    owner = "atcreap"
    dead = await _run_and_kill(_attach_and_wait(ns, owner, [("veth0", "ingress"), ("veth0", "egress")]))
    pinned = await _run_and_kill(_attach_and_wait(ns, owner, [("veth0", "ingress")],
                                                  pin=os.path.join(bpffs, "keep")))
    other_owner = await _run_and_kill(_attach_and_wait(ns, "someoneelse", [("veth0", "ingress")]))
    tc("filter", "add", "dev", "veth0", "ingress", "prio", "7", "u32", "match", "u32", "0", "0", netns=ns)
    # the killed processes' filters outlive them
    assert len([f for f in await filters(ns, "veth0", "ingress") if f.kind == "bpf"]) == 3

    async with asynctc.open_session("netlink", netns=ns, owner=owner) as live:
        mine = await live.attach("veth0", "ingress", programs.constant("pass"))
        async with asynctc.open_session("netlink", netns=ns, owner=owner) as s:
            removed = await s.reap_orphans()
            assert sorted(e.prog_id for e in removed) == sorted(dead)
            assert all(e.kind == "cls_bpf" and not e.owned and e.prog_name == "orphan" for e in removed)
            assert await s.reap_orphans() == ()
        hook = await live.query("veth0", "ingress")
        # kept: the live session's own filter, the pinned one, the other owner's, and the u32 (one entry,
        # its key, listed without a program)
        assert sorted(hook.prog_ids) == sorted([mine.info.prog_id, *pinned, *other_owner])
        assert [(e.kind, e.priority, e.handle, e.prog_id, e.owned) for e in hook.entries if e.kind == "u32"] == [
            ("u32", 7, 0x80000800, 0, False)]
        assert [f.bpf_id for f in await filters(ns, "veth0", "egress")] == []
        assert mine.state is asynctc.State.ATTACHED
        # the pinned orphan can still be adopted
        adopted = await live.adopt_pinned(os.path.join(bpffs, "keep"))
        assert adopted.info.prog_id == pinned[0]


def test_without_capabilities_the_backend_says_cap_net_admin(veth: VethPair) -> None:
    code = textwrap.dedent("""
        import trio, asynctc
        async def main():
            try:
                async with asynctc.open_session("netlink"):
                    pass
            except asynctc.BackendUnavailable as exc:
                print("session:", exc, flush=True)
        trio.run(main)
    """)
    proc = run_without_capabilities(code, netns=veth.netns_a)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, (proc.stdout, proc.stderr)
    assert lines[0].startswith("session:") and "CAP_NET_ADMIN" in lines[0]
    assert qdisc_kinds(veth.netns_a) == []


async def test_reaping_never_deletes_a_filter_that_took_an_orphans_slot(
    veth: VethPair, bpffs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the dump that finds an orphan and its delete, the orphan may go and someone else's filter
    take its slot (the liveness check runs in a thread meanwhile): reaping reads the slot again and leaves
    that filter alone."""

    ns = veth.netns_a
    owner = "atcreap2"
    dead = await _run_and_kill(_attach_and_wait(ns, owner, [("veth0", "ingress")]))
    [orphan] = [f for f in await filters(ns, "veth0", "ingress") if f.bpf_id == dead[0]]
    foreign = programs.constant("drop")
    foreign_pin = os.path.join(bpffs, "foreign")
    bpf.obj_pin(foreign.fd, foreign_pin)
    from asynctc.lowlevel.kernel import LINUX

    real_alive = LINUX.session_alive

    def alive_while_the_slot_changes(session_tag: str) -> bool:
        # A foreign tool removes the orphan and puts its own filter in the same slot.
        tc("filter", "del", "dev", "veth0", "ingress", "prio", str(orphan.priority), netns=ns)
        tc("filter", "add", "dev", "veth0", "ingress", "prio", str(orphan.priority), "handle",
           hex(orphan.handle), "bpf", "object-pinned", foreign_pin, "da", netns=ns)
        return real_alive(session_tag)

    monkeypatch.setattr(LINUX, "session_alive", alive_while_the_slot_changes)
    async with asynctc.open_session("netlink", netns=ns, owner=owner) as s:
        assert await s.reap_orphans() == ()
    assert [f.bpf_id for f in await filters(ns, "veth0", "ingress")] == [foreign.id]
