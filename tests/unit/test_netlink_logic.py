"""Logic of the rtnetlink transport and multicast socket (asynctc.lowlevel.transport, .multicast) that the
kernel cannot be made to show on demand: dump retries on NLM_F_DUMP_INTR, dump errors, and the order of
events around an ENOBUFS. Fake sockets; no privileges."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import AsyncIterator

import pytest
import trio

from asynctc._errors import DeviceNotFound, Op, TCError, translated
from asynctc.lowlevel import codec as c
from asynctc.lowlevel.multicast import EventsLost, MulticastSocket
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.lowlevel.nlsock import open_netlink_socket
from asynctc.lowlevel.transport import NetlinkError, NetlinkTransport


def filter_msg(seq: int, prio: int, flags: int = c.NLM_F_MULTI) -> bytes:
    data = bytearray(c.encode_filter(seq, c.RTM_NEWTFILTER, 0, 3, c.INGRESS_PARENT, prio, 1, prog_fd=1))
    struct.pack_into("=H", data, 6, flags)
    return bytes(data)


def done(seq: int, err: int = 0, flags: int = c.NLM_F_MULTI) -> bytes:
    return struct.pack("=IHHIIi", 20, c.NLMSG_DONE, flags, seq, 0, -err)


class FakeDumpSocket:
    """Answers each dump request with the next scripted reply (a function of the request's seq)."""

    def __init__(self) -> None:
        self.script: list[object] = []
        self.pending: list[bytes] = []
        self.closed = False
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        seq = struct.unpack_from("=I", data, 8)[0]
        self.sent.append(data)
        make = self.script.pop(0)
        assert callable(make)
        self.pending = list(make(seq))
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.pending.pop(0)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
async def transport() -> AsyncIterator[NetlinkTransport]:
    sock = open_netlink_socket()  # unprivileged: a NETLINK_ROUTE socket needs no capability
    t = NetlinkTransport(NetnsRunner(None, trio.CapacityLimiter(2)), sock)
    try:
        yield t
    finally:
        await t.aclose()  # ends the I/O thread the dumps started, and closes the socket
        assert sock.fileno() == -1


def use_fake(transport: NetlinkTransport, fake: FakeDumpSocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "_take_dump_socket", lambda: fake)


async def test_interrupted_dump_is_redone(transport: NetlinkTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDumpSocket()
    fake.script = [
        lambda seq: [filter_msg(seq, 1, c.NLM_F_MULTI | c.NLM_F_DUMP_INTR) + done(seq, flags=c.NLM_F_MULTI)],
        lambda seq: [filter_msg(seq, 1), filter_msg(seq, 2) + done(seq)],
    ]
    use_fake(transport, fake, monkeypatch)
    msgs = await transport.dump(lambda seq: c.encode_dump_request(seq, c.RTM_GETTFILTER, 3, c.INGRESS_PARENT))
    assert len(fake.sent) == 2
    assert [m.priority for m in msgs if isinstance(m, c.FilterMsg)] == [1, 2]
    assert all(m.seq == struct.unpack_from("=I", fake.sent[1], 8)[0] for m in msgs)
    assert not fake.closed  # a cleanly finished dump socket is used again


async def test_dump_gives_up_after_retries(transport: NetlinkTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDumpSocket()
    fake.script = [lambda seq: [done(seq, flags=c.NLM_F_MULTI | c.NLM_F_DUMP_INTR)]] * 3
    use_fake(transport, fake, monkeypatch)
    with pytest.raises(TCError, match="interrupted") as exc:
        await transport.dump(c.encode_dump_request(0, c.RTM_GETQDISC), op="qdisc_dump", retries=2)
    assert exc.value.errno == errno.EINTR
    assert len(fake.sent) == 3


async def test_dump_error_becomes_contract_exception(transport: NetlinkTransport,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDumpSocket()
    fake.script = [lambda seq: [done(seq, errno.ENODEV)]]
    use_fake(transport, fake, monkeypatch)
    with pytest.raises(NetlinkError, match="filter_dump") as raw:  # raw: the caller translates it
        await transport.dump(c.encode_dump_request(0, c.RTM_GETTFILTER, 9, c.INGRESS_PARENT), op="filter_dump")
    assert raw.value.errno == errno.ENODEV
    fake.script = [lambda seq: [done(seq, errno.ENODEV)]]
    with pytest.raises(DeviceNotFound, match="filter dump on veth9") as exc, translated(Op.FILTER_DUMP, dev="veth9"):
        await transport.dump(c.encode_dump_request(0, c.RTM_GETTFILTER, 9, c.INGRESS_PARENT), op="filter_dump")
    assert exc.value.errno == errno.ENODEV


async def test_dump_of_a_bytes_request_gets_its_own_seq(transport: NetlinkTransport,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDumpSocket()
    fake.script = [lambda seq: [done(seq + 1), filter_msg(seq, 4) + done(seq)]]  # a foreign DONE is skipped
    use_fake(transport, fake, monkeypatch)
    msgs = await transport.dump(c.encode_dump_request(12345, c.RTM_GETTFILTER, 3, c.INGRESS_PARENT))
    assert [m.priority for m in msgs if isinstance(m, c.FilterMsg)] == [4]


class FakeMulticast:
    def __init__(self, script: list[bytes | OSError]) -> None:
        self.script = script
        self.closed = False

    def recv(self) -> bytes:  # as NonblockingReceiver.recv
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "empty")
        item = self.script.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    recv_nowait = recv  # as a simulated kernel's socket

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        self.closed = True


def fake_events(script: list[bytes | OSError], **kwargs: int) -> MulticastSocket:
    fake = FakeMulticast(script)
    events = MulticastSocket(fake, **kwargs)  # type: ignore[arg-type]
    events._receiver = fake
    return events


async def test_events_before_a_loss_come_first_then_events_lost_then_more() -> None:
    script: list[bytes | OSError] = [
        filter_msg(0, 1), filter_msg(0, 2), OSError(errno.ENOBUFS, "No buffer space available"),
        filter_msg(0, 3),
    ]
    events = fake_events(script, max_batch=10)
    first = await events.receive()
    assert [m.priority for m in first if isinstance(m, c.FilterMsg)] == [1, 2]
    with pytest.raises(EventsLost) as lost:
        await events.receive()
    assert lost.value.errno == errno.ENOBUFS
    assert "re-dump" in str(lost.value)
    again = await events.receive()
    assert [m.priority for m in again if isinstance(m, c.FilterMsg)] == [3]


async def test_events_lost_first_when_nothing_was_read() -> None:
    events = fake_events([OSError(errno.ENOBUFS, "x"), filter_msg(0, 7)])
    with pytest.raises(EventsLost):
        await events.receive()
    assert [m.priority for m in await events.receive() if isinstance(m, c.FilterMsg)] == [7]


async def test_receive_batches_are_bounded() -> None:
    events = fake_events([filter_msg(0, p) for p in range(1, 8)], max_batch=3)
    sizes = [len(await events.receive()) for _ in range(3)]
    assert sizes == [3, 3, 1]
    events.close()
    events.close()
    with pytest.raises(trio.ClosedResourceError):
        await events.receive()


async def test_other_recv_errors_propagate() -> None:
    events = fake_events([OSError(errno.EBADF, "bad")])
    with pytest.raises(OSError, match="bad"):
        await events.receive()


# -- the request path's guards (a NETLINK_ROUTE socket and RTM_GETLINK of lo need no privileges) --------------


def link_get_lo(seq: int) -> bytes:
    return c.encode_link_get(seq, name="lo")


async def test_a_request_that_is_not_one_whole_message_is_refused(transport: NetlinkTransport) -> None:
    good = link_get_lo(0)
    for bad in (good[:15], good + b"\0\0", good[:-4]):  # short, unaligned, length field != size
        with pytest.raises(ValueError, match="not one netlink message"):
            await transport.request(bad, op="link_get")
    assert [m.name for m in await transport.request(good, op="link_get") if isinstance(m, c.LinkMsg)] == ["lo"]
    assert transport.in_flight == 0


async def test_batches_are_split_to_fit_the_send_buffer() -> None:
    sock = open_netlink_socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2048)  # the kernel makes it its minimum, ~4.5 KiB
    t = NetlinkTransport(NetnsRunner(None, trio.CapacityLimiter(2)), sock)
    try:
        names: list[str | None] = []

        async def get() -> None:
            msgs = await t.request(link_get_lo, op="link_get")
            names.extend(m.name for m in msgs if isinstance(m, c.LinkMsg))

        async with trio.open_nursery() as nursery:  # 128 x 48 bytes queued at once: more than one datagram
            for _ in range(128):
                nursery.start_soon(get)
        assert names == ["lo"] * 128
    finally:
        await t.aclose()


async def test_an_io_thread_that_could_not_start_is_started_by_the_next_request(
    transport: NetlinkTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_start = threading.Thread.start
    failures = [RuntimeError("can't start new thread")]

    def start_once_failing(self: threading.Thread) -> None:
        if failures:
            raise failures.pop()
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start_once_failing)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await transport.request(link_get_lo, op="link_get")
    with trio.fail_after(5):
        assert await transport.request(link_get_lo, op="link_get")
    assert transport.in_flight == 0


async def test_a_transport_closed_while_its_io_thread_starts_ends_that_thread(
    transport: NetlinkTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The I/O thread is started from a worker thread; a close that comes meanwhile fails the request and
    the thread, once started, is stopped (it would otherwise wait for jobs forever)."""
    real_start = threading.Thread.start
    starting, release = threading.Event(), threading.Event()
    started: list[threading.Thread] = []

    def start_slowly(self: threading.Thread) -> None:
        if self.name.startswith("asynctc-netlink"):
            starting.set()
            release.wait(10)
            started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start_slowly)

    async def request() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await transport.request(link_get_lo, op="link_get")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            assert await trio.to_thread.run_sync(starting.wait, 10)
            await transport.aclose()
            release.set()
        assert len(started) == 1
        await trio.to_thread.run_sync(started[0].join, 10)
    assert not started[0].is_alive()


def test_a_transport_is_used_in_the_trio_run_that_first_used_it() -> None:
    t = NetlinkTransport(NetnsRunner(None, trio.CapacityLimiter(2)), open_netlink_socket())

    async def use() -> None:
        await t.request(link_get_lo, op="link_get")

    async def close() -> None:
        await t.aclose()

    trio.run(use)
    with pytest.raises(RuntimeError, match="another trio.run"):
        trio.run(use)
    trio.run(close)
