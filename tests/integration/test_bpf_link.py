"""The bpf_link backend on the real kernel: one fresh namespace (and veth pair) per test."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import trio
from _children import CHILD_TIMEOUT, stop

import asynctc
from asynctc import After, Before, Direction, First, Last, programs
from asynctc.lowlevel import bpf
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.testing import VethPair, ip, run_without_capabilities, send_frames

pytestmark = pytest.mark.kernel


def ids(hook: asynctc.Hook) -> list[int]:
    return [e.prog_id for e in hook.entries]


async def frames(veth: VethPair, count: int) -> None:
    """Send frames from the peer end: they cross veth0's ingress hook."""
    await trio.to_thread.run_sync(lambda: send_frames(veth.b, count, netns=veth.netns_b))


async def test_probe_and_auto_selects_bpf_link(netns: str) -> None:
    async with asynctc.open_session(netns=netns) as s:
        assert s.backend_name == "bpf_link"
        probes = await s.probe()
        assert probes["bpf_link"].available, probes["bpf_link"].reason


async def test_ordering_with_every_anchor_kind(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        p = [programs.constant("next", name=f"p{i}") for i in range(7)]
        a0 = await s.attach("veth0", "ingress", p[0])  # [0]
        a1 = await s.attach("veth0", "ingress", p[1], position=First())  # [1 0]
        await s.attach("veth0", "ingress", p[2], position=Last())  # [1 0 2]
        await s.attach("veth0", "ingress", p[3], position=Before(a0))  # by attachment (link id)
        await s.attach("veth0", "ingress", p[4], position=After(p[1]))  # by program
        await s.attach("veth0", "ingress", p[5], position=Before(p[2].id))  # by program id
        await s.attach("veth0", "ingress", p[6], position=After(a1))  # by attachment
        hook = await s.query("veth0", Direction.INGRESS)
        assert ids(hook) == [p[i].id for i in (1, 6, 4, 3, 0, 5, 2)]
        assert all(e.owned and e.kind == "tcx" and e.link_id for e in hook.entries)
        assert [e.prog_name for e in hook.entries][:2] == ["p1", "p6"]
        assert all(len(e.prog_tag) == 16 for e in hook.entries)
        # an anchor that is not on the hook
        stray = programs.constant("pass")
        with pytest.raises(asynctc.AnchorNotFound):
            await s.attach("veth0", "ingress", programs.constant("pass"), position=Before(stray))
        assert len((await s.query("veth0", "ingress")).entries) == 7


async def test_revisions_and_stale_revision(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        assert (await s.query("veth0", "egress")).revision == 1
        a = await s.attach("veth0", "egress", programs.constant("pass"), expected_revision=1)
        assert (await s.query("veth0", "egress")).revision == 2
        with pytest.raises(asynctc.StaleRevision) as exc:
            await s.attach("veth0", "egress", programs.constant("pass"), expected_revision=1)
        assert exc.value.errno == errno.ESTALE
        assert "query() again" in str(exc.value)
        b = await s.attach("veth0", "egress", programs.constant("pass"), expected_revision=2)
        await b.detach()
        assert (await s.query("veth0", "egress")).revision == 4
        await a.detach()
        # the hook was freed: the revision starts again at 1 (no clsact holds the tc state)
        assert (await s.query("veth0", "egress")).revision == 1


async def test_already_attached(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        prog = programs.constant("pass")
        await s.attach("veth0", "ingress", prog)
        with pytest.raises(asynctc.AlreadyAttached) as exc:
            await s.attach("veth0", "ingress", prog)
        assert exc.value.errno == errno.EEXIST
        assert len(s.attachments) == 1


async def test_hook_full_at_the_64th_program(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        progs = [programs.constant("next") for _ in range(64)]
        async with trio.open_nursery() as n:
            for p in progs[:63]:
                n.start_soon(s.attach, "veth0", "ingress", p)
        assert len((await s.query("veth0", "ingress")).entries) == 63
        with pytest.raises(asynctc.HookFull) as exc:
            await s.attach("veth0", "ingress", progs[63])
        assert exc.value.errno == errno.ERANGE
        assert len(s.attachments) == 63
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        assert (await s.query("veth0", "ingress")).entries == ()


async def test_update_in_place_and_packets_show_which_program_ran(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        first = programs.counting("next")
        last = programs.counting("pass")
        a_last = await s.attach("veth0", "ingress", last)
        a_first = await s.attach("veth0", "ingress", first, position=Before(a_last))
        await frames(veth, 10)
        # run order: first says "next", so last sees every frame too
        assert first.count() == 10 and last.count() == 10

        replacement = programs.counting("drop")
        result = await a_first.update(replacement, expected=first)
        assert result.method == "link_update"
        assert result.revision == (await s.query("veth0", "ingress")).revision
        assert a_first.info.prog_id == replacement.id
        await frames(veth, 7)
        # the new program drops: the old one saw nothing more, the one after it neither
        assert (first.count(), replacement.count(), last.count()) == (10, 7, 10)

        # without expected: unconditional
        again = programs.counting("next")
        assert (await a_first.update(again)).method == "link_update"
        await frames(veth, 3)
        assert (again.count(), last.count()) == (3, 13)


async def test_update_conflict_leaves_the_old_program_running(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        running = programs.counting("pass")
        att = await s.attach("veth0", "ingress", running)
        rev = (await s.query("veth0", "ingress")).revision
        with pytest.raises(asynctc.Conflict):
            await att.update(programs.counting("drop"), expected=programs.constant("pass"))
        hook = await s.query("veth0", "ingress")
        assert ids(hook) == [running.id] and hook.revision == rev
        assert att.info.prog_id == running.id
        await frames(veth, 4)
        assert running.count() == 4


async def test_make_before_break_when_the_kernel_refuses_in_place(
    veth: VethPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise bpf.BpfError(errno.EOPNOTSUPP, "link_update")

    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        head = programs.counting("next")
        old = programs.counting("pass")
        tail = programs.counting("pass")
        await s.attach("veth0", "ingress", head)
        att = await s.attach("veth0", "ingress", old)
        await s.attach("veth0", "ingress", tail)
        old_link = att.info.link_id
        monkeypatch.setattr(bpf.LINUX, "link_update", refuse)
        new = programs.counting("pass")
        result = await att.update(new, expected=old)
        assert result.method == "make_before_break"
        hook = await s.query("veth0", "ingress")
        # same place in the run order, a new link
        assert ids(hook) == [head.id, new.id, tail.id]
        assert att.info.link_id != old_link and att.info.prog_id == new.id
        assert hook.revision == result.revision
        await frames(veth, 5)
        assert (head.count(), old.count(), new.count(), tail.count()) == (5, 0, 5, 0)
        # compare-and-swap holds on the fallback path too
        with pytest.raises(asynctc.Conflict):
            await att.update(programs.counting("pass"), expected=old)
        assert ids(await s.query("veth0", "ingress")) == [head.id, new.id, tail.id]
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        assert (await s.query("veth0", "ingress")).entries == ()


async def test_make_before_break_rolls_back_when_a_step_fails(
    veth: VethPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_detach = bpf.link_detach

    def refuse(*args: object, **kwargs: object) -> None:
        raise bpf.BpfError(errno.EINVAL, "link_update")

    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        old = programs.counting("pass")
        att = await s.attach("veth0", "ingress", old)
        monkeypatch.setattr(bpf.LINUX, "link_update", refuse)
        calls = []

        def failing_detach(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 1:  # the old link's detach fails: the new link must go again
                raise bpf.BpfError(errno.EBUSY, "link_detach")
            real_detach(fd)

        monkeypatch.setattr(bpf.LINUX, "link_detach", failing_detach)
        with pytest.raises(asynctc.TCError) as exc:
            await att.update(programs.counting("pass"))
        assert "rolled back" in "".join(getattr(exc.value, "__notes__", []))
        monkeypatch.setattr(bpf.LINUX, "link_detach", real_detach)
        hook = await s.query("veth0", "ingress")
        assert ids(hook) == [old.id] and att.info.prog_id == old.id
        await frames(veth, 3)
        assert old.count() == 3


async def test_device_deletion_severs_every_link(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        atts = [await s.attach("veth0", d, programs.constant("pass")) for d in ("ingress", "egress")]
        async with s.open_monitor() as mon:
            ip("link", "del", "veth0", netns=veth.netns_a)
            for a in atts:
                with trio.fail_after(10):
                    await a.wait_severed()
                assert a.state is asynctc.State.SEVERED
            severed = set()
            with trio.fail_after(10):
                async for ev in mon:
                    if isinstance(ev, asynctc.events.AttachmentSevered):
                        severed.add(id(ev.attachment))
                        if len(severed) == 2:
                            break
        for a in atts:
            await a.detach()  # a no-op
            assert a.state is asynctc.State.SEVERED
        assert s.attachments == ()
        with pytest.raises(asynctc.Severed):
            await atts[0].update(programs.constant("drop"))


async def test_namespace_deletion_severs(netns: str) -> None:
    from asynctc.testing import create_netns, delete_netns, unique_name, veth_pair

    doomed = create_netns(unique_name("atcd"))
    try:
        veth_pair(doomed, "vd0", netns, "vd1")
        async with asynctc.open_session("bpf_link", netns=doomed) as s:
            att = await s.attach("vd0", "ingress", programs.constant("pass"))
            delete_netns(doomed)
            with trio.fail_after(15):
                await att.wait_severed()
            assert att.state is asynctc.State.SEVERED
            await att.detach()
    finally:
        delete_netns(doomed)


def _tcx_ingress_count(netns: str, dev: str) -> tuple[int, int]:
    """(ifindex, number of tcx ingress programs) of `dev` as a thread inside `netns` sees them."""

    def count() -> tuple[int, int]:
        ifindex = socket.if_nametoindex(dev)
        return ifindex, len(bpf.prog_query(ifindex, bpf.BPF_TCX_INGRESS).prog_ids)

    return NetnsRunner(netns, trio.CapacityLimiter(1)).call_in_netns(count)


async def test_a_link_whose_device_moved_to_another_namespace_is_detached(veth: VethPair) -> None:
    """A tcx link stays attached to a device moved to another namespace: gone from the session's namespace
    is no proof of a severed link. detach() detaches it (and says so: DETACHED, not SEVERED), leaving
    nothing on the device in its new namespace."""
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        with trio.fail_after(30):
            att = await s.attach(veth.a, "ingress", programs.constant("pass"))
            ip("link", "set", "dev", veth.a, "netns", veth.netns_b, netns=veth.netns_a)
            with pytest.raises(asynctc.DeviceNotFound):
                await s.resolve_device(veth.a)
            assert _tcx_ingress_count(veth.netns_b, veth.a)[1] == 1  # still attached, over there
            await att.detach()
            assert att.state is asynctc.State.DETACHED
            assert _tcx_ingress_count(veth.netns_b, veth.a)[1] == 0
            assert s.attachments == ()


async def test_a_link_whose_device_was_renamed_is_detached(veth: VethPair) -> None:
    """A renamed device is not the name the link was attached under: the link info decides, and the link,
    still attached, is detached (DETACHED)."""
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        with trio.fail_after(30):
            att = await s.attach(veth.a, "ingress", programs.constant("pass"))
            ip("link", "set", "dev", veth.a, "down", netns=veth.netns_a)
            ip("link", "set", "dev", veth.a, "name", "renamed0", netns=veth.netns_a)
            assert await s.resolve_device(att.info.ifindex) == (att.info.ifindex, "renamed0")
            await att.detach()
            assert att.state is asynctc.State.DETACHED
            assert _tcx_ingress_count(veth.netns_a, "renamed0") == (att.info.ifindex, 0)


async def test_pin_survives_the_session_and_is_adopted(veth: VethPair, bpffs: str) -> None:
    path = os.path.join(bpffs, "ingress_link")
    prog = programs.counting("pass")
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        att = await s.attach("veth0", "ingress", prog)
        link_id = att.info.link_id
        await att.pin(path)
        assert att.info.pinned == path
    # the session closed: the pinned link is still there and still runs
    await frames(veth, 2)
    assert prog.count() == 2
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        hook = await s.query("veth0", "ingress")
        assert [(e.link_id, e.owned) for e in hook.entries] == [(link_id, False)]
        adopted = await s.adopt_pinned(path)
        assert adopted.info.link_id == link_id and adopted.info.pinned == path
        assert adopted.info.dev == "veth0" and adopted.info.direction is Direction.INGRESS
        assert (await s.query("veth0", "ingress")).entries[0].owned
        await adopted.unpin()
        assert not os.path.exists(path)
        await adopted.detach()
        assert (await s.query("veth0", "ingress")).entries == ()


async def test_unpinned_links_die_with_a_killed_process(veth: VethPair) -> None:
    code = textwrap.dedent(f"""
        import sys, trio, asynctc
        from asynctc import programs
        async def main():
            async with asynctc.open_session("bpf_link", netns={veth.netns_a!r}) as s:
                await s.attach("veth0", "ingress", programs.constant("pass"))
                print("attached", flush=True)
                await trio.sleep_forever()
        trio.run(main)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
        assert line.strip() == "attached"
        async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
            assert len((await s.query("veth0", "ingress")).entries) == 1
            os.kill(proc.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(proc.wait, CHILD_TIMEOUT)
            # the kernel released the link with the process's last fd, before the process was reaped
            assert (await s.query("veth0", "ingress")).entries == ()
    finally:
        stop(proc)


async def test_bad_inputs_are_specific_and_leave_nothing(veth: VethPair, bpffs: str) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        prog = programs.constant("pass")
        with pytest.raises(asynctc.DeviceNotFound, match="no device named 'nope0'"):
            await s.attach("nope0", "ingress", prog)
        # an ifindex of another namespace: veth1's index means nothing (or another device) here
        with pytest.raises(asynctc.DeviceNotFound, match="only valid in its own namespace"):
            await s.attach(4242, "ingress", prog)
        with pytest.raises(ValueError, match="'ingress' or 'egress'"):
            await s.attach("veth0", "sideways", prog)
        closed = programs.constant("pass")
        closed.close()
        with pytest.raises(asynctc.ProgramError, match="closed"):
            await s.attach("veth0", "ingress", closed)
        xdp_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_XDP, bpf.asm.mov64_imm(0, 2) + bpf.asm.exit())
        sock_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_SOCKET_FILTER, bpf.asm.mov64_imm(0, 0) + bpf.asm.exit())
        try:
            for fd, kind in ((xdp_fd, "XDP"), (sock_fd, "SOCKET_FILTER")):
                with asynctc.Program.from_fd(fd) as wrong:
                    with pytest.raises(asynctc.ProgramError, match=f"{kind} program.*SCHED_CLS"):
                        await s.attach("veth0", "ingress", wrong)
        finally:
            os.close(xdp_fd)
            os.close(sock_fd)
        with pytest.raises(asynctc.ProgramError, match="not open"):
            asynctc.Program.from_fd(987654)
        with pytest.raises(TypeError, match="position"):
            await s.attach("veth0", "ingress", prog, position="first")  # type: ignore[arg-type]
        with pytest.raises(asynctc.OffloadError, match="netlink"):
            await s.attach("veth0", "ingress", prog, offload="require")
        att = await s.attach("veth0", "ingress", prog)
        with pytest.raises(asynctc.PinError, match="bpffs"):
            await att.pin("/tmp/not-bpffs-link")
        with pytest.raises(asynctc.PinError, match="directory"):
            await att.pin(os.path.join(bpffs, "missing-dir", "link"))
        with pytest.raises(asynctc.PinError, match="nothing is pinned"):
            await s.adopt_pinned(os.path.join(bpffs, "nothing"))
        assert not att.pinned
        await att.detach()
        assert (await s.query("veth0", "ingress")).entries == ()
        assert (await s.query("veth0", "egress")).entries == ()


async def test_offload_prefer_attaches_in_software(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        att = await s.attach("veth0", "ingress", programs.constant("pass"), offload="prefer")
        assert att.info.offloaded is False and att.info.backend == "bpf_link"


def test_without_capabilities_errors_name_the_capability(veth: VethPair) -> None:
    """A process without capabilities (root with an empty bounding set) gets errors that name what is
    missing: loading needs CAP_BPF, the session's backend is unavailable and says why, and reading a hook
    needs CAP_NET_ADMIN. (Kernel fact, 6.18: BPF_LINK_CREATE itself needs no capability when handed a
    program fd; the fd is the privilege.)"""
    code = textwrap.dedent("""
        import socket, trio, asynctc
        from asynctc.lowlevel import bpf
        async def main():
            try:
                asynctc.programs.constant("pass")
            except asynctc.PermissionDenied as exc:
                print("load:", exc, flush=True)
            try:
                async with asynctc.open_session("bpf_link"):
                    pass
            except asynctc.BackendUnavailable as exc:
                print("session:", exc, flush=True)
            try:
                bpf.prog_query(socket.if_nametoindex("veth0"), bpf.BPF_TCX_INGRESS)
            except bpf.BpfError as exc:
                err = asynctc.from_errno(exc.errno, op=exc.op, dev="veth0", direction="ingress")
                print("query:", type(err).__name__, err, flush=True)
        trio.run(main)
    """)
    proc = run_without_capabilities(code, netns=veth.netns_a)
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, (proc.stdout, proc.stderr)
    assert lines[0].startswith("load:") and "CAP_BPF" in lines[0]
    assert lines[1].startswith("session:") and "CAP_BPF" in lines[1]
    assert lines[2].startswith("query: PermissionDenied") and "CAP_NET_ADMIN" in lines[2]
