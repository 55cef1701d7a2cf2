"""rtnetlink sockets: creating one inside a namespace, and reading it without giving up the GIL.

A netlink socket belongs to the namespace of the thread that created it: create it inside the namespace
(through a `NetnsRunner`); using it later needs no namespace switch. The transport
(`asynctc.lowlevel.transport`) and the multicast event socket (`asynctc.lowlevel.multicast`) are built on
these.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from .kernel import NetlinkSocket

__all__ = [
    "NETLINK_ADD_MEMBERSHIP",
    "NETLINK_CAP_ACK",
    "NETLINK_EXT_ACK",
    "RECV_SIZE",
    "SOL_NETLINK",
    "SO_RCVBUFFORCE",
    "NetlinkError",
    "NonblockingReceiver",
    "Receiver",
    "nonblocking_receiver",
    "open_netlink_socket",
]

SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
NETLINK_CAP_ACK: Final = 10
NETLINK_EXT_ACK: Final = 11
SO_RCVBUFFORCE: Final = 33
RECV_SIZE: Final = 64 * 1024  # the kernel builds dump skbs of at most 32 KiB; events and ACKs are smaller


class NetlinkError(OSError):
    """A request or dump the kernel refused: `errno` is the kernel's, `op` names what was asked, `extack` is
    the kernel's extended-ACK text (None when it gave none)."""

    def __init__(self, err: int, op: str, extack: str | None = None) -> None:
        super().__init__(err, os.strerror(err))
        self.op = op
        self.extack = extack

    @property
    def detail(self) -> str | None:
        """The kernel's own words, for messages."""
        return self.extack

    def __str__(self) -> str:
        text = f"netlink {self.op}: [Errno {self.errno}] {self.strerror}"
        return f"{text}: {self.extack}" if self.extack else text


def open_netlink_socket(
    groups: Iterable[int] = (), rcvbuf: int | None = None, blocking: bool = False
) -> socket.socket:
    """A NETLINK_ROUTE socket for the CALLING THREAD's network namespace (call it through the runner).

    Extended ACKs (kernel error strings) and capped ACKs (errors do not echo the whole request) are
    switched on. `groups` are rtnetlink multicast group numbers (RTNLGRP_LINK = 1, RTNLGRP_TC = 4),
    joined with NETLINK_ADD_MEMBERSHIP. `rcvbuf` is set with SO_RCVBUFFORCE (past rmem_max; root only),
    falling back to SO_RCVBUF (capped at rmem_max) without CAP_NET_ADMIN.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        if rcvbuf is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, 0))
        for group in groups:
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        sock.setblocking(blocking)
    except BaseException:
        sock.close()
        raise
    return sock


_libc_gil = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held during the call
_recv_gil = _libc_gil.recv
_recv_gil.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_recv_gil.restype = ctypes.c_ssize_t


class NonblockingReceiver:
    """Non-blocking recv() of datagrams from one socket that keeps the GIL during the system call.

    Why: Python's socket.recv() releases the GIL around every call, and a thread that gives the GIL up
    that often loses it to a busy thread for up to the interpreter's switch interval (5 ms) each time:
    measured, single non-blocking recv() calls of the trio thread that took 4.8 ms while the transport's
    I/O thread was busy. A non-blocking recv() returns in microseconds, so holding the GIL through it
    costs the other threads nothing. Blocking waits (select, epoll, sendmsg) still release the GIL.

    `recv()` returns one datagram (up to RECV_SIZE bytes), raises BlockingIOError when none is queued and
    OSError for the socket's errors (ENOBUFS: the kernel dropped messages). It owns a buffer: never call
    one receiver from two threads at once.
    """

    def __init__(self, sock: socket.socket, size: int = RECV_SIZE) -> None:
        self._sock = sock
        self._size = size
        self._buf = ctypes.create_string_buffer(size)

    def recv(self) -> bytes:
        n = _recv_gil(self._sock.fileno(), self._buf, self._size, socket.MSG_DONTWAIT)
        if n < 0:
            err = ctypes.get_errno()
            if err in (_errno.EAGAIN, _errno.EWOULDBLOCK):
                raise BlockingIOError(err, os.strerror(err))
            raise OSError(err, os.strerror(err))
        return ctypes.string_at(self._buf, n)


class Receiver(Protocol):
    """Non-blocking datagram reads: `recv()` as `NonblockingReceiver.recv`."""

    def recv(self) -> bytes: ...


def nonblocking_receiver(sock: NetlinkSocket) -> Receiver:
    """A non-blocking reader of `sock`: a `NonblockingReceiver` for a real socket; a simulated kernel's
    socket reads itself (its `recv_nowait`, with the same contract)."""
    if isinstance(sock, socket.socket):
        return NonblockingReceiver(sock)
    recv_nowait: Callable[[], bytes] | None = getattr(sock, "recv_nowait", None)
    if recv_nowait is None:
        raise TypeError(f"{sock!r} is neither a socket nor a simulated netlink socket with recv_nowait()")

    class _Simulated:
        def recv(self) -> bytes:
            assert recv_nowait is not None
            return recv_nowait()

    return _Simulated()

