"""A trio-native rtnetlink transport, one per network namespace: requests with ACKs, and dumps.

Why it is built this way (KERNEL.md has the measurements):

- A netlink `send()` runs the whole kernel handler inside sendmsg, including the wait for rtnl; sent from
  the trio thread it stalls the event loop for tens of milliseconds. So sends leave the trio thread, and
  the trio thread only waits for readiness and parses.
- Dump continuations run inside recvmsg, so a whole dump (send, then recv until NLMSG_DONE) runs off the
  trio thread too, on a dump socket of its own, and is decoded there.
- A netlink socket belongs to the namespace of the thread that created it: every socket here is created
  inside the namespace (through the runner); using it later needs no namespace switch.

Design of `NetlinkTransport`: one request socket, and one *I/O thread* per transport that does all the
socket work. A request gets a fresh sequence number and a waiting slot, and is queued; the I/O thread
takes every job queued at that moment, sends consecutive requests in ONE sendmsg (the kernel handles the
messages of a datagram in turn), then reads their answers: the kernel queues each answer (ACK, error, the
echoed or requested object) before that sendmsg returns, so they are all there to be read, matched by
sequence number (never by pyroute2) and decoded (`struct`, microseconds). Dumps run in between, in the order
they were queued. Everything the batch produced goes back to the waiting tasks in one trio-token call. The
trio thread does no socket I/O for requests and dumps at all: it queues, waits, and is handed results.

Why a thread of its own rather than a `trio.to_thread` hop per request: the hop (limiter, thread hand-off,
report back) cost more CPU than the kernel's own work (0.66 ms against 0.06 ms per request measured with 16
tasks; benchmarks/bench_netlink.py), and under load one thread sending batches does what many hops did.
The kernel serialises these handlers under rtnl anyway, so one thread loses no kernel parallelism. And
non-blocking reads keep the GIL (`NonblockingReceiver`): a thread that gives the GIL up for every recv()
loses it to a busy thread for up to the switch interval (5 ms) each time.

Cancellation: a cancelled waiter withdraws its slot; a request the I/O thread has not sent yet is then
never sent, one already sent may have taken effect, and its answer is dropped. Many tasks can have
requests in flight on one transport at once (`max_in_flight` bounds them); one datagram carries at most
as many requests as the receive buffer has room for answers (ANSWER_SPACE each) and as the send buffer
takes bytes, and a request that is not one whole aligned message is refused (ValueError) before it could
spoil its neighbours in the datagram. Should the kernel drop answers anyway
(ENOBUFS), the requests left unanswered fail with TCError(errno=ENOBUFS) at once; an answer that does not
come at all fails its request after `answer_timeout` (30 s), even inside a shield.

Errors: a kernel errno is raised raw, as `NetlinkError` (an OSError with the kernel's errno, the operation's
name and its extended-ACK text: NETLINK_EXT_ACK is requested on every socket); the backend that made the
request turns it into asynctc's exception once, at its edge (`asynctc._errors.translated`). What the
transport itself decides (an answer lost or never come, a dump interrupted too often) is a TCError. A
closed transport raises `trio.ClosedResourceError`.

Multicast events are `asynctc.lowlevel.multicast`; the socket helpers are `asynctc.lowlevel.nlsock`.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import itertools
import queue
import random
import select
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final, TypeVar

import trio

from .._errors import TCError
from . import codec
from .codec import Message, NlDone, NlError
from .kernel import LINUX, Kernel, NetlinkSocket
from .locks import held
from .netns import NetnsRunner, release_thread_home
from .nlsock import RECV_SIZE, NetlinkError, nonblocking_receiver

__all__ = [
    "ANSWER_TIMEOUT",
    "DEFAULT_RCVBUF",
    "DUMP_TIMEOUT",
    "NetlinkError",
    "NetlinkTransport",
    "RequestBuilder",
    "open_transport",
    "start_transport",
]

T = TypeVar("T")

DEFAULT_RCVBUF: Final = 1 << 20
DUMP_TIMEOUT: Final = 10.0
ANSWER_TIMEOUT: Final = 30.0  # a safety net: the ACK is queued before the I/O thread's send() returns

RequestBuilder = Callable[[int], bytes]
"""Builds one encoded request for a sequence number.

For example `lambda seq: codec.encode_qdisc_add_clsact(seq, ifindex)`.
"""


_LEN_TYPE_FLAGS: Final = struct.Struct("=IHH")


def _as_request(data: bytes) -> bytes:
    """The request as it is sent: one whole, 4-byte aligned netlink message (ValueError otherwise: requests
    share a datagram with other tasks' requests, and a wrong length would make the kernel misread, and
    drop, every message after it), with NLM_F_REQUEST|NLM_F_ACK set (every request must be answered, or
    its waiter hangs)."""
    if len(data) < 16 or len(data) % 4 or _LEN_TYPE_FLAGS.unpack_from(data)[0] != len(data):
        raise ValueError(f"not one netlink message of the length its header gives, 4-byte aligned "
                         f"({len(data)} bytes); encode requests with asynctc.lowlevel.codec")
    flags = _LEN_TYPE_FLAGS.unpack_from(data)[2]
    want = flags | codec.NLM_F_REQUEST | codec.NLM_F_ACK
    if want == flags:
        return data
    buf = bytearray(data)
    struct.pack_into("=H", buf, 6, want)
    return bytes(buf)


def _build(msg: bytes | RequestBuilder, seq: int) -> bytes:
    return msg(seq) if callable(msg) else codec.set_seq(msg, seq)


MAX_BATCH_JOBS: Final = 256  # jobs taken from the queue at once
MAX_SEND_BYTES: Final = 64 * 1024  # one sendmsg; the kernel refuses more than the socket's sndbuf (~208 KiB)
# Receive-buffer space one request's answers may take (an RTM_NEWLINK reply is ~1.1 KiB of data in a ~3 KiB
# buffer, plus the ACK): a datagram carries at most rcvbuf / ANSWER_SPACE requests, so that all their
# answers fit before the I/O thread reads them.
ANSWER_SPACE: Final = 4096
CLOSE_WAIT: Final = DUMP_TIMEOUT + 5.0


@dataclass(slots=True, eq=False)
class _Outcome:
    """What one request or dump came to: filled in the I/O thread, handed to the waiting task on the trio
    thread (or set there directly when the transport closes or breaks)."""

    messages: list[Message] = field(default_factory=list)  # the request's answers before its ACK; a dump's
    answer: NlError | NlDone | None = None  # the request's ACK or error
    failure: BaseException | None = None  # raised as is (closed, broken, lost, a dump's error)
    send_error: OSError | None = None  # the request's sendmsg failed: mapped by request()
    timed_out: bool = False


class _Slot:
    """Where a task waits for the outcome of one request or dump."""

    __slots__ = ("event", "outcome", "withdrawn")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.outcome: _Outcome | None = None  # set once, together with the event
        # Set by the waiter when it stops waiting (answered, cancelled, closed): the I/O thread skips a
        # withdrawn job that it has not started yet.
        self.withdrawn = False

    def settle(self, outcome: _Outcome) -> None:
        """On the trio thread: the outcome, unless one came first (a close fails every waiter at once)."""
        if not self.event.is_set():
            self.outcome = outcome
            self.event.set()


@dataclass(slots=True, eq=False)
class _Send:
    data: bytes
    seq: int
    slot: _Slot
    outcome: _Outcome = field(default_factory=_Outcome)  # filled by the I/O thread


@dataclass(slots=True, eq=False)
class _Dump:
    request: bytes | RequestBuilder
    op: str
    retries: int
    slot: _Slot


_STOP: Final = object()
_Job = _Send | _Dump | object


_Done = tuple[_Slot, _Outcome]  # what the I/O thread hands back for one job


class NetlinkTransport:
    """rtnetlink for one network namespace: `request()` (with ACK) and `dump()`. Open with `open_transport()`
    or `start_transport()`.

    All methods are called from trio tasks on the transport's trio thread; any number of tasks may use one
    transport concurrently. Requests and dumps reach the kernel in the order they were made.
    """

    def __init__(self, runner: NetnsRunner, sock: NetlinkSocket, *, max_in_flight: int = 128,
                 kernel: Kernel = LINUX) -> None:
        self.runner = runner
        self.kernel = kernel
        self._sock = sock
        self._receiver = nonblocking_receiver(sock)  # used by the I/O thread only
        # The kernel refuses a datagram longer than the send buffer less 32 bytes (EMSGSIZE), and drops
        # answers that do not fit the receive buffer (ENOBUFS): a datagram stays within both.
        self._max_send = min(MAX_SEND_BYTES, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32)
        self._max_requests = max(1, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // ANSWER_SPACE)
        self._portid: int = sock.getsockname()[0]
        self._slots: dict[int, _Slot] = {}
        self._dumps: set[_Slot] = set()
        self._seq = random.randrange(1, 1 << 31)
        self._dump_seq = itertools.count(random.randrange(1, 1 << 31))
        self._in_flight = trio.Semaphore(max_in_flight)
        self._closed = False
        self._broken: BaseException | None = None
        self.answer_timeout = ANSWER_TIMEOUT
        # The I/O thread: started on first use, ended by close. It alone uses the sockets meanwhile.
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = trio.Lock()
        self._thread_exited = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._state_lock = threading.Lock()  # thread start/exit vs close: who closes the sockets
        self._dump_sock: NetlinkSocket | None = None

    # -- state ----------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_flight(self) -> int:
        """How many requests are waiting for their ACK now."""
        return len(self._slots)

    @property
    def portid(self) -> int:
        """The request socket's netlink port id: multicast events caused by this transport's requests carry
        it (and the request's seq), so a monitor can tell its own changes from other processes'."""
        return self._portid

    def _check_usable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the netlink transport is closed")
        if self._broken is not None:
            broken = self._broken
            raise trio.BrokenResourceError(f"the netlink transport failed: {broken!r}") from broken

    def _next_seq(self) -> int:
        seq = self._seq
        while True:
            seq = seq + 1 if seq < 0xFFFFFFFF else 1  # 0 is what the kernel uses for its own events
            if seq not in self._slots:
                self._seq = seq
                return seq

    # -- requests -------------------------------------------------------------------------------------

    async def request(
        self,
        msg: bytes | RequestBuilder,
        *,
        op: str = "netlink",
    ) -> list[Message]:
        """Send one request and wait for the kernel's ACK.

        `msg` is an encoded message (its sequence number is overwritten) or a builder called with the
        sequence number, on the calling task (the `codec` encoders are memoized: ~2 us). NLM_F_REQUEST|
        NLM_F_ACK are always set. The I/O thread sends it and reads its answer.

        Returns the messages the kernel sent for this request before the ACK: empty for most requests; the
        object for RTM_GET* without NLM_F_DUMP (e.g. `codec.encode_filter_get`), or the created object when
        NLM_F_ECHO is set. An error ACK raises `NetlinkError(errno, op, extended ACK text)`, raw: the caller
        translates it (`op` only names the request in it). If the task is cancelled while waiting, the
        request may or may not have taken effect in the kernel (one the I/O thread had not sent yet never is). An answer
        that never comes (the kernel answers inside sendmsg, so it was lost) fails the request with
        TCError (ENOBUFS when the kernel said it dropped answers, ETIMEDOUT after `answer_timeout`).
        """
        self._check_usable()
        await self._start_io_thread()
        async with held(self._in_flight):
            self._check_usable()
            seq = self._next_seq()
            data = _as_request(_build(msg, seq))
            slot = _Slot()
            self._slots[seq] = slot
            try:
                self._submit(_Send(data, seq, slot))
                await slot.event.wait()
            finally:
                # Whatever happened (answer, cancellation, close), this seq is no longer awaited.
                slot.withdrawn = True
                self._slots.pop(seq, None)
        outcome = slot.outcome
        assert outcome is not None
        if outcome.failure is not None:
            raise outcome.failure
        if outcome.send_error is not None:
            exc = outcome.send_error
            raise NetlinkError(exc.errno or _errno.EIO, op, "netlink send failed") from exc
        if outcome.timed_out:
            raise TCError(f"{op}: no answer from the kernel within {self.answer_timeout}s; the request may or "
                          "may not have taken effect: query the kernel", errno=_errno.ETIMEDOUT)
        answer = outcome.answer
        assert answer is not None
        if answer.errno:
            raise NetlinkError(answer.errno, op, answer.extack_msg)
        return outcome.messages

    def _fail_all(self, exc: BaseException) -> None:
        for slot in [*self._slots.values(), *self._dumps]:
            slot.settle(_Outcome(failure=exc))

    # -- dumps ----------------------------------------------------------------------------------------

    async def dump(
        self,
        request: bytes | RequestBuilder,
        *,
        op: str = "dump",
        retries: int = 5,
    ) -> list[Message]:
        """Run a dump and return its decoded messages (without the final NlDone), e.g.
        `await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETTFILTER, ifindex, parent))`
        (the builder runs in the I/O thread).

        The whole dump runs in the I/O thread, on a dump socket of its own: the kernel builds each
        continuation inside recvmsg, so reading a dump on the trio thread would stall it. Decoding runs
        there as well. A dump interrupted by a concurrent change (NLM_F_DUMP_INTR: the result may be
        inconsistent) is redone, up to `retries` times; after that TCError(errno=EINTR). A kernel error
        raises `NetlinkError`, raw. A cancelled caller stops waiting at once (a dump changes
        nothing; its result is dropped).
        """
        self._check_usable()
        await self._start_io_thread()
        slot = _Slot()
        self._dumps.add(slot)
        try:
            self._submit(_Dump(request, op, retries, slot))
            await slot.event.wait()
        finally:
            slot.withdrawn = True
            self._dumps.discard(slot)
        outcome = slot.outcome
        assert outcome is not None
        if outcome.failure is not None:
            raise outcome.failure
        return outcome.messages

    # -- the I/O thread ----------------------------------------------------------------------------

    async def _start_io_thread(self) -> None:
        """Start the I/O thread on first use (a failed start is tried again by the next request).

        `Thread.start()` waits until the new thread runs, which takes milliseconds when other threads hold
        the GIL: it is called from a worker thread, so the trio thread does not wait."""
        if self._thread is None:
            async with self._start_lock:
                if self._thread is None:
                    self._check_usable()
                    self._token = trio.lowlevel.current_trio_token()
                    name = f"asynctc-netlink[{self.runner.netns or 'own netns'}]"
                    thread = threading.Thread(target=self._io_loop, name=name, daemon=True)
                    try:
                        await trio.to_thread.run_sync(thread.start)  # it waits for its first job
                    except BaseException:
                        self._token = None  # not started: close() closes the sockets itself
                        raise
                    with self._state_lock:
                        self._thread = thread
                        if self._closed:  # closed while it started: it closes the sockets now
                            self._jobs.put(_STOP)
        if trio.lowlevel.current_trio_token() is not self._token:
            raise RuntimeError("this netlink transport belongs to another trio.run; open one in this run")
        self._check_usable()

    def _submit(self, job: _Send | _Dump) -> None:
        """Queue a job for the I/O thread (started by `_start_io_thread`)."""
        self._jobs.put(job)

    def _io_loop(self) -> None:
        """The I/O thread: takes every job queued now (up to MAX_BATCH_JOBS), sends consecutive requests
        in one sendmsg (the kernel handles each message of it in turn and queues each answer before the
        sendmsg returns) and reads their answers, runs dumps, and hands everything to the trio thread in
        one call. Ends at _STOP, closing the sockets."""
        jobs = self._jobs
        failure: BaseException | None = None
        try:
            while True:
                batch = [jobs.get()]
                while len(batch) < MAX_BATCH_JOBS:
                    try:
                        batch.append(jobs.get_nowait())
                    except queue.Empty:
                        break
                if not self._run_batch(batch):
                    return
        except BaseException as exc:  # pragma: no cover - a bug; waiters must hear of it, not hang
            failure = exc
        finally:
            release_thread_home()  # the fd a dump socket's creation cached on this thread
            with self._state_lock:
                self._thread_exited = True
                if self._closed:
                    self._close_sockets()
            self._report(self._thread_ended, failure)

    def _run_batch(self, batch: list[_Job]) -> bool:
        done: list[_Done] = []
        sends: list[_Send] = []
        size = 0
        go_on = True
        for job in batch:
            if job is _STOP or self._closed:  # close() failed every waiter already, and queued _STOP
                go_on = False
                sends = []  # their waiters were told the transport closed: nothing more is sent
                break
            if isinstance(job, _Send):
                if job.slot.withdrawn:
                    continue
                if sends and (size + len(job.data) > self._max_send or len(sends) >= self._max_requests):
                    self._exchange(sends, done)
                    sends, size = [], 0
                sends.append(job)
                size += len(job.data)
            elif isinstance(job, _Dump):
                if sends:
                    self._exchange(sends, done)
                    sends, size = [], 0
                if not job.slot.withdrawn:
                    done.append(self._run_dump(job))
        if sends:
            self._exchange(sends, done)
        if done:
            self._report(self._deliver, done)
        return go_on

    def _exchange(self, sends: list[_Send], done: list[_Done]) -> None:
        """Send requests in one datagram and collect their answers (in the I/O thread)."""
        data = sends[0].data if len(sends) == 1 else b"".join(s.data for s in sends)
        try:
            self._send(data)
        except OSError as exc:
            done.extend((s.slot, _Outcome(send_error=exc)) for s in sends)
            return
        waiting = {s.seq: s for s in sends}
        lost = self._collect(waiting, time.monotonic() + self.answer_timeout)
        for s in sends:
            if s.outcome.answer is None:
                if lost is not None:
                    s.outcome.failure = lost
                else:
                    s.outcome.timed_out = True
            done.append((s.slot, s.outcome))

    def _collect(self, waiting: dict[int, _Send], deadline: float) -> TCError | None:
        """Read answers until every request in `waiting` has its ACK. They are queued before the send
        returns, so this normally only drains the socket; should the kernel have dropped answers (ENOBUFS:
        the receive buffer overflowed), the missing ones fail with the returned error. Answers of nobody
        (a withdrawn request's, a stray) are dropped."""
        lost: TCError | None = None
        while waiting:
            try:
                data = self._recv()
            except BlockingIOError:
                if lost is not None:
                    return lost
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                poller = select.poll()  # not select(): it fails for fds past FD_SETSIZE (1024)
                poller.register(self._sock, select.POLLIN)
                poller.poll(remaining * 1000)
                continue
            except OSError as exc:
                if exc.errno != _errno.ENOBUFS:
                    raise
                lost = TCError("a netlink answer was lost (ENOBUFS: receive buffer overflow); the request may "
                               "or may not have taken effect: query the kernel", errno=_errno.ENOBUFS)
                continue
            for off, length, mtype, flags, seq, pid in codec.iter_headers(data):
                job = waiting.get(seq)
                if job is None:
                    continue
                msg = codec.decode_message(data, off, length, mtype, flags, seq, pid)
                if isinstance(msg, (NlError, NlDone)):
                    job.outcome.answer = msg
                    del waiting[seq]
                else:
                    job.outcome.messages.append(msg)
        return lost

    def _send(self, data: bytes) -> None:
        sent = self._sock.send(data)
        if sent != len(data):  # pragma: no cover - netlink sends whole datagrams or fails
            raise OSError(_errno.EMSGSIZE, "short netlink send")

    def _recv(self) -> bytes:
        return self._receiver.recv()

    def _run_dump(self, job: _Dump) -> _Done:
        try:
            msgs = self._dump_sync(job.request, job.op, job.retries)
        except BaseException as exc:
            return job.slot, _Outcome(failure=exc)
        return job.slot, _Outcome(messages=msgs)

    def _report(self, fn: Callable[[T], None], arg: T) -> None:
        token = self._token
        assert token is not None
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(fn, arg)

    def _deliver(self, done: list[_Done]) -> None:
        """On the trio thread (KI-protected, as every run_sync_soon callback): hand the I/O thread's
        results to their waiters."""
        for slot, outcome in done:
            slot.settle(outcome)  # unless it failed meanwhile (closed)

    def _thread_ended(self, failure: BaseException | None) -> None:
        if failure is not None and not self._closed:  # pragma: no cover - see _io_loop
            self._broken = failure
            self._fail_all(trio.BrokenResourceError(f"the netlink I/O thread failed: {failure!r}"))

    # -- dumps, in the I/O thread ------------------------------------------------------------------

    def _take_dump_socket(self) -> NetlinkSocket:
        sock = self._dump_sock
        if sock is None:
            # A new dump socket must be created inside the namespace: enter it on this thread, and back.
            sock = self.runner.call_in_netns(self.kernel.open_netlink_socket, (), None, True)
            sock.settimeout(DUMP_TIMEOUT)
            self._dump_sock = sock
        return sock

    def _give_back_dump_socket(self, sock: NetlinkSocket, clean: bool) -> None:
        if not clean:  # a dump left half read: its socket cannot be reused
            self._dump_sock = None
            sock.close()

    def _dump_sync(
        self,
        request: bytes | RequestBuilder,
        op: str,
        retries: int,
    ) -> list[Message]:
        for _attempt in range(retries + 1):
            seq = next(self._dump_seq) & 0xFFFFFFFF or 1
            data = _build(request, seq)
            sock = self._take_dump_socket()
            clean = False
            try:
                chunks, end, interrupted = self._dump_once(sock, data, seq)
                clean = True
            except TimeoutError as exc:
                raise TCError(f"{op.replace('_', ' ')} failed: the kernel did not finish the dump within "
                              f"{DUMP_TIMEOUT:g} s", errno=_errno.ETIMEDOUT) from exc
            finally:
                self._give_back_dump_socket(sock, clean)
            if end.errno:
                raise NetlinkError(end.errno, op, end.extack_msg)
            if interrupted:
                continue
            out: list[Message] = []
            for chunk in chunks:
                out.extend(m for m in codec.decode_messages(chunk)
                           if m.seq == seq and not isinstance(m, (NlDone, NlError)))
            return out
        raise TCError(f"{op.replace('_', ' ')} failed: the dump was interrupted by concurrent changes "
                      f"{retries + 1} times in a row (NLM_F_DUMP_INTR)", errno=_errno.EINTR)

    @staticmethod
    def _dump_once(sock: NetlinkSocket, data: bytes, seq: int) -> tuple[list[bytes], NlError | NlDone, bool]:
        """Send a dump request and read until its NLMSG_DONE (or error). Runs in the I/O thread."""
        sock.send(data)
        chunks: list[bytes] = []
        interrupted = False
        while True:
            chunk = sock.recv(RECV_SIZE)
            chunks.append(chunk)
            for off, length, mtype, flags, mseq, _pid in codec.iter_headers(chunk):
                if mseq != seq:
                    continue
                if flags & codec.NLM_F_DUMP_INTR:
                    interrupted = True
                if mtype == codec.NLMSG_DONE or mtype == codec.NLMSG_ERROR:
                    (end,) = codec.decode_messages(chunk[off : off + length])
                    assert isinstance(end, (NlDone, NlError))
                    return chunks, end, interrupted

    # -- closing --------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the transport (idempotent): waiting requests and dumps raise ClosedResourceError; returns
        once the I/O thread has ended and the sockets are closed (a send the kernel holds up on rtnl is
        waited for, up to CLOSE_WAIT seconds; the thread closes the sockets itself if it ends later)."""
        self._close()
        thread = self._thread
        if thread is not None and thread.is_alive():
            # Joined from a worker thread: this works in any trio run, the thread's own one included.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join, CLOSE_WAIT)
        await trio.lowlevel.checkpoint()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_all(trio.ClosedResourceError("the netlink transport was closed"))
        with self._state_lock:
            if self._thread is None or self._thread_exited:
                self._close_sockets()
            else:
                self._jobs.put(_STOP)  # the thread closes the sockets: it may be using them right now

    def _close_sockets(self) -> None:
        self._sock.close()
        if self._dump_sock is not None:
            self._dump_sock.close()
            self._dump_sock = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._slots)} in flight"
        return f"<NetlinkTransport netns={self.runner.netns!r} {state}>"


@asynccontextmanager
async def open_transport(
    runner: NetnsRunner, *, rcvbuf: int = DEFAULT_RCVBUF, max_in_flight: int = 128, kernel: Kernel = LINUX
) -> AsyncIterator[NetlinkTransport]:
    """Open the rtnetlink transport of `runner`'s namespace; closed (its I/O thread ended, its sockets
    closed) on exit, however the block ends.

        async with open_transport(runner) as nl:
            await nl.request(lambda seq: codec.encode_qdisc_add_clsact(seq, ifindex), op="qdisc_add")
            filters = await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETTFILTER,
                                                                          ifindex, codec.INGRESS_PARENT))
    """
    transport = await start_transport(runner, rcvbuf=rcvbuf, max_in_flight=max_in_flight, kernel=kernel)
    try:
        yield transport
    finally:
        await transport.aclose()


async def start_transport(
    runner: NetnsRunner, *, rcvbuf: int = DEFAULT_RCVBUF, max_in_flight: int = 128, kernel: Kernel = LINUX
) -> NetlinkTransport:
    """Open the rtnetlink transport of `runner`'s namespace, for owners that cannot hold a context manager
    open across calls (a backend); `await transport.aclose()` ends it.

    The request socket is created in a worker thread inside the namespace, with its receive buffer raised
    to `rcvbuf` so that the answers of a whole batch always fit; at most `max_in_flight` requests wait at
    once (more wait for a turn). The I/O thread starts with the first request or dump.
    """
    sock = await runner.run(kernel.open_netlink_socket, (), rcvbuf)
    return NetlinkTransport(runner, sock, max_in_flight=max_in_flight, kernel=kernel)
