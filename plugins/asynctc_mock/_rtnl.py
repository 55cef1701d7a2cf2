"""The rtnetlink side of MockKernel: simulated NETLINK_ROUTE sockets and the kernel's request handler.

`MockNetlinkSocket` is what `MockKernel.open_netlink_socket` returns: the `asynctc.lowlevel.kernel.
NetlinkSocket` protocol over an in-memory queue of datagrams. It behaves as the kernel's socket does where
asynctc can tell:

- `send(data)` hands every netlink message of the datagram to the kernel in turn, synchronously (the real
  kernel runs the handler inside sendmsg), and the answers are queued before `send` returns: ACKs and
  errors (NLMSG_ERROR, capped, with the extended-ACK text where the kernel gives one), echoed objects, the
  object a non-dump RTM_GET* asks for, and the first part of a dump (the rest is produced as it is read,
  as the kernel continues a dump inside recvmsg);
- the receive queue is charged by datagram (its size plus the kernel's sk_buff overhead) against the
  receive buffer, which reads back as the kernel reports it (`SO_RCVBUF`: twice what was asked; the
  kernel's default otherwise). A datagram that finds the buffer over its limit is dropped; the socket is
  then congested and the next `recv` raises OSError(ENOBUFS) once, before any queued data (as
  sock_error() in the kernel's recvmsg); later drops stay silent until the queue has been emptied;
- `fileno()` is an eventfd that is readable exactly while a datagram or an error is waiting, so trio's
  `wait_readable` and `select.poll` work on it;
- `recv` blocks (or times out with TimeoutError, or raises BlockingIOError when non-blocking) like a real
  socket; `recv_nowait()` never blocks (`asynctc.lowlevel.nlsock.nonblocking_receiver` uses it).

Multicast: a socket joined to RTNLGRP_LINK (1) or RTNLGRP_TC (4) receives the kernel's notifications for
every change in the MockKernel, made over netlink or through its test helpers; as the kernel does, the
socket whose request caused a notification does not get the multicast copy (it asked for NLM_F_ECHO if it
wanted one).

The request handler (`RtnlHandler`) parses the bytes `asynctc.lowlevel.codec` produces (or any tool would)
and answers in the kernel's bytes; the tc semantics themselves (parents, blocks, priorities, handles,
errnos and extack texts) live in MockKernel (`_kernel.py`), so that its test helpers and netlink share
them.
"""

from __future__ import annotations

import errno as _errno
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from asynctc.lowlevel import codec

if TYPE_CHECKING:
    from ._kernel import MockKernel

__all__ = [
    "DEFAULT_RCVBUF",
    "DEFAULT_SNDBUF",
    "MockNetlinkSocket",
    "NlAttrs",
    "RtnlHandler",
    "TcRequest",
    "encode_chain_msg",
    "encode_filter_msg",
    "encode_link_msg",
    "encode_qdisc_msg",
    "truesize",
]

DEFAULT_RCVBUF: Final = 212992
"""net.core.rmem_default: a netlink socket's receive buffer unless one is asked for."""
DEFAULT_SNDBUF: Final = 212992
"""net.core.wmem_default."""
SOCK_MIN_RCVBUF: Final = 2304
DUMP_CHUNK: Final = 32 * 1024
"""The most bytes of one dump datagram (the kernel's dump skbs are at most 32 KiB)."""
NLMSG_GOODSIZE: Final = 3776
"""The size of the skb the kernel allocates for a notification (a page less skb_shared_info)."""
_SKB_OVERHEAD: Final = 256 + 320  # SKB_DATA_ALIGN(sizeof(struct sk_buff)) + ...(struct skb_shared_info)

SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
NETLINK_DROP_MEMBERSHIP: Final = 2
NETLINK_CAP_ACK: Final = 10
NETLINK_EXT_ACK: Final = 11
SO_RCVBUFFORCE: Final = 33
SO_SNDBUFFORCE: Final = 32

ARPHRD_ETHER: Final = 1
ARPHRD_LOOPBACK: Final = 772
IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4
IFLA_QDISC: Final = 6
IFLA_ALT_IFNAME: Final = 53

TCA_KIND: Final = 1
TCA_OPTIONS: Final = 2
TCA_CHAIN: Final = 11
TCA_BPF_CLASSID: Final = 3
TCA_BPF_OPS_LEN: Final = 4
TCA_BPF_OPS: Final = 5
TCA_BPF_FD: Final = 6
TCA_BPF_NAME: Final = 7
TCA_BPF_FLAGS: Final = 8
TCA_BPF_FLAGS_GEN: Final = 9
TCA_BPF_TAG: Final = 10
TCA_BPF_ID: Final = 11

_HDR = struct.Struct("=IHHII")
_NLA = struct.Struct("=HH")
_TCMSG = struct.Struct("=BxxxiIII")
_IFINFO = struct.Struct("=BxHiII")
_I32 = struct.Struct("=i")
_U32 = struct.Struct("=I")


def truesize(size: int) -> int:
    """What a datagram of `size` bytes costs against a receive buffer: the kernel charges an skb's
    truesize (its data rounded up to a kmalloc size, plus the sk_buff and skb_shared_info)."""
    data = (size + 63) & ~63
    alloc = 64
    while alloc < data + 320:
        alloc <<= 1
    return alloc - 320 + _SKB_OVERHEAD


# --------------------------------------------------------------------------------------------------------
# encoding


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attr(atype: int, payload: bytes) -> bytes:
    data = _NLA.pack(4 + len(payload), atype) + payload
    return data + b"\0" * (_align(len(data)) - len(data))


def _u32_attr(atype: int, value: int) -> bytes:
    return _attr(atype, _U32.pack(value & 0xFFFFFFFF))


def _str_attr(atype: int, value: str) -> bytes:
    return _attr(atype, value.encode() + b"\0")


def _message(mtype: int, flags: int, seq: int, portid: int, payload: bytes) -> bytes:
    return _HDR.pack(16 + len(payload), mtype, flags, seq & 0xFFFFFFFF, portid & 0xFFFFFFFF) + payload


def encode_ack(request: bytes, portid: int, err: int, extack: str | None) -> bytes:
    """NLMSG_ERROR answering `request` (its header echoed, capped: NETLINK_CAP_ACK is on), with the
    extended-ACK text as NLMSGERR_ATTR_MSG when given."""
    _length, _mtype, _flags, seq, _pid = _HDR.unpack_from(request, 0)
    flags = codec.NLM_F_CAPPED
    payload = _I32.pack(-err) + bytes(request[:16])
    if extack:
        flags |= codec.NLM_F_ACK_TLVS
        payload += _str_attr(codec.NLMSGERR_ATTR_MSG, extack)
    return _message(codec.NLMSG_ERROR, flags, seq, portid, payload)


def encode_done(seq: int, portid: int, err: int = 0) -> bytes:
    return _message(codec.NLMSG_DONE, codec.NLM_F_MULTI, seq, portid, _I32.pack(-err))


def encode_link_msg(mtype: int, flags: int, seq: int, portid: int, ifindex: int, name: str,
                    ifflags: int, loopback: bool) -> bytes:
    """RTM_NEWLINK / RTM_DELLINK: struct ifinfomsg, IFLA_IFNAME, IFLA_MTU and IFLA_QDISC (a device that is
    down has the noop qdisc)."""
    payload = _IFINFO.pack(socket.AF_UNSPEC, ARPHRD_LOOPBACK if loopback else ARPHRD_ETHER, ifindex,
                           ifflags, 0)
    payload += _str_attr(IFLA_IFNAME, name)
    payload += _u32_attr(IFLA_MTU, 65536 if loopback else 1500)
    payload += _str_attr(IFLA_QDISC, "noop")
    return _message(mtype, flags, seq, portid, payload)


def encode_qdisc_msg(mtype: int, flags: int, seq: int, portid: int, ifindex: int, parent: int, handle: int,
                     kind: str) -> bytes:
    """RTM_NEWQDISC / RTM_DELQDISC of a clsact or ingress qdisc (tcm_info: its reference count, 1)."""
    payload = _TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, 1) + _str_attr(TCA_KIND, kind)
    return _message(mtype, flags, seq, portid, payload)


def encode_chain_msg(mtype: int, flags: int, seq: int, portid: int, ifindex: int, parent: int, chain: int) -> bytes:
    """RTM_NEWCHAIN / RTM_DELCHAIN as tc_chain_fill_node builds it: the block's qdisc handle as parent,
    TCA_CHAIN."""
    payload = _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0) + _u32_attr(TCA_CHAIN, chain)
    return _message(mtype, flags, seq, portid, payload)


@dataclass(frozen=True, slots=True)
class FilterWire:
    """What one filter message carries (see `encode_filter_msg`); `handle` 0 is a classifier's head."""

    ifindex: int
    parent: int
    priority: int
    protocol: int
    chain: int
    kind: str
    handle: int = 0
    bpf_name: str | None = None
    bpf_id: int | None = None
    bpf_tag: str | None = None
    bpf_flags: int = 0
    gen_flags: int = 0
    classid: int = 0


def encode_filter_msg(mtype: int, flags: int, seq: int, portid: int, f: FilterWire) -> bytes:
    """RTM_NEWTFILTER / RTM_DELTFILTER as tcf_fill_node builds it: struct tcmsg (tcm_info = priority << 16
    | htons(protocol)), TCA_KIND, TCA_CHAIN, and for a filter (handle != 0) its TCA_OPTIONS (cls_bpf:
    TCA_BPF_CLASSID if set, TCA_BPF_NAME if named, TCA_BPF_ID, TCA_BPF_TAG, TCA_BPF_FLAGS if not 0,
    TCA_BPF_FLAGS_GEN; u32: TCA_U32_CLASSID if set). A classifier's head (handle 0) has no options."""
    info = (f.priority << 16) | socket.htons(f.protocol & 0xFFFF)
    payload = _TCMSG.pack(socket.AF_UNSPEC, f.ifindex, f.handle, f.parent, info)
    payload += _str_attr(TCA_KIND, f.kind) + _u32_attr(TCA_CHAIN, f.chain)
    if f.handle:
        opts = b""
        if f.kind == "bpf":
            if f.classid:
                opts += _u32_attr(TCA_BPF_CLASSID, f.classid)
            if f.bpf_name is not None:
                opts += _str_attr(TCA_BPF_NAME, f.bpf_name)
            if f.bpf_id is not None:
                opts += _u32_attr(TCA_BPF_ID, f.bpf_id)
            if f.bpf_tag:
                opts += _attr(TCA_BPF_TAG, bytes.fromhex(f.bpf_tag)[:8].ljust(8, b"\0"))
            if f.bpf_flags:
                opts += _u32_attr(TCA_BPF_FLAGS, f.bpf_flags)
            if f.gen_flags:
                opts += _u32_attr(TCA_BPF_FLAGS_GEN, f.gen_flags)
        elif f.classid:
            opts += _u32_attr(1, f.classid)  # TCA_U32_CLASSID
        payload += _attr(TCA_OPTIONS, opts)
    return _message(mtype, flags, seq, portid, payload)


# --------------------------------------------------------------------------------------------------------
# parsing requests


NlAttrs = dict[int, bytes]


def parse_attrs(data: bytes, start: int, end: int) -> NlAttrs:
    """Attribute type (without the nested/byte-order bits) -> payload; the first of a type wins."""
    out: NlAttrs = {}
    pos = start
    while pos + 4 <= end:
        alen, atype = _NLA.unpack_from(data, pos)
        if alen < 4 or pos + alen > end:
            break
        out.setdefault(atype & 0x3FFF, data[pos + 4 : pos + alen])
        pos += _align(alen)
    return out


def attr_str(attrs: NlAttrs, atype: int) -> str | None:
    raw = attrs.get(atype)
    return None if raw is None else raw.split(b"\0", 1)[0].decode(errors="replace")


def attr_u32(attrs: NlAttrs, atype: int) -> int | None:
    raw = attrs.get(atype)
    return None if raw is None or len(raw) < 4 else int(_U32.unpack_from(raw)[0])


@dataclass(frozen=True, slots=True)
class TcRequest:
    """One tc request as the kernel reads it: the header fields, struct tcmsg and the attributes used."""

    mtype: int
    flags: int
    seq: int
    portid: int
    ifindex: int
    handle: int
    parent: int
    info: int
    kind: str | None
    chain: int | None
    options: NlAttrs | None
    raw_options: bool  # TCA_OPTIONS was given

    @property
    def priority(self) -> int:
        return self.info >> 16

    @property
    def protocol(self) -> int:
        return socket.ntohs(self.info & 0xFFFF)


class RequestError(Exception):
    """A refused request: answered with NLMSG_ERROR (`errno`, and the extended-ACK text if any)."""

    def __init__(self, err: int, extack: str | None = None) -> None:
        super().__init__(err, extack)
        self.errno = err
        self.extack = extack


# --------------------------------------------------------------------------------------------------------
# the socket


class MockNetlinkSocket:
    """A NETLINK_ROUTE socket of a MockKernel (see the module docstring). Thread-safe: the transport's I/O
    thread, the trio thread and kernel notifications from any thread may use it at once."""

    def __init__(self, kernel: MockKernel, portid: int, groups: Iterable[int], rcvbuf: int | None,
                 blocking: bool) -> None:
        self._kernel = kernel
        self._portid = portid
        self.groups: frozenset[int] = frozenset(int(g) for g in groups)
        for g in self.groups:
            if not 0 < g < 64:
                raise OSError(_errno.EINVAL, f"invalid rtnetlink multicast group {g}")
        self._rcvbuf = DEFAULT_RCVBUF if rcvbuf is None else max(SOCK_MIN_RCVBUF, 2 * int(rcvbuf))
        self._sndbuf = DEFAULT_SNDBUF
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[tuple[bytes, int]] = deque()  # (datagram, truesize)
        self._rmem = 0
        self._congested = False
        self._error = 0  # sk_err: reported (and cleared) by the next recv
        self._dump: deque[bytes] | None = None  # messages of a dump not yet queued
        self._dump_end: bytes = b""
        self._dump_gen = 0  # the device list's sequence number when the dump began
        self._dump_checked = False  # whether the dump is checked against it (link dumps)
        self._timeout: float | None = None if blocking else 0.0
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ready = False
        self._closed = False
        self.dropped = 0
        """How many datagrams this socket lost to a full receive buffer."""

    # -- the socket protocol ------------------------------------------------------------------------
    def fileno(self) -> int:
        if self._closed:
            return -1
        return self._efd

    @property
    def portid(self) -> int:
        return self._portid

    def getsockname(self) -> tuple[int, int]:
        return self._portid, 0

    def getsockopt(self, level: int, optname: int, /) -> int:
        if level == socket.SOL_SOCKET and optname == socket.SO_RCVBUF:
            return self._rcvbuf
        if level == socket.SOL_SOCKET and optname == socket.SO_SNDBUF:
            return self._sndbuf
        raise OSError(_errno.ENOPROTOOPT, f"the simulated netlink socket has no option {level}/{optname}")

    def settimeout(self, value: float | None, /) -> None:
        if value is not None and value < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = value

    def setblocking(self, flag: bool, /) -> None:
        self._timeout = None if flag else 0.0

    def gettimeout(self) -> float | None:
        return self._timeout

    def send(self, data: bytes, /) -> int:
        """Hand each netlink message of the datagram to the kernel, in order; their answers are queued on
        this socket before this returns. EMSGSIZE for a datagram larger than the send buffer allows."""
        self._check_open()
        data = bytes(data)
        if len(data) > self._sndbuf - 32:
            raise OSError(_errno.EMSGSIZE, os.strerror(_errno.EMSGSIZE))
        self._kernel.rtnl.receive(self, data)
        return len(data)

    def recv(self, bufsize: int, /) -> bytes:
        """One datagram (truncated to `bufsize`), waiting as the socket's timeout says: TimeoutError after
        it, BlockingIOError at once when non-blocking; OSError(ENOBUFS) once after messages were lost."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        with self._cond:
            while True:
                self._check_open()
                got = self._take_locked()
                if got is not None:
                    return got[:bufsize]
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if self._timeout == 0:
                        raise BlockingIOError(_errno.EAGAIN, os.strerror(_errno.EAGAIN))
                    raise TimeoutError("timed out")
                self._cond.wait(remaining)

    def recv_nowait(self) -> bytes:
        """One datagram without waiting; BlockingIOError when none is queued, OSError(ENOBUFS) once after
        messages were dropped (before the datagrams still queued)."""
        with self._cond:
            self._check_open()
            got = self._take_locked()
            if got is None:
                raise BlockingIOError(_errno.EAGAIN, os.strerror(_errno.EAGAIN))
            return got

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._dump = None
            self._cond.notify_all()
        self._kernel.rtnl.forget(self)
        os.close(self._efd)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._queue)} queued"
        return f"<MockNetlinkSocket portid={self._portid} groups={sorted(self.groups)} {state}>"

    # -- the kernel's side --------------------------------------------------------------------------
    def deliver(self, datagram: bytes, size: int | None = None) -> bool:
        """Queue a datagram as the kernel does (netlink_attachskb / netlink_broadcast_deliver): dropped
        when the buffer is over its limit or the socket is congested; the first drop sets ENOBUFS.
        `size` is the skb's allocation (notifications are NLMSG_GOODSIZE skbs); returns whether queued."""
        cost = truesize(len(datagram) if size is None else max(size, len(datagram)))
        with self._cond:
            if self._closed:
                return False
            if self._rmem > self._rcvbuf or self._congested:
                self.dropped += 1
                if not self._congested:
                    self._congested = True
                    self._error = _errno.ENOBUFS
                    self._update_ready()
                return False
            self._queue.append((datagram, cost))
            self._rmem += cost
            self._update_ready()
            self._cond.notify_all()
            return True

    def lose_queued(self) -> None:
        """Lose every datagram queued and not read yet, as a reader that fell behind loses what did not fit:
        the next read raises ENOBUFS (`MockKernel.overflow_events`)."""
        with self._cond:
            if self._closed:
                return
            self.dropped += len(self._queue)
            self._queue.clear()
            self._rmem = 0
            self._error = _errno.ENOBUFS
            self._update_ready()
            self._cond.notify_all()

    def start_dump(self, messages: list[bytes], done: bytes, *, consistent: bool = False) -> None:
        """A dump's answer: its messages (each NLM_F_MULTI) and the NLMSG_DONE that ends it. The first
        datagram is queued now; the rest as the queue is read, as the kernel continues a dump in recvmsg.
        `consistent`: the kernel checks this dump's consistency (a link dump, against the device list's
        sequence number; tc dumps are never checked)."""
        with self._cond:
            self._dump = deque(messages)
            self._dump_end = done
            self._dump_checked = consistent
            self._dump_gen = self._kernel.rtnl.dev_base_seq
            self._continue_dump_locked()
            self._update_ready()
            self._cond.notify_all()

    def _continue_dump_locked(self) -> None:
        pending = self._dump
        if pending is None or self._rmem > self._rcvbuf // 2:
            return
        chunk = bytearray()
        while pending and len(chunk) + len(pending[0]) <= DUMP_CHUNK:
            chunk += pending.popleft()
        if not chunk and pending:  # one message larger than a chunk (never for tc): alone
            chunk += pending.popleft()
        if not chunk or (not pending and len(chunk) + len(self._dump_end) <= DUMP_CHUNK):
            chunk += self._dump_end  # the end rides with the last messages when it fits
            self._dump = None
        if self._dump_checked and self._kernel.rtnl.dev_base_seq != self._dump_gen:
            # nl_dump_check_consistent: devices came or went since the link dump began; every message
            # written from now on (NLMSG_DONE included) says so, and the reader must dump again.
            for off, _length, _mtype, flags, _seq, _pid in codec.iter_headers(bytes(chunk)):
                struct.pack_into("=H", chunk, off + 6, flags | codec.NLM_F_DUMP_INTR)
        cost = truesize(len(chunk))
        self._queue.append((bytes(chunk), cost))
        self._rmem += cost

    def _take_locked(self) -> bytes | None:
        if self._error:
            err, self._error = self._error, 0
            self._update_ready()
            raise OSError(err, os.strerror(err))
        if not self._queue and self._dump is not None:
            self._continue_dump_locked()
        if not self._queue:
            return None
        datagram, cost = self._queue.popleft()
        self._rmem -= cost
        if not self._queue:
            self._congested = False  # netlink_rcv_wake: an emptied queue takes messages again
            if self._dump is not None:
                self._continue_dump_locked()
        self._update_ready()
        return datagram

    def _update_ready(self) -> None:
        ready = bool(self._queue) or bool(self._error) or self._dump is not None
        if ready and not self._ready:
            os.eventfd_write(self._efd, 1)
        elif not ready and self._ready:
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:  # pragma: no cover - the counter is set while ready
                pass
        self._ready = ready

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(_errno.EBADF, "the simulated netlink socket is closed")


# --------------------------------------------------------------------------------------------------------
# the request handler


def iter_messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, message bytes) of each whole message of a datagram, as netlink_rcv_skb walks it."""
    for off, length, mtype, _flags, _seq, _pid in codec.iter_headers(data):
        yield mtype, data[off : off + length]


class RtnlHandler:
    """rtnetlink_rcv for one MockKernel: the sockets it knows, requests in, answers and notifications out."""

    def __init__(self, kernel: MockKernel) -> None:
        self._kernel = kernel
        self._lock = threading.Lock()
        self._sockets: list[MockNetlinkSocket] = []
        self._next_portid = 1 << 12
        self.dev_base_seq = 0
        """The device list's sequence number (the kernel's dev_base_seq): one more for every device added or
        removed; a link dump that spans a change is marked NLM_F_DUMP_INTR."""

    def open(self, groups: Iterable[int], rcvbuf: int | None, blocking: bool) -> MockNetlinkSocket:
        with self._lock:
            portid = self._next_portid
            self._next_portid += 1
            sock = MockNetlinkSocket(self._kernel, portid, groups, rcvbuf, blocking)
            self._sockets.append(sock)
        return sock

    def forget(self, sock: MockNetlinkSocket) -> None:
        with self._lock:
            if sock in self._sockets:
                self._sockets.remove(sock)

    def sockets(self) -> list[MockNetlinkSocket]:
        with self._lock:
            return list(self._sockets)

    def notify(self, group: int, message: bytes, *, exclude: int = 0) -> None:
        """Multicast one notification to every socket joined to `group` but the one (portid `exclude`)
        whose request caused it."""
        for sock in self.sockets():
            if group in sock.groups and sock.portid != exclude:
                sock.deliver(message, NLMSG_GOODSIZE)

    # -- requests -----------------------------------------------------------------------------------
    def receive(self, sock: MockNetlinkSocket, data: bytes) -> None:
        """netlink_rcv_skb: each message in turn; requests are handled, and answered with an ACK when they
        asked for one or failed."""
        for mtype, msg in iter_messages(data):
            _length, _t, flags, _seq, _pid = _HDR.unpack_from(msg, 0)
            if not flags & codec.NLM_F_REQUEST or mtype < 0x10:
                if flags & codec.NLM_F_ACK:
                    sock.deliver(encode_ack(msg, sock.portid, 0, None))
                continue
            err, extack = 0, None
            try:
                self._kernel.rtnl_request(sock, mtype, flags, msg)
            except RequestError as exc:
                err, extack = exc.errno, exc.extack
            if err or flags & codec.NLM_F_ACK:
                is_dump = mtype in _GET_TYPES and flags & codec.NLM_F_DUMP
                if is_dump and not err:
                    continue  # a dump answers with NLMSG_DONE, not an ACK
                sock.deliver(encode_ack(msg, sock.portid, err, extack))


_GET_TYPES: Final = frozenset({codec.RTM_GETLINK, codec.RTM_GETQDISC, codec.RTM_GETTFILTER, codec.RTM_GETCHAIN})


def parse_tc(msg: bytes) -> TcRequest:
    """struct tcmsg and the attributes of a tc request; EINVAL for a message too short to hold them."""
    length, mtype, flags, seq, pid = _HDR.unpack_from(msg, 0)
    if length < 16 + _TCMSG.size:
        raise RequestError(_errno.EINVAL)
    _family, ifindex, handle, parent, info = _TCMSG.unpack_from(msg, 16)
    attrs = parse_attrs(msg, 16 + _TCMSG.size, length)
    options = None
    if TCA_OPTIONS in attrs:
        raw = attrs[TCA_OPTIONS]
        options = parse_attrs(raw, 0, len(raw))
    return TcRequest(mtype, flags, seq, pid, ifindex, handle, parent, info, attr_str(attrs, TCA_KIND),
                     attr_u32(attrs, TCA_CHAIN), options, TCA_OPTIONS in attrs)


def parse_link(msg: bytes) -> tuple[int, str | None]:
    """(ifi_index, IFLA_IFNAME or IFLA_ALT_IFNAME) of an RTM_GETLINK."""
    length = _HDR.unpack_from(msg, 0)[0]
    if length < 16 + _IFINFO.size:
        raise RequestError(_errno.EINVAL)
    _family, _type, ifindex, _flags, _change = _IFINFO.unpack_from(msg, 16)
    attrs = parse_attrs(msg, 16 + _IFINFO.size, length)
    return ifindex, attr_str(attrs, IFLA_IFNAME) or attr_str(attrs, IFLA_ALT_IFNAME)
