"""rtnetlink multicast events: a socket subscribed to rtnetlink groups, read non-blockingly on the trio
thread (`MulticastSocket`, `open_multicast_socket`).

When the kernel had to drop events because the receive buffer was full, `receive()` raises `EventsLost`
once; the socket keeps working, and the consumer should re-dump and diff to resynchronise.
NETLINK_NO_ENOBUFS is never set: it would hide the loss.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import socket
from collections.abc import Iterable
from types import TracebackType

import trio

from .._errors import TCError
from . import codec
from .codec import Message
from .kernel import LINUX, Kernel, NetlinkSocket
from .netns import NetnsRunner
from .nlsock import nonblocking_receiver

__all__ = ["EventsLost", "MulticastSocket", "open_multicast_socket"]


class EventsLost(TCError):
    """The kernel dropped rtnetlink events for this socket (ENOBUFS: its receive buffer was full).

    A subclass of `asynctc.TCError` with `.errno == errno.ENOBUFS`. The socket keeps working and later
    events arrive as usual, but some changes were never reported: re-dump what you track and diff against
    your state. Raise the buffer with `open_multicast_socket(..., rcvbuf=...)` if this happens often.
    """

    def __init__(self, message: str | None = None) -> None:
        super().__init__(
            message
            or "rtnetlink events were lost (ENOBUFS: the socket's receive buffer overflowed); "
            "re-dump and diff to resynchronise, or open the socket with a larger rcvbuf",
            errno=_errno.ENOBUFS,
        )


class MulticastSocket:
    """A socket subscribed to rtnetlink multicast groups; `receive()` returns the next decoded events.

    Reading happens on the trio thread (multicast delivery runs in the sender's context, so recv() only
    copies queued messages), with a `NonblockingReceiver` that keeps the GIL. Each `receive()` call returns
    at most `max_batch` messages so that a burst never holds the trio thread for long (~35 us per message
    to read and decode on average, measured under load, several times that at worst: the kernel's
    deferred work can run on the way out of a recv).

    To track state without a gap: open this socket first, then dump, then apply the events.
    """

    def __init__(self, sock: NetlinkSocket, *, max_batch: int = 16) -> None:
        self._sock = sock
        self._receiver = nonblocking_receiver(sock)
        self._max_batch = max_batch
        self._lost = False
        self._closed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def rcvbuf(self) -> int:
        """The receive buffer size the kernel uses (it doubles what was asked, for bookkeeping)."""
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    async def receive(self) -> list[Message]:
        """Wait for events and return them (a non-empty list, in the kernel's order).

        Raises `EventsLost` when the kernel dropped events since the last call (ENOBUFS); messages read
        before the loss was noticed are returned first, and the socket keeps working afterwards. Raises
        trio.ClosedResourceError once closed. Cancellation never loses messages that were read.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the multicast socket is closed")
            if self._lost:
                self._lost = False
                await trio.lowlevel.cancel_shielded_checkpoint()
                raise EventsLost()
            msgs = self._read_batch()
            if msgs:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return msgs
            if self._lost:
                continue
            await trio.lowlevel.wait_readable(self._sock)

    def _read_batch(self) -> list[Message]:
        out: list[Message] = []
        while len(out) < self._max_batch:
            try:
                data = self._receiver.recv()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == _errno.ENOBUFS:
                    self._lost = True
                    break
                raise
            out.extend(codec.decode_messages(data))
        return out

    def drain(self) -> int:
        """Read and discard everything queued (blocking I/O-free; call it from a worker thread for a big
        queue); returns how many datagrams were discarded.

        Why: after an overflow the kernel marks the socket congested (NETLINK_S_CONGESTED) and reports
        ENOBUFS again only once the receive queue has been emptied; a consumer that re-dumps after a loss
        must empty the queue first (the dump supersedes what is in it), or later losses go unreported."""
        count = 0
        while not self._closed:
            try:
                self._receiver.recv()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != _errno.ENOBUFS:
                    raise
                continue
            count += 1
        self._lost = False
        return count

    def close(self) -> None:
        """Close the socket (idempotent); a task blocked in receive() gets trio.ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # outside trio.run nobody can be waiting on it
            trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def __enter__(self) -> MulticastSocket:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> MulticastSocket:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def open_multicast_socket(
    runner: NetnsRunner,
    groups: Iterable[int] = (codec.RTNLGRP_LINK, codec.RTNLGRP_TC),
    rcvbuf: int | None = None,
    *,
    max_batch: int = 16,
    kernel: Kernel = LINUX,
) -> MulticastSocket:
    """A `MulticastSocket` for `runner`'s namespace, joined to `groups` (created in a worker thread inside
    the namespace). `rcvbuf` sets the receive buffer with SO_RCVBUFFORCE (bytes; the kernel doubles it).

        async with await open_multicast_socket(runner) as events:
            while True:
                try:
                    for msg in await events.receive():
                        ...  # codec.LinkMsg / QdiscMsg / FilterMsg / ChainMsg
                except EventsLost:
                    ...  # re-dump and diff
    """
    sock = await runner.run(kernel.open_netlink_socket, tuple(groups), rcvbuf)
    return MulticastSocket(sock, max_batch=max_batch)
