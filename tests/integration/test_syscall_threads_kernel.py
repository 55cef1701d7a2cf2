"""The syscall threads on the real kernel: namespaces, cancellation storms that must leak no link, closing
with the session, and the bpf_link backend's device resolution through them."""

from __future__ import annotations

import errno
import os
import random
import socket

import pytest
import trio

import asynctc
from asynctc import programs
from asynctc.lowlevel import bpf
from asynctc.lowlevel.kernel import LINUX
from asynctc.lowlevel.netdev import resolve_device
from asynctc.lowlevel.netns import NetnsRunner, current_netns_inode, netns_path
from asynctc.lowlevel.syscalls import SyscallThreads
from asynctc.testing import VethPair, ip

pytestmark = pytest.mark.kernel

DEADLINE = 60
PIDFD_THREAD = os.O_EXCL  # pidfd_open flag: a pidfd for one thread (Linux >= 6.9)


def where_am_i(dev: str, other: str) -> tuple[int, bool, int]:
    """(ifindex of dev, whether `other` exists, namespace inode), as the calling thread sees them."""
    try:
        socket.if_nametoindex(other)
        other_seen = True
    except OSError:
        other_seen = False
    return socket.if_nametoindex(dev), other_seen, current_netns_inode()


def hook_count(runner: NetnsRunner, dev: str) -> int:
    def count() -> int:
        return len(bpf.prog_query(socket.if_nametoindex(dev), bpf.BPF_TCX_INGRESS).prog_ids)

    return runner.call_in_netns(count)


async def test_each_thread_works_in_its_own_namespace(veth: VethPair) -> None:
    """Calls for namespace A see A's devices and calls for B see B's, however the calls interleave."""
    home = current_netns_inode()
    runner_a = NetnsRunner(veth.netns_a, trio.CapacityLimiter(4))
    runner_b = NetnsRunner(veth.netns_b, trio.CapacityLimiter(4))
    pool_a = SyscallThreads(runner_a, max_threads=4, slow=0)
    pool_b = SyscallThreads(runner_b, max_threads=4, slow=0)
    ino_a = os.stat(netns_path(veth.netns_a)).st_ino
    ino_b = os.stat(netns_path(veth.netns_b)).st_ino
    seen: list[tuple[str, tuple[int, bool, int]]] = []

    async def ask(side: str) -> None:
        if side == "a":
            seen.append(("a", await pool_a.run(where_am_i, veth.a, veth.b)))
        else:
            seen.append(("b", await pool_b.run(where_am_i, veth.b, veth.a)))

    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:
                for i in range(200):
                    n.start_soon(ask, "ab"[i % 2])
        assert pool_a.threads >= 1 and pool_b.threads >= 1
    finally:
        await pool_a.aclose()
        await pool_b.aclose()
        runner_a.close()
        runner_b.close()
    index_a = runner_index(veth.netns_a, veth.a)
    index_b = runner_index(veth.netns_b, veth.b)
    assert len(seen) == 200
    for side, (index, other_seen, ino) in seen:
        assert not other_seen
        assert (index, ino) == ((index_a, ino_a) if side == "a" else (index_b, ino_b))
    assert current_netns_inode() == home  # the trio thread never moved


def runner_index(netns: str, dev: str) -> int:
    runner = NetnsRunner(netns, trio.CapacityLimiter(1))
    try:
        return runner.call_in_netns(socket.if_nametoindex, dev)
    finally:
        runner.close()


async def test_a_namespace_that_is_gone_fails_calls_and_runs_nothing(netns: str) -> None:
    runner = NetnsRunner(netns, trio.CapacityLimiter(1))
    runner.close("the namespace was deleted")
    pool = SyscallThreads(runner)
    ran: list[int] = []
    try:
        with trio.fail_after(DEADLINE), pytest.raises(asynctc.TCError, match="is gone"):
            await pool.run(ran.append, 1)
    finally:
        await pool.aclose()
    assert ran == [] and pool.threads == 0


async def test_cancelling_in_the_middle_of_a_batch_leaks_no_link(veth: VethPair) -> None:
    """64 link creations at once, all cancelled once 10 have come back: each link either reached its caller
    (who closes it) or was never made (withdrawn) or was closed by `discard` (made for a caller who had
    left). The kernel's hook is empty afterwards."""
    runner = NetnsRunner(veth.netns_a, trio.CapacityLimiter(8))
    pool = SyscallThreads(runner, max_threads=8, slow=0)
    progs = [programs.constant("pass", name=f"storm{i}") for i in range(64)]
    ifindex = runner_index(veth.netns_a, veth.a)
    fds: list[int] = []
    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:

                async def create(prog: asynctc.Program) -> None:
                    fd = await pool.run(bpf.link_create_tcx, prog.fd, ifindex, bpf.BPF_TCX_INGRESS,
                                        discard=os.close)
                    fds.append(fd)  # no checkpoint between the result and taking ownership of it
                    if len(fds) == 10:
                        n.cancel_scope.cancel()

                for prog in progs:
                    n.start_soon(create, prog)
            assert len(fds) >= 10
            with trio.CancelScope(shield=True):
                for fd in fds:
                    await pool.run(os.close, fd, must_run=True)
            await pool.aclose()  # every call still queued or running ends (and is discarded) first
        assert hook_count(runner, veth.a) == 0
    finally:
        await pool.aclose()
        runner.close()
        for p in progs:
            p.close()


async def test_a_cancellation_storm_on_a_session_leaves_kernel_and_session_in_agreement(veth: VethPair) -> None:
    rng = random.Random(14)
    progs = [programs.constant("pass", name=f"c{i}") for i in range(24)]
    try:
        async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
            with trio.fail_after(DEADLINE):

                async def lifecycle(prog: asynctc.Program, delays: list[float]) -> None:
                    for delay in delays:
                        with trio.move_on_after(delay):
                            if delay < 0.002:
                                await s.attach(veth.a, "ingress", prog)  # may stay attached: the session owns it
                                return
                            async with s.open_attachment(veth.a, "ingress", prog):
                                await trio.sleep(delay / 2)

                async with trio.open_nursery() as n:
                    for prog in progs:
                        n.start_soon(lifecycle, prog, [rng.uniform(0, 0.02) for _ in range(8)])
                hook = await s.query(veth.a, "ingress")
                assert {e.link_id for e in hook.entries} == {a.info.link_id for a in s.attachments}
                assert all(e.owned for e in hook.entries)
        async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
            assert (await s.query(veth.a, "ingress")).entries == ()  # the session detached what it held
    finally:
        for p in progs:
            p.close()


def _syscall_thread_ids() -> list[int]:
    tids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "atc-bpf_link":
                    tids.append(int(tid))
        except FileNotFoundError:
            continue
    return tids


async def _wait_thread_gone(tid: int) -> None:
    try:
        pidfd = os.pidfd_open(tid, PIDFD_THREAD)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)  # readable once the thread has exited
    finally:
        os.close(pidfd)


async def test_the_session_stops_its_syscall_threads_when_it_closes(veth: VethPair) -> None:
    before = set(_syscall_thread_ids())
    with trio.fail_after(DEADLINE):
        async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
            async with s.open_attachment(veth.a, "ingress", programs.constant("pass")):
                pass
            ours = set(_syscall_thread_ids()) - before
            assert ours, "the session's bpf calls ran in no syscall thread"
        for tid in ours:
            await _wait_thread_gone(tid)
    assert not ours & set(_syscall_thread_ids())


async def test_device_names_answer_for_the_namespace_they_were_opened_in(veth: VethPair) -> None:
    """`LINUX.open_device_names()` made in a thread inside namespace A answers for A from any thread (here
    the trio thread, which is in the caller's namespace): SIOCGIFINDEX finds alternative names too, and
    SIOCGIFNAME gives the device's own name, which `netdev.resolve_device` returns."""
    ip("link", "property", "add", "dev", veth.a, "altname", "names-alt-0", netns=veth.netns_a)
    runner = NetnsRunner(veth.netns_a, trio.CapacityLimiter(1))
    in_a = runner.call_in_netns(socket.if_nametoindex, veth.a)
    names = await runner.run(LINUX.open_device_names)
    try:
        assert names.if_nametoindex(veth.a) == in_a
        assert names.if_nametoindex("names-alt-0") == in_a
        assert names.if_indextoname(in_a) == veth.a
        assert names.if_nametoindex("lo") == 1
        for missing in (veth.b, "nosuchdev", "x" * 16, ""):  # B's device, none, too long, empty
            with pytest.raises(OSError, match="(?i)no (such )?device") as by_name:
                names.if_nametoindex(missing)
            assert by_name.value.errno == errno.ENODEV, missing
        for absent in (0x7FFFFFF0, 0, -1, 1 << 40):
            with pytest.raises(OSError, match="no device with ifindex") as by_index:
                names.if_indextoname(absent)
            assert by_index.value.errno == errno.ENXIO, absent
        # from a thread in yet another namespace (B's), still A's answers
        assert await NetnsRunner(veth.netns_b, trio.CapacityLimiter(1)).run(names.if_nametoindex, veth.a) == in_a
        # netdev.resolve_device on them: the own name, and the clear DeviceNotFound of every resolver
        where = f"network namespace {veth.netns_a!r}"
        assert resolve_device("names-alt-0", veth.netns_a, names) == (in_a, veth.a)
        assert resolve_device(in_a, veth.netns_a, names) == (in_a, veth.a)
        with pytest.raises(asynctc.DeviceNotFound, match=f"no device named {veth.b!r} in {where}"):
            resolve_device(veth.b, veth.netns_a, names)
        with pytest.raises(asynctc.DeviceNotFound, match=f"no device with ifindex 999 in {where}"):
            resolve_device(999, veth.netns_a, names)
        with pytest.raises(asynctc.DeviceNotFound, match="not a valid device name"):
            resolve_device("x" * 16, veth.netns_a, names)
        with pytest.raises(asynctc.DeviceNotFound, match="must be positive"):
            resolve_device(0, veth.netns_a, names)
        with pytest.raises(TypeError, match="device name or an ifindex"):
            resolve_device(True, veth.netns_a, names)
        # the kernel itself, in a thread inside the namespace, agrees
        assert await runner.run(resolve_device, "names-alt-0", veth.netns_a, LINUX) == (in_a, veth.a)
    finally:
        names.close()
        names.close()
    with pytest.raises(OSError, match="closed") as closed:
        names.if_nametoindex(veth.a)
    assert closed.value.errno == errno.EBADF


async def test_devices_resolve_in_the_session_namespace(veth: VethPair) -> None:
    ip("link", "property", "add", "dev", veth.a, "altname", "uplink-alt-0", netns=veth.netns_a)
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        with trio.fail_after(DEADLINE):
            ifindex, name = await s.resolve_device("uplink-alt-0")
            assert name == veth.a  # an alternative name resolves to the device's own name
            assert await s.resolve_device(ifindex) == (ifindex, veth.a)
            att = await s.attach("uplink-alt-0", "ingress", programs.constant("pass"))
            assert (att.info.dev, att.info.ifindex) == (veth.a, ifindex)
            for missing in (veth.b, "nosuchdev", 0x7FFFFFF0):
                with pytest.raises(asynctc.DeviceNotFound) as exc:
                    await s.attach(missing, "ingress", programs.constant("pass"))
                assert exc.value.errno == errno.ENODEV
            with pytest.raises(ValueError, match="an ifindex must be in 1.."):
                await s.attach(1 << 40, "ingress", programs.constant("pass"))
            with pytest.raises(TypeError):
                await s.resolve_device(1.5)  # type: ignore[arg-type]
            assert len((await s.query(veth.a, "ingress")).entries) == 1
