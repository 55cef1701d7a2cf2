"""MockKernel's rtnetlink side driven by asynctc's REAL transport, multicast socket and event source (no
privileges: the runner stays in the caller's namespace and every socket is MockKernel's)."""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import AsyncIterator, Iterator

import pytest
import trio

from asynctc import Direction
from asynctc.events import DeviceAdded, DeviceRemoved, FilterAdded, FilterRemoved, QdiscAdded, Resynced
from asynctc.lowlevel import codec as c
from asynctc.lowlevel.events import open_netlink_event_source
from asynctc.lowlevel.multicast import EventsLost, open_multicast_socket
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.lowlevel.transport import NetlinkError, NetlinkTransport, open_transport
from asynctc_mock import KernelError, MockKernel
from asynctc_mock._rtnl import MockNetlinkSocket

NEW = c.NLM_F_REQUEST | c.NLM_F_ACK | c.NLM_F_CREATE | c.NLM_F_EXCL
REPLACE = c.NLM_F_REQUEST | c.NLM_F_ACK | c.NLM_F_REPLACE
IN = c.INGRESS_PARENT


@pytest.fixture
def runner() -> Iterator[NetnsRunner]:
    r = NetnsRunner(None, trio.CapacityLimiter(4))
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
async def nl(kernel: MockKernel, runner: NetnsRunner) -> AsyncIterator[NetlinkTransport]:
    async with open_transport(runner, kernel=kernel) as transport:
        yield transport


def add(ifindex: int, prio: int, handle: int, fd: int, flags: int = NEW, parent: int = IN,
        name: str | None = "n", gen: int = 0) -> bytes:
    return c.encode_filter(0, c.RTM_NEWTFILTER, flags, ifindex, parent, prio, handle, prog_fd=fd, name=name,
                           gen_flags=gen)


async def filters(nl: NetlinkTransport, ifindex: int, parent: int = IN) -> list[c.FilterMsg]:
    msgs = await nl.dump(lambda seq: c.encode_dump_request(seq, c.RTM_GETTFILTER, ifindex, parent))
    return [m for m in msgs if isinstance(m, c.FilterMsg)]


async def test_requests_errors_with_extack_and_echo(kernel: MockKernel, nl: NetlinkTransport) -> None:
    eth0 = kernel.devices()["eth0"]
    prog = kernel.program("drop", name="p")
    fd = prog.fd
    with pytest.raises(NetlinkError) as e:
        await nl.request(add(eth0, 1, 1, fd))
    assert (e.value.errno, e.value.extack) == (errno.EINVAL, "Parent Qdisc doesn't exists")
    await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, eth0))
    with pytest.raises(NetlinkError) as e:
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, eth0))
    assert (e.value.errno, e.value.extack) == (errno.EEXIST, "Exclusivity flag on, cannot modify")
    echoed = await nl.request(add(eth0, 0, 0, fd, NEW | c.NLM_F_ECHO))
    (f,) = echoed
    assert isinstance(f, c.FilterMsg)
    assert (f.priority, f.handle, f.kind, f.bpf_id, f.bpf_name, f.bpf_tag) == (0xC000, 1, "bpf", prog.id, "n", prog.tag)
    assert (f.bpf_flags, f.gen_flags, f.parent) == (c.TCA_BPF_FLAG_ACT_DIRECT, c.TCA_CLS_FLAGS_NOT_IN_HW, IN)
    with pytest.raises(NetlinkError) as e:
        await nl.request(add(eth0, 0xC000, 1, fd))
    assert (e.value.errno, e.value.extack) == (errno.EEXIST, "Filter already exists")
    with pytest.raises(NetlinkError) as e:  # veth-like devices cannot offload: cls_bpf says EOPNOTSUPP
        await nl.request(add(eth0, 5, 1, fd, gen=c.TCA_CLS_FLAGS_SKIP_SW))
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(NetlinkError) as e:  # a replacement may not change skip_sw/skip_hw
        await nl.request(add(eth0, 0xC000, 1, fd, REPLACE, gen=c.TCA_CLS_FLAGS_SKIP_HW))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(NetlinkError) as e:
        await nl.request(add(eth0, 0xC000, 9, fd, REPLACE))
    assert e.value.errno == errno.ENOENT
    got = await nl.request(lambda seq: c.encode_filter_get(seq, eth0, IN, 0xC000, 1))
    assert [m.handle for m in got if isinstance(m, c.FilterMsg)] == [1]
    await nl.request(lambda seq: c.encode_filter(seq, c.RTM_DELTFILTER, c.NLM_F_REQUEST | c.NLM_F_ACK, eth0, IN,
                                                 0xC000, 1))
    with pytest.raises(NetlinkError) as e:
        await nl.request(lambda seq: c.encode_filter_get(seq, eth0, IN, 0xC000, 1))
    assert (e.value.errno, e.value.extack) == (errno.EINVAL, "Cannot find specified filter chain")
    with pytest.raises(NetlinkError) as e:
        await nl.request(lambda seq: c.encode_link_get(seq, name="nope0"))
    assert e.value.errno == errno.ENODEV
    (link,) = await nl.request(lambda seq: c.encode_link_get(seq, name="eth0"))
    assert isinstance(link, c.LinkMsg) and (link.ifindex, link.name) == (eth0, "eth0")
    assert kernel.calls["filter_add"] >= 4 and kernel.calls["link_get"] == 2


async def test_dumps_in_run_order_newest_first_with_u32(kernel: MockKernel, nl: NetlinkTransport) -> None:
    eth0 = kernel.devices()["eth0"]
    a, b, d = (kernel.program(v) for v in ("pass", "drop", "next"))
    await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, eth0))
    for prog in (a, b, d):  # one priority: each new filter goes to the head
        await nl.request(add(eth0, 5, 0, prog.fd))
    await nl.request(add(eth0, 9, 1, a.fd))
    kernel.add_foreign_filter("eth0", "ingress", priority=7, classid=0x10001)
    got = [(m.priority, m.handle, m.kind, m.bpf_id) for m in await filters(nl, eth0)]
    assert got == [(5, 0, "bpf", None), (5, 3, "bpf", d.id), (5, 2, "bpf", b.id), (5, 1, "bpf", a.id),
                   (7, 0, "u32", None), (7, 0x80000000, "u32", None), (7, 0x80000800, "u32", None),
                   (9, 0, "bpf", None), (9, 1, "bpf", a.id)]
    # Run order is dump order: "next" (newest) then "drop" decides; the u32 match behind never runs.
    assert kernel.send("eth0", "ingress") == "drop"
    assert (d.count(), b.count(), a.count()) == (1, 1, 0)
    await nl.request(lambda seq: c.encode_filter(seq, c.RTM_DELTFILTER, c.NLM_F_REQUEST | c.NLM_F_ACK, eth0, IN,
                                                 5, 2))
    # With "drop" gone the terminal u32 (classid) ends classification: priority 9 never sees the packet.
    assert kernel.send("eth0", "ingress") == "pass"
    assert a.count() == 1
    with pytest.raises(NetlinkError) as e:  # a priority holds one classifier kind
        await nl.request(add(eth0, 7, 1, a.fd))
    assert (e.value.errno, e.value.extack) == (errno.EINVAL, "Specified filter kind does not match existing one")
    assert [m.handle for m in await filters(nl, eth0, c.EGRESS_PARENT)] == []


async def test_ingress_qdisc_answers_to_every_spelling(kernel: MockKernel, nl: NetlinkTransport) -> None:
    veth0 = kernel.devices()["veth0"]
    prog = kernel.program()
    fd = prog.fd
    await nl.request(lambda seq: c._encode_tc(seq, c.RTM_NEWQDISC, NEW, veth0, 0xFFFFFFF1, 0xFFFF0000, 0,
                                              [["TCA_KIND", "ingress"]]))
    with pytest.raises(NetlinkError) as e:  # an ingress qdisc blocks clsact
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, veth0))
    assert e.value.errno == errno.EEXIST
    for prio, parent in enumerate((0xFFFF0000, 0xFFFFFFF1, 0xFFFFFFF2), start=1):
        await nl.request(add(veth0, prio, 1, fd, parent=parent))
    # A dump reports the block's parent as the last RTM_NEWTFILTER spelled it, whatever the dump asks.
    for parent in (0xFFFF0000, 0xFFFFFFF1, IN, c.EGRESS_PARENT):
        got = [(m.priority, m.parent) for m in await filters(nl, veth0, parent) if m.handle]
        assert got == [(1, 0xFFFFFFF2), (2, 0xFFFFFFF2), (3, 0xFFFFFFF2)]
    with pytest.raises(NetlinkError) as e:  # a clsact-only spelling on clsact: no class at minor fff1
        await nl.request(lambda seq: c.encode_qdisc_del(seq, veth0, kind="clsact"))
    assert (e.value.errno, e.value.extack) == (errno.EINVAL, "Invalid qdisc name: must match existing qdisc")
    await nl.request(lambda seq: c.encode_qdisc_del(seq, veth0, kind=None))
    assert kernel.filters("veth0", "ingress") == ()  # deleting the qdisc took its filters
    with pytest.raises(NetlinkError) as e:
        await nl.request(lambda seq: c.encode_qdisc_del(seq, veth0, kind=None))
    assert (e.value.errno, e.value.extack) == (errno.EINVAL, "Invalid handle")


async def test_multicast_events_and_enobufs(kernel: MockKernel, runner: NetnsRunner, nl: NetlinkTransport) -> None:
    mc = await open_multicast_socket(runner, kernel=kernel)
    small = await open_multicast_socket(runner, rcvbuf=4096, kernel=kernel)
    try:
        assert small.rcvbuf == 8192  # the kernel reports twice what was asked
        ifindex = kernel.add_device("new0")
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifindex))
        kernel.add_foreign_filter("new0", "egress", priority=3)
        kernel.remove_device("new0")
        got: list[c.Message] = []
        with trio.fail_after(5):
            while len(got) < 5:
                got.extend(await mc.receive())
        assert [type(m).__name__ for m in got] == ["LinkMsg", "QdiscMsg", "ChainMsg", "FilterMsg", "LinkMsg"]
        assert isinstance(got[0], c.LinkMsg) and (got[0].is_new, got[0].name) == (True, "new0")
        assert isinstance(got[3], c.FilterMsg) and (got[3].kind, got[3].parent) == ("u32", c.EGRESS_PARENT)
        assert isinstance(got[4], c.LinkMsg) and not got[4].is_new
        # The small socket overflowed: ENOBUFS once, then what was queued, then it works again.
        with pytest.raises(EventsLost):
            with trio.fail_after(5):
                await small.receive()
        assert await small.receive()
        assert small.drain() >= 0
        kernel.add_device("new1")
        with trio.fail_after(5):
            (msg,) = await small.receive()
        assert isinstance(msg, c.LinkMsg) and msg.name == "new1"
    finally:
        mc.close()
        small.close()


async def test_event_source_events_and_resync(kernel: MockKernel, runner: NetnsRunner) -> None:
    prog = kernel.program()
    async with open_netlink_event_source(runner, rcvbuf=65536, kernel=kernel) as source:
        assert set(source.links.values()) == {"lo", "eth0", "veth0", "veth1"}
        ifindex = kernel.add_device("ev0")
        with trio.fail_after(5):
            assert await source.receive() == [DeviceAdded(ifindex, "ev0")]
        kernel.add_foreign_filter("ev0", "ingress", prog, priority=4, name="x")
        events: list[object] = []
        with trio.fail_after(5):
            while not any(isinstance(e, FilterAdded) for e in events):
                events.extend(await source.receive())
        assert QdiscAdded(ifindex, "clsact", c.CLSACT_HANDLE, c.CLSACT_PARENT) in events
        assert FilterAdded(ifindex, Direction.INGRESS, 4, 1, "bpf", prog.id, False) in events
        # A storm overflows the 128 KiB buffer (a notification costs ~4.3 KiB of it): the source re-dumps
        # and reports the differences.
        for i in range(40):
            kernel.add_device(f"storm{i}")
        kernel.remove_device("ev0")
        events = []
        with trio.fail_after(5):
            while not any(isinstance(e, Resynced) for e in events):
                events.extend(await source.receive())
        assert DeviceRemoved(ifindex, "ev0") in events
        assert FilterRemoved(ifindex, Direction.INGRESS, 4, 1, "bpf", prog.id, False) in events
        assert {f"storm{i}" for i in range(40)} <= set(source.links.values())
        assert source.resyncs == 1


async def test_injected_faults_and_latency_apply_to_netlink(kernel: MockKernel, nl: NetlinkTransport) -> None:
    eth0 = kernel.devices()["eth0"]
    kernel.inject_fault("qdisc_add", errno.ENOMEM)
    with pytest.raises(NetlinkError) as e:
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, eth0))
    assert e.value.errno == errno.ENOMEM
    assert kernel.qdisc("eth0") is None  # a failing call changes nothing
    await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, eth0))
    kernel.inject_fault("filter_dump", errno.EBUSY)
    with pytest.raises(NetlinkError) as e:
        await filters(nl, eth0)
    assert e.value.errno == errno.EBUSY
    kernel.set_latency(0.05, op="filter_dump")
    start = trio.current_time()
    assert await filters(nl, eth0) == []
    assert trio.current_time() - start >= 0.05


def test_socket_buffers_timeouts_and_readiness(kernel: MockKernel) -> None:
    sock = kernel.open_netlink_socket(groups=(c.RTNLGRP_LINK,), rcvbuf=1000)
    assert isinstance(sock, MockNetlinkSocket)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2304  # at least SOCK_MIN_RCVBUF
        assert kernel.open_netlink_socket().getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 212992
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        assert poller.poll(0) == []
        with pytest.raises(BlockingIOError):
            sock.recv_nowait()
        sock.settimeout(0.01)
        with pytest.raises(TimeoutError):
            sock.recv(65536)
        kernel.add_device("rd0")
        assert poller.poll(0) == [(sock.fileno(), select.POLLIN)]
        (msg,) = c.decode_messages(sock.recv(65536))
        assert isinstance(msg, c.LinkMsg) and msg.name == "rd0"
        assert poller.poll(0) == []
        kernel.add_device("rd1")  # fits (the buffer may go over its limit by one message)
        kernel.add_device("rd2")  # dropped: ENOBUFS before the queued message
        with pytest.raises(OSError, match="No buffer space") as e:
            sock.recv_nowait()
        assert e.value.errno == errno.ENOBUFS
        assert c.decode_messages(sock.recv_nowait())[0].type == c.RTM_NEWLINK
        with pytest.raises(BlockingIOError):
            sock.recv_nowait()
        assert sock.dropped == 1
        with pytest.raises(OSError, match="too long") as e:
            sock.send(b"\0" * 300000)
        assert e.value.errno == errno.EMSGSIZE
    finally:
        sock.close()
    with pytest.raises(OSError, match="closed"):
        sock.recv_nowait()


async def test_filter_helpers_answer_as_netlink_does(kernel: MockKernel, nl: NetlinkTransport) -> None:
    """filter_add / filter_replace leave to the shared tc code the checks it makes, so they answer what
    the same RTM_NEWTFILTER over netlink answers, in the kernel's order (the slot before the program)."""
    eth0 = kernel.devices()["eth0"]
    prog = kernel.program("pass", name="p")
    xdp = kernel.program(prog_type=6, name="x")  # BPF_PROG_TYPE_XDP: not for cls_bpf
    kernel.qdisc_add("eth0")
    kernel.filter_add("eth0", "ingress", prog.id, priority=1, handle=1)
    kernel.add_foreign_filter("eth0", "ingress", priority=5)  # a u32 classifier holds priority 5

    async def netlink(prio: int, handle: int, fd: int, flags: int) -> int | None:
        try:
            await nl.request(add(eth0, prio, handle, fd, flags))
        except NetlinkError as exc:
            return exc.errno
        return None

    def helper(call: str, prio: int, handle: int, prog_id: int) -> int | None:
        try:
            if call == "add":
                kernel.filter_add("eth0", "ingress", prog_id, priority=prio, handle=handle, name="n")
            else:
                kernel.filter_replace("eth0", "ingress", prio, handle, prog_id)
        except KernelError as exc:
            return exc.errno
        return None

    cases = [  # (helper, priority, handle, program, netlink flags, the kernel's errno)
        ("add", 1, 1, xdp, NEW, errno.EEXIST),  # the slot is taken: EEXIST before the program is looked at
        ("replace", 5, 1, prog, REPLACE, errno.EINVAL),  # the priority holds another classifier kind
        ("replace", 2, 1, xdp, REPLACE, errno.ENOENT),  # nothing to replace: ENOENT before the program
        ("replace", 1, 1, xdp, REPLACE, errno.EINVAL),  # the program is not SCHED_CLS
    ]
    for call, prio, handle, program, flags, expected in cases:
        assert await netlink(prio, handle, program.fd, flags) == expected, (call, prio)
        assert helper(call, prio, handle, program.id) == expected, (call, prio)
    assert [(f.priority, f.handle, f.prog_id) for f in kernel.filter_dump("eth0", "ingress") if f.kind == "bpf"] \
        == [(1, 1, prog.id)]


def test_helpers_keep_their_errnos(kernel: MockKernel) -> None:
    kernel.qdisc_add("eth0", "ingress")
    with pytest.raises(KernelError) as e:
        kernel.qdisc_add("eth0", "clsact")
    assert (e.value.errno, e.value.extack) == (errno.EEXIST, "Exclusivity flag on, cannot modify")


def test_a_link_dump_that_spans_a_device_change_is_marked_interrupted(kernel: MockKernel) -> None:
    """As the kernel's rtnl_dump_ifinfo: once a device came or went under a link dump of several parts, every
    message written after it (NLMSG_DONE included) carries NLM_F_DUMP_INTR; a dump begun after is clean. A
    tc dump is never checked (the kernel's are not)."""
    for i in range(1500):
        kernel.add_device(f"d{i}")

    def parts(sock: MockNetlinkSocket, request: bytes, change: bool) -> list[list[int]]:
        sock.send(request)
        out: list[list[int]] = []
        while True:
            data = sock.recv(65536)
            out.append([flags for _off, _len, _t, flags, _seq, _pid in c.iter_headers(data)])
            if change and len(out) == 1:
                kernel.add_device(f"new{len(kernel.devices())}")
            if any(t == c.NLMSG_DONE for _off, _len, t, _f, _s, _p in c.iter_headers(data)):
                return out

    sock = kernel.open_netlink_socket(blocking=True)
    try:
        sock.settimeout(5)
        links = c.encode_dump_request(1, c.RTM_GETLINK)
        spanned = parts(sock, links, change=True)
        # Reading a part makes the next one (netlink_recvmsg runs the dump on): the change after the first
        # read lands after the second part was made, so the third part on says so.
        assert len(spanned) >= 3
        assert not any(f & c.NLM_F_DUMP_INTR for part in spanned[:2] for f in part)
        assert all(f & c.NLM_F_DUMP_INTR for part in spanned[2:] for f in part)
        assert not any(f & c.NLM_F_DUMP_INTR for part in parts(sock, links, change=False) for f in part)
        kernel.qdisc_add("eth0")
        for prio in range(1, 901):
            kernel.add_foreign_filter("eth0", Direction.INGRESS, kernel.program(), priority=prio)
        tc = c.encode_dump_request(2, c.RTM_GETTFILTER, kernel.devices()["eth0"], IN)
        assert not any(f & c.NLM_F_DUMP_INTR for part in parts(sock, tc, change=True) for f in part)
    finally:
        sock.close()


async def test_the_transport_dumps_again_when_a_dump_was_interrupted(kernel: MockKernel, runner: NetnsRunner) -> None:
    """The real transport reads NLM_F_DUMP_INTR from the mock as from the kernel: it dumps again and returns
    a consistent answer."""
    for i in range(1500):
        kernel.add_device(f"d{i}")
    real_continue = MockNetlinkSocket._continue_dump_locked
    calls: list[int] = []

    def change_once(self: MockNetlinkSocket) -> None:  # a device comes while the first dump is half read
        calls.append(1)
        if len(calls) == 2:
            kernel.add_device("late0")
        real_continue(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MockNetlinkSocket, "_continue_dump_locked", change_once)
        async with open_transport(runner, kernel=kernel) as nl:
            with trio.fail_after(10):
                msgs = await nl.dump(lambda seq: c.encode_dump_request(seq, c.RTM_GETLINK))
    names = [m.name for m in msgs if isinstance(m, c.LinkMsg)]
    assert len(names) == len(kernel.devices()) and names[-1] == "late0"  # dumped again, after the change
