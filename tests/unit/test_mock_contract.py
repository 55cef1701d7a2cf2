"""The public contract (ARCHITECTURE.md) on the mock backend."""

from __future__ import annotations

import errno
import os

import pytest
import trio
from _mockutil import assert_consistent, kernel_entries, qdiscs

import asynctc
from asynctc import After, Before, Direction, First, Last, State
from asynctc.events import AttachmentSevered, DeviceRemoved, FilterRemoved, Resynced
from asynctc.lowlevel import bpf
from asynctc.lowlevel.tcpolicy import format_tag
from asynctc_mock import MockKernel, SimulatedProgram

IN = Direction.INGRESS
EG = Direction.EGRESS


# -- sessions ----------------------------------------------------------------------------------------
async def test_open_session_needs_no_setup() -> None:
    async with asynctc.open_session(backend="mock") as s:
        assert s.backend_name == "mock"
        assert isinstance(s.kernel, MockKernel)
        assert set(s.kernel.devices()) == {"lo", "eth0", "veth0", "veth1"}
        probes = await s.probe()
        assert probes["mock"] == asynctc.Probe(True, "in-memory kernel model; no privileges needed")
        prog = s.kernel.program("drop")
        async with s.open_attachment("eth0", "ingress", prog) as att:
            assert att.info.link_id is not None
            assert s.kernel.send("eth0", "ingress") == "drop"
        assert kernel_entries(s.kernel) == set()


async def test_open_session_with_a_kernel(kernel: MockKernel) -> None:
    async with asynctc.open_session(kernel=kernel) as s:  # kernel= implies the mock
        assert s.kernel is kernel
        await s.attach("veth0", IN, kernel.program())
        assert len(kernel_entries(kernel)) == 1
    assert kernel_entries(kernel) == set()


async def test_the_real_backends_run_on_a_mock_sessions_kernel() -> None:
    async with asynctc.open_session(backend="mock") as s:
        kernel = s.kernel
        link = await s.attach("eth0", IN, kernel.program("next"), backend="bpf_link")
        flt = await s.attach("eth0", IN, kernel.program("drop"), backend="netlink")
        assert (link.info.backend, flt.info.backend) == ("bpf_link", "netlink")
        assert [e.kind for e in (await s.query("eth0", IN)).entries] == ["tcx", "cls_bpf"]
        assert kernel.send("eth0", IN) == "drop"
    assert kernel_entries(kernel) == set() and qdiscs(kernel) == {}


# -- order -------------------------------------------------------------------------------------------
async def test_positions_by_program_attachment_and_id(kernel: MockKernel, session: asynctc.Session) -> None:
    p = {n: kernel.program("next", name=n) for n in "abcdefg"}
    a = await session.attach("eth0", IN, p["a"])
    await session.attach("eth0", IN, p["b"], position=First())
    await session.attach("eth0", IN, p["c"], position=Last())
    await session.attach("eth0", IN, p["d"], position=Before(a))  # by attachment
    await session.attach("eth0", IN, p["e"], position=After(p["c"]))  # by program
    await session.attach("eth0", IN, p["f"], position=Before(p["b"].id))  # by id
    await session.attach("eth0", IN, p["g"], position=After(a))
    hook = await session.query("eth0", IN)
    order = "fbdagce"
    assert hook.prog_ids == tuple(p[n].id for n in order)
    assert all(e.owned and e.kind == "tcx" for e in hook.entries)
    # Packets prove the order: a "drop" inserted just after a stops the ones after it.
    stop = kernel.program("drop")
    await session.attach("eth0", IN, stop, position=After(a))
    assert kernel.send("eth0", IN, 2) == "drop"
    assert {n: p[n].count() for n in order} == {"f": 2, "b": 2, "d": 2, "a": 2, "g": 0, "c": 0, "e": 0}
    assert_consistent(kernel, session)


async def test_revisions_and_the_reset_rule(kernel: MockKernel, session: asynctc.Session) -> None:
    assert (await session.query("eth0", IN)).revision == 1
    x = await session.attach("eth0", IN, kernel.program())
    y = await session.attach("eth0", IN, kernel.program())
    assert (await session.query("eth0", IN)).revision == 3
    await x.detach()
    assert (await session.query("eth0", IN)).revision == 4
    await y.detach()
    assert (await session.query("eth0", IN)).revision == 1
    # With a clsact qdisc on the device (a legacy attachment created it) the count goes on...
    legacy = await session.attach("eth0", EG, kernel.program(), mode="legacy")
    x = await session.attach("eth0", IN, kernel.program())
    await x.detach()
    assert (await session.query("eth0", IN)).revision == 3
    # ...until the qdisc goes with the last filter: the empty hook counts from 1 again.
    await legacy.detach()
    assert qdiscs(kernel) == {}
    assert (await session.query("eth0", IN)).revision == 1


async def test_expected_revision(kernel: MockKernel, session: asynctc.Session) -> None:
    await session.attach("eth0", IN, kernel.program())
    rev = (await session.query("eth0", IN)).revision
    assert rev is not None  # a tcx hook has one
    with pytest.raises(asynctc.StaleRevision) as e:
        await session.attach("eth0", IN, kernel.program(), expected_revision=rev - 1)
    assert e.value.errno == errno.ESTALE
    assert len(kernel.hook("eth0", IN).entries) == 1
    await session.attach("eth0", IN, kernel.program(), expected_revision=rev)
    assert (await session.query("eth0", IN)).revision == rev + 1


async def test_duplicate_and_full_hook(kernel: MockKernel, session: asynctc.Session) -> None:
    prog = kernel.program()
    await session.attach("eth0", IN, prog)
    with pytest.raises(asynctc.AlreadyAttached):
        await session.attach("eth0", IN, prog, position=First())
    for _ in range(62):
        await session.attach("eth0", IN, kernel.program())
    with pytest.raises(asynctc.HookFull) as e:
        await session.attach("eth0", IN, kernel.program())
    assert e.value.errno == errno.ERANGE
    assert len(session.attachments) == 63
    assert_consistent(kernel, session)


# -- update ------------------------------------------------------------------------------------------
async def test_update_in_place_and_compare_and_swap(kernel: MockKernel, session: asynctc.Session) -> None:
    a, b, c = kernel.program("drop"), kernel.program("pass"), kernel.program("next")
    att = await session.attach("eth0", IN, a)
    rev = (await session.query("eth0", IN)).revision
    assert rev is not None  # a tcx hook has one
    res = await att.update(b, expected=a)
    assert res == asynctc.UpdateResult("link_update", rev + 1)
    assert att.info.prog_id == b.id
    with pytest.raises(asynctc.Conflict):
        await att.update(c, expected=a)
    hook = await session.query("eth0", IN)
    assert hook.prog_ids == (b.id,) and hook.revision == rev + 1
    assert att.info.prog_id == b.id
    assert (await att.update(b)).revision == rev + 1  # the same program: no new revision


async def test_make_before_break_when_in_place_is_refused(kernel: MockKernel,
                                                         session: asynctc.Session) -> None:
    first, old, last, new = (kernel.program("next"), kernel.program("drop"), kernel.program("pass"),
                             kernel.program("pass"))
    await session.attach("eth0", IN, first)
    att = await session.attach("eth0", IN, old)
    await session.attach("eth0", IN, last)
    old_link = att.info.link_id
    rev = (await session.query("eth0", IN)).revision
    assert rev is not None  # a tcx hook has one
    kernel.inject_fault("link_update", errno.EOPNOTSUPP)
    res = await att.update(new, expected=old)
    assert res.method == "make_before_break"
    assert res.revision == rev + 2  # the new link in, the old one out
    hook = await session.query("eth0", IN)
    assert hook.prog_ids == (first.id, new.id, last.id)  # the new program took the old one's place
    assert att.info.link_id != old_link and att.info.prog_id == new.id
    assert all(e.owned for e in hook.entries)
    assert_consistent(kernel, session)


async def test_make_before_break_conflict_and_rollback(kernel: MockKernel, session: asynctc.Session) -> None:
    old, new, other = kernel.program(), kernel.program(), kernel.program()
    att = await session.attach("eth0", IN, old)
    kernel.inject_fault("link_update", errno.EINVAL, times=2)
    with pytest.raises(asynctc.Conflict):
        await att.update(new, expected=other)
    before = kernel.hook("eth0", IN)
    assert before.prog_ids == (old.id,)
    # The old link cannot be detached: the new one is rolled back, the old program keeps running.
    kernel.inject_fault("link_detach", errno.EBUSY)
    with pytest.raises(asynctc.TCError) as e:
        await att.update(new)
    assert e.value.errno == errno.EBUSY
    assert kernel.hook("eth0", IN).prog_ids == (old.id,)
    assert att.info.prog_id == old.id and att.state is State.ATTACHED
    assert_consistent(kernel, session)


async def test_update_of_a_pinned_link_moves_the_pin(kernel: MockKernel, session: asynctc.Session) -> None:
    old, new = kernel.program(), kernel.program()
    att = await session.attach("eth0", IN, old)
    await att.pin("/sys/fs/bpf/x")
    kernel.inject_fault("link_update", errno.EOPNOTSUPP)
    await att.update(new)
    pins = kernel.pins()  # the link, and the record of who pinned it beside it (as on the real kernel)
    assert set(pins) == {"/sys/fs/bpf/x", "/sys/fs/bpf/x_record"}
    assert pins["/sys/fs/bpf/x"] == f"link {att.info.link_id}"
    assert att.info.pinned == "/sys/fs/bpf/x"


# -- severing ----------------------------------------------------------------------------------------
async def test_device_removal_severs(kernel: MockKernel, session: asynctc.Session) -> None:
    kernel.add_device("tmp0")
    prog = kernel.program()
    att = await session.attach("tmp0", IN, prog)
    legacy = await session.attach("tmp0", EG, kernel.program(), mode="legacy")
    async with session.open_monitor() as mon:
        kernel.remove_device("tmp0")
        with trio.fail_after(10):
            await att.wait_severed()
            await legacy.wait_severed()
            seen = []
            async for ev in mon:
                seen.append(ev)
                if sum(isinstance(e, AttachmentSevered) for e in seen) == 2:
                    break
    # The device's removal is reported before the severings it caused (a FilterAdded of the attach that
    # raced the monitor's start may come first).
    first_severed = next(i for i, e in enumerate(seen) if isinstance(e, AttachmentSevered))
    assert any(isinstance(e, DeviceRemoved) for e in seen[:first_severed]), seen
    assert {e.attachment for e in seen if isinstance(e, AttachmentSevered)} == {att, legacy}
    assert att.state is State.SEVERED and legacy.state is State.SEVERED
    await att.detach()  # a no-op
    assert att.state is State.SEVERED
    with pytest.raises(asynctc.Severed):
        await att.update(kernel.program())
    assert session.attachments == ()
    assert kernel.links() == ()  # the severed link's resources were released


async def test_filter_deleted_by_someone_else_severs(kernel: MockKernel, session: asynctc.Session) -> None:
    att = await session.attach("veth0", IN, kernel.program(), mode="legacy")
    i = att.info
    assert i.priority is not None and i.handle is not None
    async with session.open_monitor() as mon:  # the event source is subscribed from here on
        kernel.filter_delete("veth0", IN, i.priority, i.handle)
        with trio.fail_after(10):
            await att.wait_severed()
            async for ev in mon:
                if isinstance(ev, FilterRemoved):
                    break
    assert isinstance(ev, FilterRemoved) and (ev.priority, ev.handle, ev.direction) == (i.priority, i.handle, IN)
    assert att.state is State.SEVERED
    # A qdisc deleted under an attachment severs it too.
    again = await session.attach("veth0", IN, kernel.program(), mode="legacy")
    async with session.open_monitor():
        kernel.qdisc_delete("veth0")
        with trio.fail_after(10):
            await again.wait_severed()
    assert "deleted" in (again.sever_reason or "")  # the kernel flushes its filters, then the qdisc goes


async def test_update_finds_a_severed_link(kernel: MockKernel, session: asynctc.Session) -> None:
    kernel.add_device("tmp1")
    att = await session.attach("tmp1", IN, kernel.program())
    kernel.remove_device("tmp1")
    with pytest.raises(asynctc.Severed):
        await att.update(kernel.program())
    assert att.state is State.SEVERED


async def test_monitor_resyncs_after_overflow(kernel: MockKernel, session: asynctc.Session) -> None:
    kernel.add_device("tmp2")
    att = await session.attach("tmp2", IN, kernel.program())
    async with session.open_monitor() as mon:
        kernel.remove_device("tmp2")
        kernel.add_device("tmp3")
        kernel.overflow_events()  # both events lost before the source read them
        with trio.fail_after(10):
            seen = []
            async for ev in mon:
                seen.append(ev)
                if isinstance(ev, Resynced):
                    break
            await att.wait_severed()
    names = {(type(e).__name__, getattr(e, "name", None)) for e in seen}
    assert ("DeviceRemoved", "tmp2") in names and ("DeviceAdded", "tmp3") in names
    assert att.state is State.SEVERED


# -- foreign entries ---------------------------------------------------------------------------------
async def test_foreign_entries_are_listed_never_touched(kernel: MockKernel) -> None:
    foreign_link = kernel.attach_foreign_tcx("eth0", IN, kernel.program(name="theirs"))
    plain = kernel.program(name="plain")
    kernel.attach_foreign_tcx("eth0", IN, plain, link=False)
    kernel.add_foreign_filter("eth0", IN, kernel.program(name="tcf"), priority=0x8000, name="tc")
    kernel.add_foreign_filter("eth0", EG, priority=7)  # a u32 filter: not a program, not listed
    before = kernel_entries(kernel)
    async with asynctc.open_session(backend="mock", kernel=kernel) as s:
        mine = kernel.program(name="mine")
        att = await s.attach("eth0", IN, mine, position=Before(plain.id))  # anchoring to them works
        theirs = kernel.filters("eth0", IN)[0].prog_id
        assert theirs is not None
        legacy = await s.attach("eth0", IN, kernel.program(), mode="legacy", position=Before(theirs))
        hook = await s.query("eth0", IN)
        owned = {e.prog_id: e.owned for e in hook.entries}
        assert owned == {kernel.links()[0].prog_id: False, mine.id: True, plain.id: False,
                         legacy.info.prog_id: True, kernel.filters("eth0", IN)[1].prog_id: False}
        assert hook.prog_ids[:3] == (kernel.links()[0].prog_id, mine.id, plain.id)
        assert [e.kind for e in hook.entries] == ["tcx", "tcx", "tcx", "cls_bpf", "cls_bpf"]
        await att.detach()
        await legacy.detach()
        assert kernel_entries(kernel) == before
        assert qdiscs(kernel) == {"eth0": "foreign"}  # their qdisc stays: it is not ours
        await s.attach("eth0", IN, kernel.program())
    assert kernel_entries(kernel) == before
    assert kernel.link_info(foreign_link).ifindex == 2


# -- offload -----------------------------------------------------------------------------------------
async def test_offload_prefer_and_require(kernel: MockKernel, session: asynctc.Session) -> None:
    kernel.add_device("nic0", offload=True)
    hw = await session.attach("nic0", IN, kernel.program("drop"), offload="prefer")
    assert hw.info.offloaded and hw.info.priority is not None and hw.info.link_id is None
    sw = await session.attach("veth0", IN, kernel.program(), offload="prefer")
    assert not sw.info.offloaded and sw.info.priority is not None  # a software filter, as netlink does
    with pytest.raises(asynctc.OffloadError):
        await session.attach("veth1", IN, kernel.program(), offload="require")
    assert "veth1" not in qdiscs(kernel)  # the refused try left no qdisc
    kernel.inject_fault("filter_add_hw", errno.EOPNOTSUPP)
    with pytest.raises(asynctc.OffloadError):
        await session.attach("nic0", EG, kernel.program(), offload="require")
    assert kernel.send("nic0", IN) == "drop"  # the hardware drops it
    assert_consistent(kernel, session)


async def test_offloaded_update_in_hardware(kernel: MockKernel, session: asynctc.Session) -> None:
    kernel.add_device("nic0", offload=True)
    old = kernel.program()
    att = await session.attach("nic0", IN, old, offload="require")
    new = kernel.program()
    assert (await att.update(new)).method == "netlink_replace"
    assert kernel.filters("nic0", IN)[0].prog_id == new.id
    with pytest.raises(asynctc.OffloadError):
        await att.update(kernel.program(offloadable=False))
    kernel.inject_fault("filter_replace_hw", errno.EINVAL)
    with pytest.raises(asynctc.OffloadError):
        await att.update(kernel.program())
    assert kernel.filters("nic0", IN)[0].prog_id == new.id and att.info.prog_id == new.id
    with pytest.raises(asynctc.Conflict):
        await att.update(kernel.program(), expected=old)


# -- legacy mode: positions, qdisc ownership ---------------------------------------------------------
async def test_legacy_positions_map_onto_priorities(kernel: MockKernel, session: asynctc.Session) -> None:
    p = {n: kernel.program("next", name=n) for n in "abcde"}
    a = await session.attach("eth0", IN, p["a"], mode="legacy")
    await session.attach("eth0", IN, p["b"], mode="legacy", position=First())
    await session.attach("eth0", IN, p["c"], mode="legacy", position=Before(a))
    await session.attach("eth0", IN, p["d"], mode="legacy", position=After(a))
    await session.attach("eth0", IN, p["e"], mode="legacy", position=After(p["d"]))
    hook = await session.query("eth0", IN)
    assert hook.prog_ids == tuple(p[n].id for n in "bcade")
    prios = [e.priority for e in hook.entries if e.priority is not None]
    assert prios == sorted(prios) and len(set(prios)) == 5
    assert kernel.qdisc("eth0") is not None
    kernel.send("eth0", IN)
    assert all(x.count() == 1 for x in p.values())
    with pytest.raises(asynctc.AnchorNotFound):
        await session.attach("eth0", IN, kernel.program(), mode="legacy", position=Before(12345))
    explicit = await session.attach("eth0", EG, kernel.program(), mode="legacy", priority=9, handle=3)
    assert (explicit.info.priority, explicit.info.handle) == (9, 3)
    with pytest.raises(asynctc.AlreadyAttached):
        await session.attach("eth0", EG, kernel.program(), mode="legacy", priority=9, handle=3)
    with pytest.raises(TypeError):
        await session.attach("eth0", EG, kernel.program(), colour="red")


async def test_clsact_is_deleted_only_by_its_creator_when_empty(kernel: MockKernel) -> None:
    async with asynctc.open_session(backend="mock", kernel=kernel) as s1:
        a = await s1.attach("eth0", IN, kernel.program(), mode="legacy")
        async with asynctc.open_session(backend="mock", kernel=kernel) as s2:
            b = await s2.attach("eth0", EG, kernel.program(), mode="legacy")
            await a.detach()
            assert kernel.qdisc("eth0") is not None  # s2's filter is still on it
        # s2 did not create the qdisc: it left it; s1 created it, but only deletes it when empty.
        assert b.state is State.DETACHED
        assert kernel.qdisc("eth0") is not None
    assert kernel.qdisc("eth0") is None  # s1 retried at close: now it is empty
    kernel.qdisc_add("eth0", "ingress", creator="tc")
    async with asynctc.open_session(backend="mock", kernel=kernel) as s:
        with pytest.raises(asynctc.AlreadyAttached, match="qdisc"):
            await s.attach("eth0", IN, kernel.program(), mode="legacy")
    assert kernel.qdisc("eth0") is not None and kernel.filters("eth0", IN) == ()


# -- pins --------------------------------------------------------------------------------------------
async def test_pin_and_adopt_in_a_new_session(kernel: MockKernel) -> None:
    prog, legacy_prog = kernel.program("drop"), kernel.program("next")
    async with asynctc.open_session(backend="mock", kernel=kernel) as s1:
        att = await s1.attach("eth0", IN, prog)
        await att.pin("/sys/fs/bpf/a")
        leg = await s1.attach("eth0", EG, legacy_prog, mode="legacy")
        await leg.pin("/sys/fs/bpf/b")
        gone = await s1.attach("veth0", IN, kernel.program())
    assert kernel.hook("eth0", IN).prog_ids == (prog.id,)
    assert kernel.filters("eth0", EG)[0].prog_id == legacy_prog.id
    assert kernel.hook("veth0", IN).prog_ids == ()
    assert gone.state is State.DETACHED
    async with asynctc.open_session(backend="mock", kernel=kernel) as s2:
        again = await s2.adopt_pinned("/sys/fs/bpf/a")
        assert again.info.prog_id == prog.id and again.pinned
        assert await s2.adopt_pinned("/sys/fs/bpf/a") is again
        hook = await s2.query("eth0", IN)
        assert [e.owned for e in hook.entries] == [True]
        leg2 = await s2.adopt_pinned("/sys/fs/bpf/b")
        assert leg2.info.priority is not None
        await again.unpin()
        await leg2.unpin()
        with pytest.raises(asynctc.PinError):
            await s2.adopt_pinned("/sys/fs/bpf/nothing")
    assert kernel_entries(kernel) == set() and kernel.pins() == {} and kernel.links() == ()


async def test_adopting_a_severed_pin(kernel: MockKernel) -> None:
    kernel.add_device("tmp0")
    async with asynctc.open_session(backend="mock", kernel=kernel) as s1:
        att = await s1.attach("tmp0", IN, kernel.program())
        await att.pin("/sys/fs/bpf/t")
    kernel.remove_device("tmp0")
    async with asynctc.open_session(backend="mock", kernel=kernel) as s2:
        with pytest.raises(asynctc.Severed):
            await s2.adopt_pinned("/sys/fs/bpf/t")
    assert kernel.pins() == {} and kernel.links() == ()


# -- orphans -----------------------------------------------------------------------------------------
async def test_reap_orphans(kernel: MockKernel) -> None:
    async with asynctc.open_session(backend="mock", kernel=kernel, owner="svc") as dead:
        orphan = await dead.attach("eth0", IN, kernel.program(name="orphan"), mode="legacy")
        tag = kernel.filters("eth0", IN)[0].name
        kernel.kill_process(tag)  # the process dies; its filters outlive it
        async with asynctc.open_session(backend="mock", kernel=kernel, owner="svc") as live:
            mine = await live.attach("eth0", IN, kernel.program(), mode="legacy")
            kernel.add_foreign_filter("eth0", EG, kernel.program(), priority=3, name="other:1.1.1")
            # The owner tag of a session of this owner whose process does not exist:
            kernel.add_foreign_filter("eth0", EG, kernel.program(), priority=4, name=format_tag("svc:0.1.1", "p"))
            removed = await live.reap_orphans()
            assert {(e.priority, e.owned) for e in removed} == {(orphan.info.priority, False), (4, False)}
            assert [f.name for f in kernel.filters("eth0", IN)] == [kernel.filters("eth0", IN)[0].name]
            assert kernel.filters("eth0", IN)[0].prog_id == mine.info.prog_id
            assert [f.priority for f in kernel.filters("eth0", EG)] == [3]  # never a foreign owner's
            assert await live.reap_orphans() == ()
        with trio.fail_after(10):
            await orphan.wait_severed()  # the dead session's record learns its filter went
    assert orphan.state is State.SEVERED


# -- bad inputs --------------------------------------------------------------------------------------
async def test_bad_inputs_leave_nothing(kernel: MockKernel, session: asynctc.Session) -> None:
    prog = kernel.program()
    with pytest.raises(asynctc.DeviceNotFound):
        await session.attach("nope0", IN, prog)
    with pytest.raises(asynctc.DeviceNotFound):
        await session.attach(999, IN, prog)
    closed = kernel.program()
    closed.close()
    with pytest.raises(asynctc.ProgramError):
        await session.attach("eth0", IN, closed)
    with pytest.raises(asynctc.ProgramError):
        await session.attach("eth0", IN, kernel.program(prog_type=bpf.BPF_PROG_TYPE_XDP))
    with pytest.raises(asynctc.ProgramError):
        await session.attach("eth0", IN, MockKernel().program())  # another kernel's program
    with pytest.raises(ValueError, match="direction"):
        await session.attach("eth0", "sideways", prog)
    with pytest.raises(TypeError, match="position"):
        await session.attach("eth0", IN, prog, position="first")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="anchor"):
        await session.attach("eth0", IN, prog, position=Before("x"))  # type: ignore[arg-type]
    with pytest.raises(asynctc.AnchorNotFound):
        await session.attach("eth0", IN, prog, position=After(kernel.program()))
    with pytest.raises(ValueError, match="offload"):
        await session.attach("eth0", IN, prog, offload="always")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        await session.attach("eth0", IN, prog, mode="hw")
    assert kernel_entries(kernel) == set() and qdiscs(kernel) == {} and kernel.links() == ()
    assert session.attachments == ()


async def test_real_programs_count_on_the_mock(kernel: MockKernel, root: None) -> None:
    from asynctc import programs

    async with asynctc.open_session(backend="mock", kernel=kernel) as s:
        counter = programs.counting("next")  # (`with` would type it as a plain Program)
        with counter, programs.constant("drop") as dropper:
            await s.attach("eth0", IN, dropper)
            await s.attach("eth0", IN, counter, position=First())
            assert kernel.send("eth0", IN, 5) == "drop"
            assert counter.count() == 5


async def test_simulated_program_handle() -> None:
    kernel = MockKernel()
    prog = kernel.program("next", name="x" * 20)
    assert isinstance(prog, SimulatedProgram) and prog.simulated and prog.type == bpf.BPF_PROG_TYPE_SCHED_CLS
    assert prog.name == "x" * 15 and len(prog.tag) == 16 and prog.kernel is kernel
    # its fd is one of its kernel's: a program fd there, nothing the real kernel knows
    assert kernel.bpf.fd_object_kind(prog.fd) == "prog" and kernel.bpf.prog_info(prog.fd).id == prog.id
    with pytest.raises(ValueError, match="verdict"):
        kernel.program("maybe")  # type: ignore[arg-type]
    fd = prog.fd
    prog.close()
    assert prog.closed and fd not in kernel.fds()
    with pytest.raises(asynctc.ProgramError, match="closed"):
        _ = prog.fd
    await trio.lowlevel.checkpoint()


async def test_a_failed_detach_still_releases_the_link(kernel: MockKernel, session: asynctc.Session) -> None:
    """As the real backend closes its link fd whatever the kernel answered, the mock releases its link
    when a step of detach fails: the failure is reported, the link is not leaked."""
    import errno

    att = await session.attach("eth0", IN, kernel.program())
    kernel.inject_fault("link_detach", errno.EIO)
    with pytest.raises(asynctc.TCError, match="EIO"):
        await att.detach()
    assert kernel.links() == ()


async def test_adopting_a_pinned_link_names_the_mocks_device(kernel: MockKernel) -> None:
    """The device of an adopted link is named by the session's kernel, never by the host (whose ifindex
    of the same number is another device, or none)."""
    kernel.add_device("mockonly0")
    async with asynctc.open_session("mock", kernel=kernel) as s1:
        att = await s1.attach("mockonly0", IN, kernel.program())
        await att.pin("/sys/fs/bpf/mockonly")
    async with asynctc.open_session("mock", kernel=kernel) as s2:
        adopted = await s2.adopt_pinned("/sys/fs/bpf/mockonly")
        assert (adopted.info.dev, adopted.info.ifindex) == ("mockonly0", att.info.ifindex)
        await adopted.detach()
    assert kernel_entries(kernel) == set() and kernel.pins() == {}


async def test_locks_are_the_kernels_own() -> None:
    """Device locks and pin claims live in the MockKernel: sessions on one kernel exclude each other, two
    kernels never wait for each other, and nothing is created on the host."""
    from asynctc.lowlevel.devlock import lock_directory

    host_locks = set(os.listdir(lock_directory()))
    slow, other = MockKernel(), MockKernel()
    slow.set_latency(1.0, op="filter_add")  # holds eth0's device lock in `slow` for a second
    took: list[float] = []

    async def attach(kernel: MockKernel) -> None:
        async with asynctc.open_session("mock", kernel=kernel) as s:
            start = trio.current_time()
            await s.attach("eth0", IN, kernel.program(), mode="legacy")
            took.append(trio.current_time() - start)

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(attach, slow)
            await trio.sleep(0.1)
            n.start_soon(attach, other)  # same device name and ifindex, another kernel: no wait
    assert min(took) < 0.5
    async with asynctc.open_session("mock", kernel=other) as a, asynctc.open_session("mock", kernel=other) as b:
        att = await a.attach("eth0", IN, other.program())
        await att.pin("/sys/fs/bpf/claimed")
        with pytest.raises(asynctc.NotOwned, match="held by a live asynctc session"):
            await b.adopt_pinned("/sys/fs/bpf/claimed")
        async with asynctc.open_session("mock", kernel=slow) as c:  # the same path on another kernel: no claim
            with pytest.raises(asynctc.TCError):
                await c.adopt_pinned("/sys/fs/bpf/claimed")  # nothing pinned there in that kernel
        await att.unpin()
    assert set(os.listdir(lock_directory())) == host_locks


async def test_a_killed_sessions_pin_claim_is_gone(kernel: MockKernel) -> None:
    """As a dead process's flock: once the session holding a pin is killed, another session adopts it."""
    async with asynctc.open_session("mock", kernel=kernel) as a, asynctc.open_session("mock", kernel=kernel) as b:
        att = await a.attach("eth0", IN, kernel.program(), mode="legacy")
        await att.pin("/sys/fs/bpf/crashed")
        with pytest.raises(asynctc.NotOwned, match="held by a live asynctc session"):
            await b.adopt_pinned("/sys/fs/bpf/crashed")
        kernel.kill_process(kernel.filters("eth0", IN)[0].name)
        adopted = await b.adopt_pinned("/sys/fs/bpf/crashed")
        assert adopted.info.prog_id == att.info.prog_id
        await adopted.unpin()
