"""The trio rtnetlink transport against the real kernel: each test gets a fresh namespace with a veth pair.

The `nl_netns` fixture is local to this module (self-contained on purpose: other suites bring their own).
"""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from _children import CHILD_TIMEOUT
from _netlinkutil import veth_pair_netns

from asynctc._errors import AlreadyAttached, DeviceNotFound, OffloadError, Op, Severed, TCError, translated
from asynctc.lowlevel import bpf
from asynctc.lowlevel import codec as c
from asynctc.lowlevel.multicast import EventsLost, MulticastSocket, open_multicast_socket
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.lowlevel.transport import NetlinkError, NetlinkTransport, RequestBuilder, open_transport

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, tc and BPF programs"),
]

NEW = c.NLM_F_REQUEST | c.NLM_F_ACK | c.NLM_F_CREATE | c.NLM_F_EXCL
REPLACE = c.NLM_F_REQUEST | c.NLM_F_ACK | c.NLM_F_CREATE | c.NLM_F_REPLACE
DEL = c.NLM_F_REQUEST | c.NLM_F_ACK


@dataclass(frozen=True)
class NlNetns:
    name: str
    veth0: int  # ifindex of veth0 inside the namespace
    veth1: int

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True, timeout=CHILD_TIMEOUT)


def _ifindex(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show", "dev", dev], check=True,
                         capture_output=True, text=True, timeout=CHILD_TIMEOUT).stdout
    return int(json.loads(out)[0]["ifindex"])


@pytest.fixture
def nl_netns() -> Iterator[NlNetns]:
    """A fresh namespace atc-XXXXXXXX with veth0/veth1 inside; deleted (by name) after the test."""
    with veth_pair_netns("atc") as name:
        yield NlNetns(name, _ifindex(name, "veth0"), _ifindex(name, "veth1"))


@pytest.fixture
def runner(nl_netns: NlNetns) -> Iterator[NetnsRunner]:
    r = NetnsRunner(nl_netns.name, trio.CapacityLimiter(16))
    try:
        yield r
    finally:
        r.close()


def _load(verdict: int = 0, name: str = "x") -> int:
    return bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, bpf.asm.mov64_imm(0, verdict) + bpf.asm.exit(),
                         name=name)


@pytest.fixture
def prog() -> Iterator[int]:
    fd = _load(0, "atc_pass")
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def prog2() -> Iterator[int]:
    fd = _load(2, "atc_drop")
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
async def nl(runner: NetnsRunner) -> AsyncIterator[NetlinkTransport]:
    async with open_transport(runner) as transport:
        yield transport


def add_filter(ifindex: int, prio: int, handle: int, fd: int, *, flags: int = NEW,
               parent: int = c.INGRESS_PARENT, name: str = "atc", gen_flags: int = 0) -> Callable[[int], bytes]:
    return lambda seq: c.encode_filter(seq, c.RTM_NEWTFILTER, flags, ifindex, parent, prio, handle,
                                       prog_fd=fd, name=name, gen_flags=gen_flags)


def del_filter(ifindex: int, prio: int, handle: int, parent: int = c.INGRESS_PARENT) -> Callable[[int], bytes]:
    return lambda seq: c.encode_filter(seq, c.RTM_DELTFILTER, DEL, ifindex, parent, prio, handle)


async def dump_filters(nl: NetlinkTransport, ifindex: int, parent: int = c.INGRESS_PARENT) -> list[c.FilterMsg]:
    msgs = await nl.dump(lambda seq: c.encode_dump_request(seq, c.RTM_GETTFILTER, ifindex, parent),
                         op="filter_dump")
    out = [m for m in msgs if isinstance(m, c.FilterMsg) and m.handle != 0]
    assert len(out) == len([m for m in msgs if isinstance(m, c.FilterMsg)]) // 2  # one head per priority
    return out


async def test_clsact_and_cls_bpf_lifecycle(nl: NetlinkTransport, nl_netns: NlNetns, prog: int,
                                            prog2: int) -> None:
    ifx = nl_netns.veth0
    assert await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add") == []
    qdiscs = await nl.dump(lambda seq: c.encode_dump_request(seq, c.RTM_GETQDISC))
    assert [m for m in qdiscs if isinstance(m, c.QdiscMsg) and m.ifindex == ifx] == [
        c.QdiscMsg(type=c.RTM_NEWQDISC, seq=qdiscs[0].seq, ifindex=ifx, parent=c.CLSACT_PARENT,
                   handle=c.CLSACT_HANDLE, kind="clsact", portid=qdiscs[0].portid)
    ]

    await nl.request(add_filter(ifx, 5, 7, prog, name="atc-one"), op="filter_add")
    info = bpf.prog_info(prog)
    (f,) = await dump_filters(nl, ifx)
    assert (f.ifindex, f.parent, f.priority, f.handle, f.protocol, f.kind, f.chain) == (
        ifx, c.INGRESS_PARENT, 5, 7, c.ETH_P_ALL, "bpf", 0)
    assert (f.bpf_id, f.bpf_tag, f.bpf_name) == (info.id, info.tag, "atc-one")
    assert f.direct_action
    assert not f.in_hw
    assert f.gen_flags == c.TCA_CLS_FLAGS_NOT_IN_HW
    assert await dump_filters(nl, ifx, c.EGRESS_PARENT) == []

    # A single filter can be read back with a GET (answer returned by request()).
    (got,) = await nl.request(lambda seq: c.encode_filter_get(seq, ifx, c.INGRESS_PARENT, 5, 7), op="filter_get")
    assert isinstance(got, c.FilterMsg)
    assert got.bpf_id == info.id

    # Replace: same priority+handle, another program, atomically.
    await nl.request(add_filter(ifx, 5, 7, prog2, flags=REPLACE, name="atc-two"), op="filter_replace")
    (f2,) = await dump_filters(nl, ifx)
    assert (f2.priority, f2.handle, f2.bpf_id, f2.bpf_name) == (5, 7, bpf.prog_info(prog2).id, "atc-two")

    await nl.request(del_filter(ifx, 5, 7), op="filter_delete")
    assert await dump_filters(nl, ifx) == []
    await nl.request(lambda seq: c.encode_qdisc_del(seq, ifx), op="qdisc_delete")
    qdiscs = await nl.dump(lambda seq: c.encode_dump_request(seq, c.RTM_GETQDISC))
    assert not [m for m in qdiscs if isinstance(m, c.QdiscMsg) and m.kind == "clsact"]
    links = await nl.dump(lambda seq: c.encode_dump_request(seq, c.RTM_GETLINK))
    assert {(m.name, m.ifindex) for m in links if isinstance(m, c.LinkMsg)} == {
        ("lo", 1), ("veth0", ifx), ("veth1", nl_netns.veth1)}
    assert nl.in_flight == 0


async def test_errors_map_to_contract_exceptions(nl: NetlinkTransport, nl_netns: NlNetns, prog: int) -> None:
    """The transport raises the kernel's refusal raw (NetlinkError: errno and extended ACK); `translated`
    turns it into the contract's exception at the caller's edge."""
    ifx = nl_netns.veth0

    async def req(build: bytes | RequestBuilder, op: Op, **where: Any) -> list[c.Message]:
        with translated(op, **where):
            return await nl.request(build, op=op)

    await req(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), Op.QDISC_ADD)
    with pytest.raises(NetlinkError, match="Exclusivity flag on") as raw:
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op=Op.QDISC_ADD)
    assert raw.value.errno == errno.EEXIST and raw.value.extack and raw.value.op == "qdisc_add"
    with pytest.raises(AlreadyAttached, match="Exclusivity flag on") as qexc:
        await req(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), Op.QDISC_ADD)
    assert qexc.value.errno == errno.EEXIST

    await req(add_filter(ifx, 1, 1, prog), Op.FILTER_ADD)
    with pytest.raises(AlreadyAttached, match="Filter already exists") as exc:
        await req(add_filter(ifx, 1, 1, prog), Op.FILTER_ADD, dev="veth0", direction="ingress")
    assert exc.value.errno == errno.EEXIST
    assert "filter add on veth0 ingress" in str(exc.value)

    with pytest.raises(Severed, match="not found") as dexc:
        await req(del_filter(ifx, 9, 9), Op.FILTER_DELETE)
    assert dexc.value.errno == errno.ENOENT

    with pytest.raises(DeviceNotFound) as nexc:
        await req(add_filter(999_999, 1, 1, prog), Op.FILTER_ADD)
    assert nexc.value.errno == errno.ENODEV

    # skip_sw (hardware only) on a veth: refused, nothing left behind.
    with pytest.raises(OffloadError) as oexc:
        await req(add_filter(ifx, 2, 1, prog, gen_flags=c.TCA_CLS_FLAGS_SKIP_SW), Op.FILTER_ADD_HW)
    assert oexc.value.errno == errno.EOPNOTSUPP
    assert [(f.priority, f.handle) for f in await dump_filters(nl, ifx)] == [(1, 1)]

    # Errors are per request: the transport goes on working.
    await nl.request(del_filter(ifx, 1, 1), op="filter_delete")
    assert nl.in_flight == 0


async def test_many_concurrent_requests_on_one_transport(nl: NetlinkTransport, nl_netns: NlNetns,
                                                         prog: int) -> None:
    ifx = nl_netns.veth0
    await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")
    n = 200
    failures: list[BaseException] = []

    async def add(prio: int) -> None:
        await nl.request(add_filter(ifx, prio, 1, prog, name=f"p{prio}"), op="filter_add")

    async def add_twice(prio: int) -> None:
        # Half the tasks also provoke an error, so ACKs and errors interleave.
        await add(prio)
        try:
            await add(prio)
        except NetlinkError as exc:  # EEXIST, raw: the transport does not translate
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for prio in range(1, n + 1):
            nursery.start_soon(add_twice if prio % 2 else add, prio)
    assert len(failures) == n // 2
    assert {getattr(f, "errno", None) for f in failures} == {errno.EEXIST}
    filters = await dump_filters(nl, ifx)
    assert sorted((f.priority, f.bpf_name) for f in filters) == [(p, f"p{p}") for p in range(1, n + 1)]

    async with trio.open_nursery() as nursery:
        for prio in range(1, n + 1):
            nursery.start_soon(nl.request, del_filter(ifx, prio, 1))
    assert await dump_filters(nl, ifx) == []
    assert nl.in_flight == 0


async def test_cancelled_requests_leave_the_transport_consistent(nl: NetlinkTransport, nl_netns: NlNetns,
                                                                 prog: int) -> None:
    ifx = nl_netns.veth0
    await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")

    # Cancel deterministically while the I/O thread is sending: the caller sees Cancelled, the request
    # still takes effect in the kernel, and the ACK that arrives for the abandoned seq is dropped.
    real_send = nl._send
    scope = trio.CancelScope()
    token = trio.lowlevel.current_trio_token()

    def cancel_then_send(data: bytes) -> None:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)  # returns once the waiter is cancelled
        real_send(data)

    nl._send = cancel_then_send  # type: ignore[method-assign]
    with scope:
        await nl.request(add_filter(ifx, 1, 1, prog), op="filter_add")
    nl._send = real_send  # type: ignore[method-assign]
    assert scope.cancelled_caught
    assert nl.in_flight == 0
    assert [(f.priority, f.handle) for f in await dump_filters(nl, ifx)] == [(1, 1)]

    # An answer for a sequence number nobody waits for (an abandoned request's) is dropped.
    stray = c.encode_filter(0x7FFF_FFF0, c.RTM_DELTFILTER, DEL, ifx, c.INGRESS_PARENT, 77, 1)
    await nl.runner.run(nl._sock.send, stray)
    # (the reader handles datagrams in order: the requests below are answered only after the stray was
    # dropped, and they must still be answered correctly)

    # Random cancellation points across many requests: afterwards every filter the kernel holds is one we
    # tried to add, and requests still work.
    attempted: set[int] = set()
    rng = random.Random(20261125)
    for prio in range(2, 60):
        attempted.add(prio)
        with trio.move_on_after(rng.choice([0, 0.0001, 0.001, 0.005, 1])):
            await nl.request(add_filter(ifx, prio, 1, prog), op="filter_add")
    assert nl.in_flight == 0
    present = {f.priority for f in await dump_filters(nl, ifx)}
    assert present <= attempted | {1}
    await nl.request(add_filter(ifx, 100, 1, prog), op="filter_add")
    await nl.request(del_filter(ifx, 100, 1), op="filter_delete")
    assert nl.in_flight == 0


async def test_a_request_cancelled_before_it_was_sent_is_never_sent(nl: NetlinkTransport, nl_netns: NlNetns,
                                                                     prog: int) -> None:
    """Requests wait in the I/O thread's queue while it is busy; one whose caller gave up before the
    thread took it is withdrawn: the kernel never sees it. The requests queued around it are sent in
    their order."""
    ifx = nl_netns.veth0
    await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")
    real_send = nl._send
    entered, release = threading.Event(), threading.Event()
    sent: list[bytes] = []

    def held_send(data: bytes) -> None:
        sent.append(data)
        if len(sent) == 1:
            entered.set()
            release.wait(10)  # the I/O thread is busy with the first request
        real_send(data)

    nl._send = held_send  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(nl.request, add_filter(ifx, 1, 1, prog), op="filter_add"))
            await trio.to_thread.run_sync(entered.wait, 10)
            with trio.move_on_after(0.05) as withdrawn:
                await nl.request(add_filter(ifx, 2, 1, prog), op="filter_add")
            assert withdrawn.cancelled_caught
            nursery.start_soon(partial(nl.request, add_filter(ifx, 3, 1, prog), op="filter_add"))
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    finally:
        nl._send = real_send  # type: ignore[method-assign]
    assert [(f.priority, f.handle) for f in await dump_filters(nl, ifx)] == [(1, 1), (3, 1)]
    assert len(sent) == 2
    assert nl.in_flight == 0


def _open_fds() -> int:
    """Open sockets of this process (worker threads keep an fd on their home namespace: not counted)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    return count


async def test_close_is_idempotent_and_leaks_nothing(runner: NetnsRunner, nl_netns: NlNetns,
                                                     prog: int) -> None:
    ifx = nl_netns.veth0
    before = _open_fds()
    async with open_transport(runner) as nl:
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")
        async with trio.open_nursery() as nursery:  # several dumps at once: the dump socket pool fills
            for _ in range(4):
                nursery.start_soon(dump_filters, nl, ifx)
        assert _open_fds() > before
        await nl.aclose()
        await nl.aclose()
        assert nl.closed
        with pytest.raises(trio.ClosedResourceError):
            await nl.request(add_filter(ifx, 1, 1, prog))
        with pytest.raises(trio.ClosedResourceError):
            await dump_filters(nl, ifx)
    assert _open_fds() == before

    # Closing while requests wait: they raise ClosedResourceError, and the context exits cleanly.
    async with open_transport(runner) as nl:
        results: list[BaseException] = []

        async def waiter(prio: int) -> None:
            try:
                await nl.request(add_filter(ifx, prio, 1, prog), op="filter_add")
            except trio.ClosedResourceError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            for prio in range(1, 21):
                nursery.start_soon(waiter, prio)
            await trio.lowlevel.checkpoint()
            await nl.aclose()
        assert nl.in_flight == 0
    assert _open_fds() == before


async def _collect(events: MulticastSocket, want: Callable[[list[c.Message]], bool]) -> list[c.Message]:
    seen: list[c.Message] = []
    with trio.fail_after(10):
        while not want(seen):
            seen.extend(await events.receive())
    return seen


async def test_multicast_sees_link_and_filter_events(runner: NetnsRunner, nl: NetlinkTransport,
                                                     nl_netns: NlNetns, prog: int) -> None:
    ifx = nl_netns.veth0
    with await open_multicast_socket(runner) as events:
        await trio.to_thread.run_sync(nl_netns.ip, "link", "add", "atcx0", "type", "veth", "peer", "name",
                                      "atcx1")
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")
        await nl.request(add_filter(ifx, 3, 4, prog, name="evt"), op="filter_add")
        await nl.request(del_filter(ifx, 3, 4), op="filter_delete")
        await trio.to_thread.run_sync(nl_netns.ip, "link", "del", "atcx0")

        def complete(seen: list[c.Message]) -> bool:
            return sum(isinstance(m, c.LinkMsg) and m.type == c.RTM_DELLINK for m in seen) >= 2

        seen = await _collect(events, complete)
    assert events.closed
    links = [(m.type, m.name) for m in seen if isinstance(m, c.LinkMsg)]
    assert (c.RTM_NEWLINK, "atcx0") in links
    assert (c.RTM_NEWLINK, "atcx1") in links
    assert (c.RTM_DELLINK, "atcx0") in links
    filters = [m for m in seen if isinstance(m, c.FilterMsg)]
    assert [(m.type, m.priority, m.handle, m.bpf_name) for m in filters] == [
        (c.RTM_NEWTFILTER, 3, 4, "evt"), (c.RTM_DELTFILTER, 3, 4, "evt")]
    # Our own changes carry our port id, so a monitor can recognise them.
    assert all(m.portid == nl.portid for m in filters)
    assert filters[0].bpf_id == bpf.prog_info(prog).id
    qd = [m for m in seen if isinstance(m, c.QdiscMsg)]
    assert [(m.type, m.kind, m.ifindex) for m in qd] == [(c.RTM_NEWQDISC, "clsact", ifx)]
    with pytest.raises(trio.ClosedResourceError):
        await events.receive()


async def test_overflow_raises_events_lost_and_the_socket_keeps_working(
    runner: NetnsRunner, nl: NetlinkTransport, nl_netns: NlNetns, prog: int
) -> None:
    ifx = nl_netns.veth0
    await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")
    async with await open_multicast_socket(runner, (c.RTNLGRP_TC,), rcvbuf=4096) as events:
        # A storm of events nobody reads: the tiny buffer overflows.
        for prio in range(1, 41):
            await nl.request(add_filter(ifx, prio, 1, prog), op="filter_add")
        got: list[c.Message] = []

        async def read_until_lost() -> None:
            with trio.fail_after(10):
                while True:
                    got.extend(await events.receive())

        with pytest.raises(EventsLost) as lost:
            await read_until_lost()
        assert lost.value.errno == errno.ENOBUFS
        assert isinstance(lost.value, TCError)
        assert len([m for m in got if isinstance(m, c.FilterMsg)]) < 40
        # Drain what is still queued, then a new change is seen: the socket works on.
        events.drain()
        await nl.request(del_filter(ifx, 40, 1), op="filter_delete")
        seen = await _collect(events, lambda s: any(isinstance(m, c.FilterMsg) for m in s))
        assert [(m.type, m.priority) for m in seen if isinstance(m, c.FilterMsg)] == [(c.RTM_DELTFILTER, 40)]


async def test_socket_is_created_in_the_namespace(runner: NetnsRunner, nl_netns: NlNetns) -> None:
    """A link dump through the transport lists the namespace's devices, not the host's."""
    async with open_transport(runner) as nl:
        links = await nl.dump(lambda seq: c.encode_dump_request(seq, c.RTM_GETLINK))
        got = await nl.request(lambda seq: c.encode_link_get(seq, name="veth1"), op="link_get")
        with pytest.raises(NetlinkError) as missing:
            await nl.request(lambda seq: c.encode_link_get(seq, name="nope0"), op="link_get")
        assert missing.value.errno == errno.ENODEV
    assert sorted(m.name or "" for m in links if isinstance(m, c.LinkMsg)) == ["lo", "veth0", "veth1"]
    assert [(m.ifindex, m.name) for m in got if isinstance(m, c.LinkMsg)] == [(nl_netns.veth1, "veth1")]
    assert socket.if_nametoindex("lo") == 1


async def test_a_lost_answer_fails_the_request_instead_of_waiting_forever(
    nl: NetlinkTransport, nl_netns: NlNetns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even inside a shield, a request never waits forever. The kernel queues every answer inside the
    sendmsg, so a missing one was lost: after `answer_timeout` TCError(ETIMEDOUT), at once TCError(ENOBUFS)
    when the kernel said it dropped answers. Both say the request may or may not have taken effect, and
    the transport keeps working."""
    ifx = nl_netns.veth0
    real_recv = nl._recv

    def lose_everything() -> bytes:
        real_recv()  # read and drop: raises BlockingIOError once the socket is empty
        return b""

    monkeypatch.setattr(nl, "_recv", lose_everything)
    nl.answer_timeout = 0.2
    with trio.CancelScope(shield=True), pytest.raises(TCError, match="may or may not have taken effect") as exc:
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")
    assert exc.value.errno == errno.ETIMEDOUT

    overflowed = [True]

    def overflow_once() -> bytes:
        if overflowed.pop() if overflowed else False:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return lose_everything()

    monkeypatch.setattr(nl, "_recv", overflow_once)
    nl.answer_timeout = 30.0
    with trio.fail_after(5), pytest.raises(TCError, match="lost") as exc:
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")
    assert exc.value.errno == errno.ENOBUFS
    monkeypatch.undo()
    # the requests did reach the kernel; the transport still works
    with pytest.raises(NetlinkError, match="Exclusivity flag on"):
        await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")
    assert nl.in_flight == 0


async def test_a_second_overflow_is_reported_only_after_draining(
    runner: NetnsRunner, nl: NetlinkTransport, nl_netns: NlNetns, prog: int
) -> None:
    """The kernel marks an overflowed socket congested and reports ENOBUFS again only once its queue has
    been empty: a consumer that re-dumps after a loss must drain first, or the next loss goes unseen."""
    ifx = nl_netns.veth0
    await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, ifx), op="qdisc_add")

    async def storm(first: int) -> None:
        for prio in range(first, first + 40):
            await nl.request(add_filter(ifx, prio, 1, prog), op="filter_add")

    async def receive_until_lost(events: MulticastSocket) -> int:
        n = 0
        with trio.fail_after(10):
            try:
                while True:
                    n += len(await events.receive())
            except EventsLost:
                return n

    async with await open_multicast_socket(runner, (c.RTNLGRP_TC,), rcvbuf=4096) as events:
        await storm(1)
        await receive_until_lost(events)
        # without draining, a second storm now is dropped silently: the queue never emptied
        await storm(100)
        read: list[c.Message] = []
        while batch := events._read_batch():  # non-blocking reads until the queue is empty
            read.extend(batch)
        second = [m for m in read if isinstance(m, c.FilterMsg) and m.priority >= 100]
        assert len(second) < 40, "the 4 KiB socket should have dropped part of the second storm"
        assert not events._lost, "the kernel reported the second loss after all"
        # after draining, the next overflow is reported again
        await storm(200)
        await receive_until_lost(events)
        assert events.drain() >= 0
        await nl.request(del_filter(ifx, 200, 1), op="filter_delete")
        seen = await _collect(events, lambda s: any(isinstance(m, c.FilterMsg) for m in s))
        assert [(m.type, m.priority) for m in seen if isinstance(m, c.FilterMsg)] == [(c.RTM_DELTFILTER, 200)]


async def test_answers_are_handed_over_ki_protected(nl: NetlinkTransport, nl_netns: NlNetns,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C must reach the main task, never interrupt the hand-over of answers that cleanup requests
    wait on (it runs as a trio run_sync_soon callback, which trio protects)."""
    protected: list[bool] = []
    real = nl._deliver

    def spy(done: list[object]) -> None:
        protected.append(trio.lowlevel.currently_ki_protected())
        real(done)  # type: ignore[arg-type]

    monkeypatch.setattr(nl, "_deliver", spy)
    await nl.request(lambda seq: c.encode_qdisc_add_clsact(seq, nl_netns.veth0), op="qdisc_add")
    assert protected and all(protected)


async def test_transports_that_end_leave_no_fd_behind(runner: NetnsRunner, nl_netns: NlNetns) -> None:
    """Each transport's I/O thread enters the namespace once (to create its dump socket), which caches
    an fd on its home namespace: it is closed when the thread ends, as are the transport's sockets."""

    async def use_once() -> None:
        async with open_transport(runner) as nl:
            await dump_filters(nl, nl_netns.veth0)

    await use_once()  # warm-up: the runner's pooled worker threads keep their own home fds while they live
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        await use_once()
    assert len(os.listdir("/proc/self/fd")) == before
