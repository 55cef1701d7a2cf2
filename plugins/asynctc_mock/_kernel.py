"""MockKernel: a simulated kernel, answering asynctc's kernel boundary with Linux's traffic-control rules.

The model keeps the kernel's rules, not a list of successes: tcx hooks are ordered arrays of at most 63
programs with revisions (including the reset rule), anchors, EEXIST/ENOENT/ERANGE/ESTALE answers, link
compare-and-swap and severing; the legacy side has clsact/ingress qdiscs with a creator tag, cls_bpf
filters keyed by (direction, priority, handle) with EXCL/REPLACE semantics and offload flags. Packets can
be pushed through a hook (`send`), faults and latency can be injected, and every change is notified on
the simulated rtnetlink multicast groups (`_rtnl`), as the kernel does.

Threading: every public method takes one re-entrant lock, so the kernel can be driven from many worker
threads at once (backends call it through `ctx.runner.run`). Injected latency blocks the calling thread,
and the kernel calls behind it queue up, as behind a kernel waiting for RCU grace periods under rtnl;
the state lock is not held meanwhile, so dup and close of fds go on (see `_delay`).

Errors: low-level operations raise `KernelError` (an OSError with the kernel's errno and the operation
name); backends turn them into asynctc exceptions with `asynctc.from_errno`.

Process model (for orphans): objects record the session tag ("owner:pid.start.serial") of the session that
created them (a filter inside its owner tag, the name `asynctc.lowlevel.tcpolicy.format_tag` gives). A tag's
process is alive while a process with that pid and start time exists (read from /proc) and nobody called
`kill_process(tag)`; `kill_process` also destroys the tag's unpinned links, as the real kernel does when the
last fd of a link is closed by SIGKILL. Legacy filters survive. Through the bpf(2) boundary, the fds opened
inside `with kernel.process(tag):` are that process's: killing it closes them (their numbers answer EBADF
until closed), so the links only they held are detached.

The bpf(2) boundary (`kernel.bpf`, `kernel.pins`, see `_syscalls`) and the high-level API share one state:
a link made through either shows in the other's queries.
"""

from __future__ import annotations

import contextvars
import difflib
import errno as _errno
import hashlib
import itertools
import math
import os
import stat
import struct
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, NoReturn, TypeAlias

from asynctc import Direction, Program, ProgramError
from asynctc.lowlevel import bpf, codec
from asynctc.lowlevel.kernel import DeviceNameLookups, Kernel
from asynctc.lowlevel.tcpolicy import parse_session_tag, parse_tag, process_alive

from ._locks import LockTable, MockDeviceLocks, MockPinClaim
from ._rtnl import (
    NLMSG_GOODSIZE,
    FilterWire,
    MockNetlinkSocket,
    RequestError,
    RtnlHandler,
    encode_chain_msg,
    encode_done,
    encode_filter_msg,
    encode_link_msg,
    encode_qdisc_msg,
    parse_link,
    parse_tc,
)
from ._syscalls import BpfSyscallsMixin, MockPins, MockSyscalls

__all__ = [
    "MAX_TCX_PROGS",
    "OPERATIONS",
    "FilterInfo",
    "KernelError",
    "LinkInfo",
    "MockKernel",
    "QdiscInfo",
    "SimulatedProgram",
    "TcxEntryInfo",
    "TcxQuery",
]

MAX_TCX_PROGS = 63
"""The most programs one tcx hook holds; the 64th attach fails with ERANGE."""

TC_H_CLSACT = 0xFFFFFFF1
"""Parent of the clsact (and ingress) qdisc."""
TC_H_ROOT = 0xFFFFFFFF
CLSACT_HANDLE = 0xFFFF0000
AUTO_PRIO_FIRST = 0xC000
"""The priority the kernel gives the first filter added with priority 0."""
AUTO_PRIO_LOWEST = 0x8000
"""Priority 0 asks the kernel for one below the lowest priority from here up (ENOSPC if this one is taken)."""
TCA_BPF_FLAG_ACT_DIRECT = 1
HOOK_PARENTS = {Direction.INGRESS: codec.INGRESS_PARENT, Direction.EGRESS: codec.EGRESS_PARENT}

SIM_PROG_ID_BASE = 1 << 30
"""Simulated program ids start here, far above the ids of real programs."""

_TCA_BPF_CLASSID, _TCA_BPF_OPS_LEN, _TCA_BPF_OPS, _TCA_BPF_FD, _TCA_BPF_NAME = 3, 4, 5, 6, 7
_TCA_BPF_FLAGS, _TCA_BPF_FLAGS_GEN = 8, 9


def _opt_u32(opts: dict[int, bytes], atype: int) -> int | None:
    raw = opts.get(atype)
    return None if raw is None or len(raw) < 4 else int(struct.unpack_from("=I", raw)[0])


def _opt_str(opts: dict[int, bytes], atype: int) -> str | None:
    raw = opts.get(atype)
    return None if raw is None else raw.split(b"\0", 1)[0].decode(errors="replace")


Verdict: TypeAlias = Literal["pass", "drop", "next"]
_VERDICT_CODES: dict[int, Verdict] = {0: "pass", 2: "drop", -1: "next"}

DevRef: TypeAlias = "str | int"


BPF_OPERATIONS = frozenset({
    "prog_load", "prog_info", "prog_get_fd_by_id", "prog_test_run", "prog_query",
    "map_create", "map_info", "map_lookup", "map_update", "map_delete", "map_get_next_key", "map_get_fd_by_id",
    "obj_pin", "obj_get", "obj_unpin",
    "link_create", "link_update", "link_update_cas", "link_detach", "link_info", "link_get_fd_by_id",
    "link_get_next_id", "enable_stats",
})
"""The operation names of the bpf(2) boundary: the `op` that `asynctc.lowlevel.bpf.Bpf` passes with each
call ("obj_unpin" is `pins.unpin`)."""

NETLINK_OPERATIONS = frozenset({
    "qdisc_add", "qdisc_delete", "qdisc_get", "qdisc_dump",
    "filter_add", "filter_replace", "filter_delete", "filter_get", "filter_dump",
    "filter_add_hw", "filter_replace_hw", "link_get", "link_dump",
})
"""The operation names of the rtnetlink side (RTM_*QDISC, RTM_*TFILTER, RTM_GETLINK requests), the hardware
steps of a cls_bpf add or replace included."""

HIGH_LEVEL_OPERATIONS = frozenset({
    "link_create", "link_update", "link_detach", "link_info", "link_close", "prog_query", "prog_attach",
    "prog_detach", "qdisc_add", "qdisc_delete", "qdisc_get", "filter_add", "filter_add_hw", "filter_replace",
    "filter_replace_hw", "filter_delete", "filter_dump", "obj_pin", "obj_get", "obj_unpin",
    "dev_add", "dev_del", "dev_get",
})
"""The operation names of MockKernel's own methods (and of `if_nametoindex`/`if_indextoname`: "dev_get")."""

FD_OPERATIONS = frozenset({"close", "dup"})
"""close(2) and dup(2) of the kernel's fds: counted and delayed, never faulted (close() never fails)."""

OPERATIONS: frozenset[str] = BPF_OPERATIONS | NETLINK_OPERATIONS | HIGH_LEVEL_OPERATIONS | FD_OPERATIONS
"""Every operation name MockKernel counts (`calls`), delays (`set_latency`) and faults (`inject_fault`): the
one list `inject_fault` and `set_latency` check names against."""

_UNFAULTABLE = FD_OPERATIONS


def _check_op(op: str, what: str, allowed: frozenset[str] = OPERATIONS) -> None:
    """ValueError naming `op` and the close matches among `allowed` when `op` is not one of them."""
    if isinstance(op, str) and op in allowed:
        return
    close = difflib.get_close_matches(str(op), sorted(allowed), n=4)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"{what}: unknown operation {op!r}{hint} (the names are asynctc_mock._kernel.OPERATIONS: "
                     f"{', '.join(sorted(allowed))})")


_NO_RTNL = frozenset({"dup", "close", "dev_get"})
"""Calls that take no rtnl on the kernel (dup, close, the SIOCGIF* device lookups): they never wait behind
another call's injected latency."""
_NESTED_STEPS = frozenset({"filter_add_hw", "filter_replace_hw"})
"""Steps inside another operation (the hardware step of a skip_sw filter): their latency is slept holding the
lock, so nobody sees the operation half done."""

_FAULT_FAMILIES = {"link_update_cas": "link_update"}
"""An operation that a fault injected under a broader name fails too (every BPF_LINK_UPDATE is a
"link_update")."""


class KernelError(OSError):
    """A refused MockKernel operation: `errno` is what the real kernel answers, `op` what was attempted.

    `extack` is the extended-ACK text the real kernel gives with this refusal over netlink (None where it
    gives none); `detail` says more for people reading the error."""

    def __init__(self, err: int, op: str, detail: str = "", *, extack: str | None = None) -> None:
        detail = detail or (extack or "")
        super().__init__(err, f"{op}: {os.strerror(err)}" + (f" ({detail})" if detail else ""))
        self.op = op
        self.detail = detail
        self.extack = extack


# -- value types returned by the kernel ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TcxEntryInfo:
    """One program of a tcx hook: its program and its link (0 for a plain BPF_PROG_ATTACH entry)."""

    prog_id: int
    link_id: int


@dataclass(frozen=True, slots=True)
class TcxQuery:
    """BPF_PROG_QUERY's answer: the hook's revision and its entries in run order."""

    revision: int
    entries: tuple[TcxEntryInfo, ...]

    @property
    def prog_ids(self) -> tuple[int, ...]:
        return tuple(e.prog_id for e in self.entries)


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """A tcx link as bpf_link_info shows it: ifindex 0 once it was detached or severed."""

    link_id: int
    prog_id: int
    ifindex: int
    direction: Direction
    creator: str | None
    pinned: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class QdiscInfo:
    """The clsact (or ingress) qdisc of a device and the session tag that created it (None: unknown)."""

    ifindex: int
    kind: str
    handle: int
    parent: int
    creator: str | None


@dataclass(frozen=True, slots=True)
class FilterInfo:
    """A tc filter: kind "bpf" for cls_bpf (with prog_id), another kind (e.g. "u32") for other classifiers.

    `name` is cls_bpf's TCA_BPF_NAME; `skip_sw`, `skip_hw`, `in_hw` and `not_in_hw` are TCA_BPF_FLAGS_GEN.
    """

    ifindex: int
    direction: Direction
    priority: int
    handle: int
    kind: str
    prog_id: int | None
    name: str
    skip_sw: bool
    skip_hw: bool
    in_hw: bool

    @property
    def not_in_hw(self) -> bool:
        return not self.in_hw


# -- internal records ------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Prog:
    id: int
    name: str
    tag: str
    type: int
    verdict: Verdict | None  # simulated programs
    real_fd: int | None  # the kernel's own reference on a real program (a dup of its fd)
    offloadable: bool
    count: int = 0
    pins: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Link:
    id: int
    prog_id: int
    ifindex: int  # 0 once detached or severed
    direction: Direction
    creator: str | None
    holders: int = 1  # holders without an fd: the high-level `link_create` and `obj_get` give one each
    pins: set[str] = field(default_factory=set)
    files: int = 0  # open files (fds) on it

    @property
    def attach_type(self) -> int:
        return bpf.BPF_TCX_INGRESS if self.direction is Direction.INGRESS else bpf.BPF_TCX_EGRESS


@dataclass(slots=True)
class _Map:
    """An array map (the only type the mock creates): `data` holds max_entries values back to back."""

    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str
    data: bytearray
    refs: int = 0  # open files on it
    pins: set[str] = field(default_factory=set)


FileKind: TypeAlias = Literal["prog", "map", "link", "stats"]


@dataclass(slots=True)
class _File:
    """One open file the kernel handed out (what an fd refers to): a memfd of its own, so its inode names
    it and a dup() of the fd is recognised as the same file. Holds one reference on its object."""

    inode: int
    kind: FileKind
    obj_id: int
    owner: str | None  # the process (session tag) that opened it, see `MockKernel.process`
    fds: set[int] = field(default_factory=set)
    dead: bool = False  # its process was killed: the reference is gone, the fd answers EBADF


@dataclass(slots=True)
class _Entry:
    prog_id: int
    link_id: int  # 0: attached without a link


@dataclass(slots=True)
class _Hook:
    entries: list[_Entry] = field(default_factory=list)
    revision: int = 1


@dataclass(slots=True, eq=False)
class _Filter:
    """One filter: a cls_bpf program or a u32 key node (kind "u32")."""

    direction: Direction
    priority: int
    handle: int
    kind: str
    prog_id: int | None
    name: str
    skip_sw: bool
    skip_hw: bool
    in_hw: bool
    verdict: Verdict  # for non-bpf classifiers: what a match means ("pass": it ends classification)
    named: bool = True  # cls_bpf: TCA_BPF_NAME was given
    bpf_flags: int = TCA_BPF_FLAG_ACT_DIRECT  # cls_bpf: TCA_BPF_FLAGS as given (0: not direct action)
    classid: int = 0

    @property
    def gen_flags(self) -> int:
        """TCA_BPF_FLAGS_GEN as a dump shows it (the kernel adds not_in_hw to every software filter)."""
        flags = (codec.TCA_CLS_FLAGS_SKIP_HW if self.skip_hw else 0) | (
            codec.TCA_CLS_FLAGS_SKIP_SW if self.skip_sw else 0)
        return flags | (codec.TCA_CLS_FLAGS_IN_HW if self.in_hw else codec.TCA_CLS_FLAGS_NOT_IN_HW)


@dataclass(slots=True, eq=False)
class _Tp:
    """A classifier instance (struct tcf_proto): one priority of one chain, of one kind, holding its
    filters in run (and dump) order. cls_bpf puts a new filter at the head; u32 keeps its key nodes sorted
    by handle behind its root hash table `ht`."""

    priority: int
    protocol: int
    kind: str
    chain: int
    filters: list[_Filter] = field(default_factory=list)
    ht: int = 0


@dataclass(slots=True, eq=False)
class _U32Common:
    """cls_u32's state shared by every u32 classifier of a block (tc_u_common): hash table ids are handed
    out cyclically, and the last key node of the last u32 classifier takes the classifier with it."""

    refcnt: int = 0
    knodes: int = 0
    next_id: int = 1
    ids: set[int] = field(default_factory=set)


@dataclass(slots=True, eq=False)
class _Block:
    """A filter block (struct tcf_block): chains (by index, in creation order) of classifiers in chain
    order. `classid` is the parent the last RTM_NEWTFILTER spelled: dumps report it as every filter's
    parent (an ingress qdisc's one block answers to ffff:, ffff:fff1, ffff:fff2 and ffff:fff3)."""

    direction: Direction
    classid: int
    chains: dict[int, list[_Tp]] = field(default_factory=dict)
    u32: _U32Common | None = None


@dataclass(slots=True)
class _Qdisc:
    kind: str
    creator: str | None
    blocks: dict[Direction, _Block] = field(default_factory=dict)


@dataclass(slots=True)
class _Device:
    ifindex: int
    name: str
    offload: bool
    hooks: dict[Direction, _Hook] = field(default_factory=lambda: {d: _Hook() for d in Direction})
    qdisc: _Qdisc | None = None
    ingress_queue: bool = False  # created with the first clsact/ingress qdisc, kept after it is deleted

    @property
    def loopback(self) -> bool:
        return self.name == "lo"

    @property
    def ifflags(self) -> int:
        """IFF_* of a device that is down: IFF_LOOPBACK for lo, IFF_BROADCAST|IFF_MULTICAST otherwise."""
        return 0x8 if self.loopback else 0x1002

    @property
    def filters(self) -> dict[tuple[Direction, int, int], _Filter]:
        """Every filter of the device's hook qdisc by (direction, priority, handle) (read only; chain 0
        wins over other chains)."""
        out: dict[tuple[Direction, int, int], _Filter] = {}
        if self.qdisc is not None:
            for block in self.qdisc.blocks.values():
                for index in sorted(block.chains, reverse=True):
                    for tp in block.chains[index]:
                        for f in tp.filters:
                            out[(f.direction, f.priority, f.handle)] = f
        return out


@dataclass(slots=True)
class _Fault:
    op: str
    errno: int
    skip: int
    remaining: int


@dataclass(frozen=True, slots=True)
class _Pin:
    kind: Literal["link", "filter", "prog", "map"]
    link_id: int = 0  # "link": the link; "prog" / "map": the program or map id
    ifindex: int = 0
    direction: Direction = Direction.INGRESS
    priority: int = 0
    handle: int = 0


@dataclass(frozen=True, slots=True)
class _BpfParams:
    """cls_bpf's options of one request: from netlink (TCA_BPF_*) or from a helper method (`prog_id`)."""

    prog_id: int | None = None
    fd: int | None = None
    name: str | None = None
    bpf_flags: int | None = None
    gen_flags: int | None = None
    classid: int | None = None
    classic: bool = False  # TCA_BPF_OPS (classic BPF) was given
    has_options: bool = True
    refused_errno: int = _errno.EINVAL  # a hardware refusal (netlink: EOPNOTSUPP, as cls_bpf answers)


@dataclass(frozen=True, slots=True)
class _NlReq:
    """The netlink request a change is made for: its notifications carry its portid, seq and flags, go to
    every listener but its socket, and to its socket too when it asked for NLM_F_ECHO."""

    sock: MockNetlinkSocket
    seq: int
    flags: int


class SimulatedProgram(Program):
    """A SCHED_CLS (or other type) program that exists only in one MockKernel: no privileges needed.

    `fd` is a program fd of its kernel (a real fd number, meaningful only to that kernel's `bpf` calls).
    `count()` says how many packets it saw through `MockKernel.send`; `verdict` is what it returns.
    `close()` closes the fd, which makes the handle unusable for new attachments, as closing a real
    program's fd does; attachments already made keep running it.
    """

    __slots__ = ("_closed", "_kernel", "_verdict")

    def __init__(
        self, kernel: MockKernel, *, fd: int, id: int, name: str, tag: str, type: int, verdict: Verdict
    ) -> None:
        super().__init__(fd, id=id, name=name, tag=tag, type=type)
        self._kernel = kernel
        self._verdict: Verdict = verdict
        self._closed = False

    @property
    def kernel(self) -> MockKernel:
        """The MockKernel this program lives in."""
        return self._kernel

    @property
    def verdict(self) -> Verdict:
        return self._verdict

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def simulated(self) -> bool:
        return True

    @property
    def fd(self) -> int:
        """The program's fd in its MockKernel; ProgramError once closed."""
        if self._closed or self._fd is None or self._fd < 0:
            raise ProgramError(f"{self} is closed; make another with MockKernel.program()")
        return self._fd

    def count(self) -> int:
        """How many packets this program has seen in its kernel."""
        return self._kernel.prog_count(self.id)

    def reset(self) -> None:
        """Set the packet counter back to 0."""
        self._kernel.prog_reset(self.id)

    def close(self) -> None:
        """Close the handle and its fd (idempotent). Attachments keep running the program."""
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, -1
        if fd is not None and fd >= 0:
            self._kernel.bpf.close(fd)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<SimulatedProgram id={self.id} name={self.name!r} {self.type_name} {self._verdict}{state}>"


_PROCESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("asynctc_mock_process", default=None)


def _close_fds(fds: dict[int, int]) -> None:
    """Close the fds a collected MockKernel still had open (its memfds). An fd number that no longer names
    the memfd recorded for it (closed behind the kernel's back, then reused) is left alone."""
    for fd, ino in list(fds.items()):
        try:
            st = os.fstat(fd)
            if st.st_ino == ino and st.st_nlink == 0 and stat.S_ISREG(st.st_mode):
                os.close(fd)
        except OSError:
            pass
    fds.clear()


def _check_device_name(name: object) -> None:
    """dev_valid_name: TypeError for a non-str, ValueError naming the rule a name breaks."""
    if not isinstance(name, str):
        raise TypeError(f"a device name must be a str, got {type(name).__name__} {name!r}")
    size = len(name.encode(errors="surrogateescape"))
    if not 1 <= size <= 15:
        raise ValueError(f"invalid device name {name!r}: it must be 1 to 15 bytes long, not {size}")
    if name in (".", ".."):
        raise ValueError(f"invalid device name {name!r}: '.' and '..' are not device names")
    bad = sorted({c for c in name if c in "/:\0" or c.isspace()})
    if bad:
        raise ValueError(f"invalid device name {name!r}: it must not hold {', '.join(repr(c) for c in bad)} "
                         "('/', ':', NUL and white space are refused)")


def _device_names(devices: Iterable[str]) -> list[str]:
    """The constructor's `devices`, checked: a tuple (or other iterable) of valid, distinct names."""
    if isinstance(devices, (str, bytes)):
        raise TypeError(f"devices must be a tuple of names, e.g. ({devices!r},), not the {type(devices).__name__} "
                        f"{devices!r} (which would make one device per character)")
    try:
        names = list(devices)
    except TypeError:
        raise TypeError(f"devices must be a tuple of names, got {type(devices).__name__} {devices!r}") from None
    for name in names:
        _check_device_name(name)
    dups = sorted(n for n, k in Counter(names).items() if k > 1)
    if dups:
        raise ValueError(f"device names must be unique, got {', '.join(repr(n) for n in dups)} more than once")
    return names


class MockKernel(Kernel, BpfSyscallsMixin):
    """An in-memory kernel: devices, tcx hooks and links, clsact qdiscs and cls_bpf filters, pins, events.

    It answers asynctc's kernel boundary (`asynctc.lowlevel.kernel.Kernel`) as Linux does: `bpf` is an
    `asynctc.lowlevel.bpf.Bpf` over `MockSyscalls` (raw `union bpf_attr` in, the kernel's results and errnos
    out, fds that are real fd numbers), `pins` an in-memory bpffs (`MockPins`), `session_alive` the real
    answer unless `kill_process` killed the process. It also keeps a high-level API (`link_create`,
    `prog_query`, `obj_pin`...) over the same state, for tests that drive the model directly.

    Args:
        devices: a tuple of the names of the devices present at the start (ifindex 1, 2, ... in this
            order): distinct, each a valid device name (see `add_device`); TypeError for a str (which
            would be one device per character), ValueError for an invalid or repeated name. None of
            them can offload. Add offload-capable ones with `add_device(name, offload=True)`.

    Attributes:
        calls: how many times each operation kind was called (including failed calls), e.g.
            `kernel.calls["link_create"]`.
        bpf: the bpf(2) calls of this kernel.
        pins: its bpffs; calling it (`kernel.pins()`) gives {path: what} of every pin.
    """

    pins: MockPins

    def __init__(self, devices: Iterable[str] = ("lo", "eth0", "veth0", "veth1")) -> None:
        self._lock = threading.RLock()
        self._sleeping = threading.Condition(self._lock)  # injected latency: see _delay
        self._rtnl_sleeper: int | None = None  # the thread sleeping "under rtnl" now
        self._devices: dict[int, _Device] = {}
        self._ifindexes = itertools.count(1)
        self._sim_ids = itertools.count(SIM_PROG_ID_BASE)
        self._link_ids = itertools.count(1)
        self._map_ids = itertools.count(1)
        self._progs: dict[int, _Prog] = {}
        self._links: dict[int, _Link] = {}
        self._maps: dict[int, _Map] = {}
        self._pins: dict[str, _Pin] = {}
        self._files: dict[int, _File] = {}  # by inode
        self._fd_files: dict[int, int] = {}  # fd -> inode of its file
        self._memfd_dev: int | None = None
        self._faults: list[_Fault] = []
        self._latency: dict[str | None, float] = {}
        self._dead_tags: set[str] = set()
        self._lock_table = LockTable()
        self.rtnl = RtnlHandler(self)
        """The rtnetlink side: the simulated sockets and their request handler (see `_rtnl`)."""
        self.calls: Counter[str] = Counter()
        self._finalizer = weakref.finalize(self, _close_fds, self._fd_files)
        self.bpf = bpf.Bpf(MockSyscalls(self))
        self.pins = MockPins(self)
        for name in _device_names(devices):
            self.add_device(name)

    # ====================================================================================================
    # the rest of the kernel boundary
    # ====================================================================================================
    def if_nametoindex(self, name: str) -> int:
        """The ifindex of device `name` (SIOCGIFINDEX); OSError ENODEV if there is none."""
        return self._nametoindex(name, sleep=True)

    def if_indextoname(self, ifindex: int) -> str:
        """The name of device `ifindex` (SIOCGIFNAME); OSError ENXIO if there is none."""
        return self._indextoname(ifindex, sleep=True)

    def open_device_names(self) -> DeviceNameLookups:
        """`if_nametoindex` and `if_indextoname` of this kernel (it has one namespace), usable from any
        thread, the trio thread included, as SIOCGIFINDEX / SIOCGIFNAME on a socket of the namespace:
        its device table (operation "dev_get": counted, and injected faults apply), never sleeping
        injected latency (the real lookups never sleep, and they are made on the trio thread)."""
        return DeviceNameLookups(self.syscall_ifindex, self.syscall_ifname)

    def syscall_ifindex(self, name: str) -> int:
        """SIOCGIFINDEX on a socket of `open_device_names`: `if_nametoindex`, never sleeping injected latency."""
        return self._nametoindex(name, sleep=False)

    def syscall_ifname(self, ifindex: int) -> str:
        """SIOCGIFNAME on a socket of `open_device_names`: `if_indextoname`, never sleeping injected latency."""
        return self._indextoname(ifindex, sleep=False)

    def _nametoindex(self, name: str, *, sleep: bool) -> int:
        with self._lock:
            self._enter("dev_get", sleep=sleep)
            for d in self._devices.values():
                if d.name == name:
                    return d.ifindex
        raise OSError(_errno.ENODEV, f"no device named {name!r}")

    def _indextoname(self, ifindex: int, *, sleep: bool) -> str:
        with self._lock:
            self._enter("dev_get", sleep=sleep)
            d = self._devices.get(ifindex)
            if d is not None:
                return d.name
        raise OSError(_errno.ENXIO, f"no device with ifindex {ifindex}")

    def classifier_present(self, kind: str) -> bool | None:
        """cls_bpf and u32 are the classifiers this kernel simulates."""
        return kind in ("bpf", "u32")

    def device_locks(self, netns_inode: int) -> MockDeviceLocks:
        """Device locks kept by this kernel (sessions on it exclude each other; nothing on the host)."""
        return MockDeviceLocks(self._lock_table, netns_inode)

    def pin_claim(self, path: str, session_tag: str) -> MockPinClaim:
        """A claim on the pin `path` of this kernel's bpffs for the session `session_tag`, exclusive among its
        live sessions (a session killed with `kill_process` holds none, as a dead process's flock is gone)."""
        return MockPinClaim(self._lock_table, path, session_tag, self.session_alive)

    def session_alive(self, session_tag: str) -> bool:
        """Whether the session with `session_tag` runs: False once `kill_process` killed it (each session
        counts as a process of its own here, so that one test can crash one of its sessions); else the
        real answer for its pid and start time. A tag that cannot be parsed counts as alive."""
        with self._lock:
            if session_tag in self._dead_tags:
                return False
        parsed = parse_session_tag(session_tag)
        return True if parsed is None else process_alive(parsed[1], parsed[2])

    @contextmanager
    def process(self, tag: str) -> Iterator[None]:
        """Make the calls made inside this block (and in the worker threads it starts with trio, which copy
        the context) those of the process whose session tag is `tag`: the fds they open and the links they
        create are that process's, and `kill_process(tag)` closes them as SIGKILL would."""
        token = _PROCESS.set(tag)
        try:
            yield
        finally:
            _PROCESS.reset(token)

    def __repr__(self) -> str:
        with self._lock:
            devs = ", ".join(d.name for d in self._devices.values())
        return f"<MockKernel devices=[{devs}]>"

    # ====================================================================================================
    # instrumentation: faults, latency, call counts
    # ====================================================================================================
    def inject_fault(self, op: str, errno: int, *, nth: int = 1, times: int = 1) -> None:
        """Make the `nth` next call of operation `op` (counting from now) fail with `errno`, and the
        `times - 1` calls after it too. A failing call changes nothing.

        `op` must be one of `asynctc_mock._kernel.OPERATIONS` except "close" and "dup" (ValueError
        otherwise, naming the close matches), the one list of the names this kernel uses:

        - `BPF_OPERATIONS`, the bpf(2) boundary (`kernel.bpf`), the `op` `asynctc.lowlevel.bpf.Bpf` passes
          with each call: "prog_load", "map_create", "map_info", "map_lookup", "map_update", "map_delete",
          "map_get_next_key", "map_get_fd_by_id", "obj_pin" (also the pin step of `pins.pin_object` and
          `pins.pin_over`), "obj_get" (`pins.get_object` too), "prog_info" (also `prog_run_stats`),
          "prog_get_fd_by_id", "prog_test_run", "prog_query", "link_create", "link_update",
          "link_update_cas" (a link update with an expected old program; a "link_update" fault fails it
          too: that name is every BPF_LINK_UPDATE), "link_detach", "link_info", "link_get_fd_by_id",
          "link_get_next_id", "enable_stats"; and "obj_unpin" (`pins.unpin`). A call that fails so raises
          `BpfError(errno, op)` and changes nothing.
        - `NETLINK_OPERATIONS`, the rtnetlink side: "qdisc_add", "qdisc_delete", "qdisc_get",
          "qdisc_dump", "filter_add", "filter_replace", "filter_delete", "filter_get", "filter_dump",
          "filter_add_hw" / "filter_replace_hw" (the hardware step of a skip_sw add or an in_hw replace),
          "link_get", "link_dump".
        - `HIGH_LEVEL_OPERATIONS`, this class's own methods: "link_create", "link_update", "link_detach",
          "link_info", "link_close", "prog_query", "prog_attach", "prog_detach", "qdisc_add",
          "qdisc_delete", "qdisc_get", "filter_add", "filter_add_hw", "filter_replace",
          "filter_replace_hw", "filter_delete", "filter_dump", "obj_pin", "obj_get", "obj_unpin",
          "dev_add", "dev_del", "dev_get" (also `if_nametoindex` and `if_indextoname`).

        close() and dup() ("close", "dup") are never faulted; latency under those names applies.
        """
        _check_op(op, "inject_fault", OPERATIONS - _UNFAULTABLE)
        if nth < 1 or times < 1:
            raise ValueError(f"nth and times must be >= 1, got nth={nth} times={times}")
        if errno <= 0:
            raise ValueError(f"errno must be a positive errno, got {errno}")
        with self._lock:
            self._faults.append(_Fault(op, errno, nth - 1, times))

    def clear_faults(self) -> None:
        """Forget every pending injected fault."""
        with self._lock:
            self._faults.clear()

    def set_latency(self, seconds: float, op: str | None = None) -> None:
        """Make every operation (or only `op`, one of `asynctc_mock._kernel.OPERATIONS`, see `inject_fault`;
        "close" and "dup" included) block its calling thread for `seconds`; the kernel calls behind it queue up,
        as behind a real kernel waiting for RCU under rtnl (dup, close and device lookups do not wait; the
        lookups of `open_device_names` do not sleep at all). 0 removes the latency.
        ValueError for an unknown `op` or a negative, infinite or NaN `seconds`."""
        if op is not None:
            _check_op(op, "set_latency")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"latency must be a number of seconds, got {seconds!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"latency must be a finite number of seconds >= 0, got {seconds!r}")
        with self._lock:
            if seconds == 0:
                self._latency.pop(op, None)
            else:
                self._latency[op] = float(seconds)

    def _delay(self, op: str) -> None:
        """Count one call of `op` and sleep for its injected latency (lock held).

        As the kernel's calls queue behind one that waits for an RCU grace period under rtnl, every call
        waits while another thread sleeps here, and then takes its own turn. The kernel's state lock is not
        held meanwhile: what takes no rtnl (dup and close of fds: `_NO_RTNL`) goes on, as it does on the real
        kernel (a dup of a program fd made on the trio thread must never wait for an attach)."""
        self.calls[op] += 1
        if op in _NESTED_STEPS:
            # A step inside another operation, which is half done: it sleeps holding the lock.
            delay = self._latency.get(op, self._latency.get(None, 0.0))
            if delay:
                time.sleep(delay)
            return
        me = threading.get_ident()
        rtnl = op not in _NO_RTNL
        if rtnl:
            while self._rtnl_sleeper not in (None, me):
                self._sleeping.wait()
        delay = self._latency.get(op, self._latency.get(None, 0.0))
        if not delay:
            return
        outer = rtnl and self._rtnl_sleeper is None
        if outer:
            self._rtnl_sleeper = me
        try:
            deadline = time.monotonic() + delay
            while (left := deadline - time.monotonic()) > 0:
                self._sleeping.wait(left)  # releases the state lock while it sleeps
        finally:
            if outer:
                self._rtnl_sleeper = None
                self._sleeping.notify_all()

    def _enter(self, op: str, *, sleep: bool = True) -> None:
        """Account for one call of `op`: count it, sleep for injected latency (unless not `sleep`: a call
        the real kernel never lets sleep), raise an injected fault."""
        if sleep:
            self._delay(op)
        else:
            self.calls[op] += 1
        family = _FAULT_FAMILIES.get(op)
        for f in self._faults:
            if f.op != op and f.op != family:
                continue
            if f.skip:
                f.skip -= 1
                continue
            f.remaining -= 1
            if f.remaining <= 0:
                self._faults.remove(f)
            raise KernelError(f.errno, op, "injected fault")

    # ====================================================================================================
    # files: what the fds the kernel hands out refer to
    # ====================================================================================================
    def _new_fd(self, kind: FileKind, obj_id: int) -> int:
        """A new file on an object and an fd on it (a memfd: a real fd number nothing else uses). The
        file holds a reference on the object. Lock held."""
        fd = os.memfd_create(f"asynctc-mock-{kind}", os.MFD_CLOEXEC)
        st = os.fstat(fd)
        self._memfd_dev = st.st_dev
        stale_fd = self._fd_files.get(fd)
        if stale_fd is not None:  # the number was closed behind the kernel's back and is reused now
            self._drop_fd(fd)
        stale = self._files.get(st.st_ino)
        if stale is not None:  # a memfd's inode is reused only once every fd on the old one is closed
            for old in list(stale.fds):
                self._drop_fd(old)
            self._files.pop(st.st_ino, None)
        f = _File(st.st_ino, kind, obj_id, _PROCESS.get(), {fd})
        self._files[st.st_ino] = f
        self._fd_files[fd] = st.st_ino
        if kind == "link":
            self._links[obj_id].files += 1
        elif kind == "map":
            self._maps[obj_id].refs += 1
        return fd

    def _file(self, fd: int) -> _File | None:
        """The file behind `fd`: None for an open fd that is not one of this kernel's (a real program's fd,
        a regular file); KernelError EBADF for an fd that is not open, or whose process was killed. A dup()
        of a kernel fd is recognised (same memfd inode) and counted as one more fd on its file. Lock held."""
        ino = self._fd_files.get(fd)
        try:
            st = os.fstat(fd)
        except OSError:
            if ino is not None:
                self._drop_fd(fd)
            raise KernelError(_errno.EBADF, "fd", f"fd {fd} is not open") from None
        if ino is not None and st.st_ino == ino and st.st_dev == self._memfd_dev:
            f = self._files[ino]
        else:
            if ino is not None:
                self._drop_fd(fd)
            f2 = self._files.get(st.st_ino) if st.st_dev == self._memfd_dev else None
            if f2 is None:
                return None
            f = f2
            f.fds.add(fd)
            self._fd_files[fd] = f.inode
        if f.dead:
            raise KernelError(_errno.EBADF, "fd", f"fd {fd} belonged to a killed process")
        return f

    def _drop_fd(self, fd: int) -> None:
        """Forget `fd` (closed); the last fd of a file releases it. Lock held."""
        ino = self._fd_files.pop(fd, None)
        if ino is None:
            return
        f = self._files.get(ino)
        if f is None:
            return
        f.fds.discard(fd)
        if not f.fds:
            del self._files[ino]
            self._release_file(f)

    def _release_file(self, f: _File) -> None:
        """Drop the reference a file held on its object (once). Lock held."""
        if f.dead:
            return
        f.dead = True
        if f.kind == "link":
            link = self._links.get(f.obj_id)
            if link is not None:
                link.files -= 1
                self._maybe_destroy(link)
        elif f.kind == "map":
            m = self._maps.get(f.obj_id)
            if m is not None:
                m.refs -= 1
                self._maybe_destroy_map(m)
        elif f.kind == "prog":
            self._gc_progs()

    def _close_fd(self, fd: int) -> None:
        """close(2) of an fd: a kernel fd is forgotten (the last one of a file drops its reference: the last
        reference of an unpinned link detaches it); any other fd is closed as it is (OSError EBADF when it
        is not open). Lock held."""
        try:
            self._file(fd)  # a dup of a kernel fd is counted before it goes; a stale number is forgotten
        except KernelError:
            pass  # not open (os.close says so) or its process was killed (closing it is fine)
        os.close(fd)
        self._drop_fd(fd)

    def _sweep_links(self) -> None:
        """Forget link fds closed behind the kernel's back (os.close instead of `bpf.close`), so their
        links are released as the kernel would have released them. Lock held."""
        for f in [f for f in self._files.values() if f.kind == "link"]:
            for fd in list(f.fds):
                try:
                    st = os.fstat(fd)
                except OSError:
                    self._drop_fd(fd)
                    continue
                if st.st_ino != f.inode or st.st_dev != self._memfd_dev:
                    self._drop_fd(fd)

    def _maybe_destroy_map(self, m: _Map) -> None:
        if m.refs <= 0 and not m.pins:
            self._maps.pop(m.id, None)

    def _fdinfo(self, fd: int) -> str:
        """/proc/self/fdinfo text of a kernel fd (prog_type:, map_type: or link_type: lines), or of any
        other fd as the system shows it ("" when it is not open)."""
        with self._lock:
            try:
                f = self._file(fd)
            except KernelError:
                return ""
            if f is None:
                try:
                    with open(f"/proc/self/fdinfo/{fd}") as fh:
                        return fh.read()
                except OSError:
                    return ""
            head = f"pos:\t0\nflags:\t02000002\nmnt_id:\t0\nino:\t{f.inode}\n"
            if f.kind == "prog":
                p = self._progs[f.obj_id]
                return (head + f"prog_type:\t{p.type}\nprog_jited:\t1\nprog_tag:\t{p.tag}\nmemlock:\t4096\n"
                        f"prog_id:\t{p.id}\nrun_time_ns:\t0\nrun_cnt:\t{p.count}\nrecursion_misses:\t0\n"
                        "verified_insns:\t2\n")
            if f.kind == "map":
                m = self._maps.get(f.obj_id)
                if m is None:
                    return head
                return (head + f"map_type:\t{m.type}\nkey_size:\t{m.key_size}\nvalue_size:\t{m.value_size}\n"
                        f"max_entries:\t{m.max_entries}\nmap_flags:\t{m.flags:#x}\nmap_extra:\t0x0\n"
                        f"memlock:\t4096\nmap_id:\t{m.id}\nfrozen:\t0\n")
            if f.kind == "link":
                link = self._links.get(f.obj_id)
                if link is None:
                    return head
                tag = self._progs[link.prog_id].tag if link.prog_id in self._progs else ""
                return (head + f"link_type:\ttcx\nlink_id:\t{link.id}\nprog_tag:\t{tag}\n"
                        f"prog_id:\t{link.prog_id}\nifindex:\t{link.ifindex}\nattach_type:\t{link.attach_type}\n")
            return head

    def fds(self) -> dict[int, tuple[str, int]]:
        """{fd: (kind, object id)} of every fd of this kernel that is open now (for leak checks in tests)."""
        with self._lock:
            self._sweep_links()
            return {fd: (self._files[ino].kind, self._files[ino].obj_id) for fd, ino in self._fd_files.items()
                    if ino in self._files}

    # ====================================================================================================
    # devices
    # ====================================================================================================
    def add_device(self, name: str, *, offload: bool = False) -> int:
        """Create a device and return its ifindex. `offload=True` makes it accept hardware-only (skip_sw)
        filters, as a NIC with BPF offload would; others refuse them with EINVAL, like veth.

        The name follows the kernel's rules (dev_valid_name): 1 to 15 bytes, not "." or "..", no '/',
        ':', NUL or white space (ValueError otherwise; TypeError for a non-str). A name already taken:
        KernelError EEXIST, as `ip link add` answers."""
        _check_device_name(name)
        with self._lock:
            self._enter("dev_add")
            if any(d.name == name for d in self._devices.values()):
                raise KernelError(_errno.EEXIST, "dev_add", f"device {name} exists")
            ifindex = next(self._ifindexes)
            d = self._devices[ifindex] = _Device(ifindex, name, offload)
            self._link_changed(d, codec.RTM_NEWLINK)
            return ifindex

    def remove_device(self, dev: DevRef) -> None:
        """Delete a device: its tcx links are severed (they live on with ifindex 0; updating them fails
        with ENOLINK), its qdisc and filters are gone and its hooks with them."""
        with self._lock:
            self._enter("dev_del")
            d = self._dev(dev, "dev_del")
            for hook in d.hooks.values():
                for e in hook.entries:
                    if e.link_id:
                        self._links[e.link_id].ifindex = 0
            del self._devices[d.ifindex]
            self._link_changed(d, codec.RTM_DELLINK)  # its qdiscs and filters go without messages
            self._gc_progs()

    def _link_changed(self, d: _Device, mtype: int) -> None:
        self.rtnl.dev_base_seq += 1  # a device came or went
        self._nl_notify(codec.RTNLGRP_LINK, None, lambda seq, portid: encode_link_msg(
            mtype, 0, seq, portid, d.ifindex, d.name, d.ifflags, d.loopback))

    def devices(self) -> dict[str, int]:
        """{name: ifindex} of the present devices."""
        with self._lock:
            return {d.name: d.ifindex for d in self._devices.values()}

    def dev_get(self, dev: DevRef) -> tuple[int, str, bool]:
        """(ifindex, name, offload-capable) of a device; ENODEV if it does not exist."""
        with self._lock:
            self._enter("dev_get")
            d = self._dev(dev, "dev_get")
            return d.ifindex, d.name, d.offload

    def _dev(self, dev: DevRef, op: str) -> _Device:
        if isinstance(dev, int) and not isinstance(dev, bool):
            d = self._devices.get(dev)
        else:
            d = next((x for x in self._devices.values() if x.name == dev), None)
        if d is None:
            raise KernelError(_errno.ENODEV, op, f"no device {dev!r}")
        return d

    # ====================================================================================================
    # programs
    # ====================================================================================================
    def program(
        self,
        verdict: Verdict = "pass",
        *,
        name: str | None = None,
        prog_type: int = bpf.BPF_PROG_TYPE_SCHED_CLS,
        offloadable: bool = True,
    ) -> SimulatedProgram:
        """A simulated program returning `verdict` ("pass", "drop" or "next") for every packet.

        Args:
            verdict: what it returns.
            name: its name (default "sim_<verdict>").
            prog_type: its BPF program type; anything but SCHED_CLS (3) is refused by tc hooks.
            offloadable: whether offload-capable devices accept it in hardware (False: skip_sw adds and
                hardware updates with it fail with EINVAL, as a program the NIC cannot run).
        """
        if verdict not in ("pass", "drop", "next"):
            raise ValueError(f"verdict must be 'pass', 'drop' or 'next', got {verdict!r}")
        with self._lock:
            pid = next(self._sim_ids)
            pname = (name if name is not None else f"sim_{verdict}")[:15]
            tag = hashlib.sha1(f"{pid}:{verdict}:{pname}".encode()).hexdigest()[:16]
            self._progs[pid] = _Prog(pid, pname, tag, prog_type, verdict, None, offloadable)
            fd = self._new_fd("prog", pid)
            return SimulatedProgram(self, fd=fd, id=pid, name=pname, tag=tag, type=prog_type, verdict=verdict)

    def register_program(self, program: Program) -> int:
        """Make a program known to the kernel and return its id. Simulated programs must come from this
        kernel (EBADF otherwise, like an fd from nowhere); real programs are referenced by a duplicate of
        their fd, held while anything on a hook (or a link) uses them. Closed programs: EBADF. TypeError
        for anything that is not an `asynctc.Program` (to use a program id, it is already registered)."""
        if not isinstance(program, Program):
            raise TypeError(f"register_program takes an asynctc.Program (e.g. one from MockKernel.program() or "
                            f"asynctc.Program.load), got {type(program).__name__} {program!r}")
        with self._lock:
            if isinstance(program, SimulatedProgram) or program.simulated:
                rec = self._progs.get(program.id)
                if rec is None or rec.verdict is None or getattr(program, "_kernel", self) is not self:
                    raise KernelError(_errno.EBADF, "prog_get", f"{program} is not a program of this kernel")
                if program.closed:
                    raise KernelError(_errno.EBADF, "prog_get", f"{program} is closed")
                return program.id
            if program.closed:
                raise KernelError(_errno.EBADF, "prog_get", f"{program} is closed")
            rec = self._progs.get(program.id)
            if rec is not None and rec.verdict is not None:
                raise KernelError(_errno.EEXIST, "prog_get", f"id {program.id} collides with a simulated one")
            if rec is None or rec.real_fd is None:
                fd = os.dup(program.fd)
                if rec is None:
                    self._progs[program.id] = _Prog(
                        program.id, program.name, program.tag, program.type, None, fd, False
                    )
                else:
                    rec.real_fd = fd
            return program.id

    def _prog(self, prog_id: int, op: str) -> _Prog:
        rec = self._progs.get(prog_id)
        if rec is None:
            raise KernelError(_errno.ENOENT, op, f"no program with id {prog_id}")
        return rec

    def prog_count(self, prog_id: int) -> int:
        with self._lock:
            return self._progs[prog_id].count

    def prog_reset(self, prog_id: int) -> None:
        with self._lock:
            self._progs[prog_id].count = 0

    def prog_info(self, prog_id: int) -> tuple[str, str, int]:
        """(name, tag, type) of a known program; ENOENT otherwise."""
        with self._lock:
            rec = self._prog(prog_id, "prog_info")
            return rec.name, rec.tag, rec.type

    def _referenced_progs(self) -> set[int]:
        used = {link.prog_id for link in self._links.values()}
        used.update(f.obj_id for f in self._files.values() if f.kind == "prog" and not f.dead)
        used.update(p.id for p in self._progs.values() if p.pins)
        for d in self._devices.values():
            for hook in d.hooks.values():
                used.update(e.prog_id for e in hook.entries)
            used.update(f.prog_id for f in d.filters.values() if f.prog_id is not None)
        return used

    @contextmanager
    def _gc_on_error(self) -> Iterator[None]:
        """A refused operation drops the program reference `register_program` took for it."""
        try:
            yield
        except KernelError:
            self._gc_progs()
            raise

    def _gc_progs(self) -> None:
        """Drop the kernel's reference on real programs nothing uses any more."""
        held = [rec for rec in self._progs.values() if rec.real_fd is not None]
        if not held:
            return
        used = self._referenced_progs()
        for rec in held:
            if rec.real_fd is not None and rec.id not in used:
                fd, rec.real_fd = rec.real_fd, None
                os.close(fd)

    # ====================================================================================================
    # tcx
    # ====================================================================================================
    def _check_tcx_prog(self, prog_id: int, op: str) -> _Prog:
        rec = self._progs.get(prog_id)
        if rec is None:
            raise KernelError(_errno.EBADF, op, f"no program with id {prog_id}")
        if rec.type != bpf.BPF_PROG_TYPE_SCHED_CLS:
            raise KernelError(_errno.EINVAL, op, f"program {prog_id} is not SCHED_CLS")
        return rec

    def _tcx_insert(
        self,
        op: str,
        d: _Device,
        direction: Direction,
        prog: _Prog,
        link_id: int,
        *,
        before: bool,
        after: bool,
        relative_id: int | None,
        relative_is_link: bool,
        expected_revision: int,
    ) -> None:
        """The high-level API's attach: its arguments as BPF_LINK_CREATE / BPF_PROG_ATTACH flags, then the
        kernel's own rules (`_mprog_attach`). Lock held."""
        flags = (bpf.BPF_F_BEFORE if before else 0) | (bpf.BPF_F_AFTER if after else 0)
        if relative_id:
            flags |= bpf.BPF_F_ID | (bpf.BPF_F_LINK if relative_is_link else 0)
        self._mprog_attach(d.hooks[direction], prog, link_id, flags, relative_id or 0, expected_revision, op)

    @staticmethod
    def _hook_held(d: _Device, direction: Direction) -> bool:
        """Whether a qdisc holds the device's tc state of `direction` (the kernel's miniq_active): clsact
        holds both directions, an `ingress` qdisc only ingress."""
        if d.qdisc is None:
            return False
        return d.qdisc.kind == "clsact" or (d.qdisc.kind == "ingress" and direction is Direction.INGRESS)

    def _tcx_remove(self, d: _Device, direction: Direction, index: int) -> None:
        hook = d.hooks[direction]
        del hook.entries[index]
        hook.revision += 1
        if not hook.entries and not self._hook_held(d, direction):
            # The hook's state is freed with its last program unless a qdisc holds it: count from 1.
            hook.revision = 1

    # -- the kernel's own rules (kernel/bpf/mprog.c), for the bpf(2) boundary -----------------------------
    def _prog_by_fd(self, fd: int, op: str, ptype: int = 0) -> _Prog:
        """bpf_prog_get(fd) (bpf_prog_get_type with `ptype`): EBADF for an fd that is not open, EINVAL for
        one that is not a program (or not of `ptype`). A real program's fd (not one of this kernel's) is
        registered by id, the kernel holding a duplicate of it while it uses the program. Lock held."""
        f = self._file_or_ebadf(fd, op)
        if f is None:
            rec = self._real_prog(fd, op)
        elif f.kind != "prog":
            raise KernelError(_errno.EINVAL, op, f"fd {fd} is a {f.kind}, not a program")
        else:
            rec = self._progs[f.obj_id]
        if ptype and rec.type != ptype:
            raise KernelError(_errno.EINVAL, op, f"program {rec.id} is of type {rec.type}, not {ptype}")
        return rec

    def _file_or_ebadf(self, fd: int, op: str) -> _File | None:
        try:
            return self._file(fd)
        except KernelError as exc:
            raise KernelError(_errno.EBADF, op, exc.detail) from None

    def _real_prog(self, fd: int, op: str) -> _Prog:
        """The record of the real program behind `fd` (registered now if new); EINVAL for an fd that is not
        a BPF program's. Lock held."""
        text = ""
        try:
            with open(f"/proc/self/fdinfo/{fd}") as fh:
                text = fh.read()
        except OSError:
            pass
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if "prog_type" not in fields or "prog_id" not in fields:
            raise KernelError(_errno.EINVAL, op, f"fd {fd} is not a BPF program")
        prog_id = int(fields["prog_id"])
        rec = self._progs.get(prog_id)
        if rec is not None and rec.verdict is not None:
            raise KernelError(_errno.EINVAL, op, f"real program id {prog_id} collides with a simulated one")
        if rec is None or rec.real_fd is None:
            info = bpf.LINUX.prog_info(fd)
            dup = os.dup(fd)
            if rec is None:
                rec = _Prog(info.id, info.name, info.tag, info.type, None, dup, False)
                self._progs[info.id] = rec
            else:
                rec.real_fd = dup
        return rec

    def _link_by_fd(self, fd: int, op: str) -> _Link:
        """bpf_link_get_from_fd: EBADF for an fd that is not open, EINVAL for one that is not a link. Lock
        held."""
        f = self._file_or_ebadf(fd, op)
        if f is None or f.kind != "link" or f.obj_id not in self._links:
            raise KernelError(_errno.EINVAL, op, f"fd {fd} is not a BPF link")
        return self._links[f.obj_id]

    def _relative(self, id_or_fd: int, flags: int, ptype: int, op: str) -> tuple[int | None, int | None]:
        """bpf_mprog_tuple_relative: the (program id, link id) a relative names, (None, None) for none."""
        by_id = bool(flags & bpf.BPF_F_ID)
        if flags & bpf.BPF_F_LINK:
            if by_id:
                link = self._links.get(id_or_fd)
                if link is None:
                    raise KernelError(_errno.ENOENT, op, f"no link with id {id_or_fd}")
            elif id_or_fd:
                link = self._link_by_fd(id_or_fd, op)
            else:
                raise KernelError(_errno.EINVAL, op, "BPF_F_LINK without a relative link")
            if ptype and self._progs[link.prog_id].type != ptype:
                raise KernelError(_errno.EINVAL, op, "the relative link runs a program of another type")
            return link.prog_id, link.id
        if not by_id and not id_or_fd:
            return None, None
        if by_id:
            rec = self._progs.get(id_or_fd)
            if rec is None:
                raise KernelError(_errno.ENOENT, op, f"no program with id {id_or_fd}")
        else:
            rec = self._prog_by_fd(id_or_fd, op)
        if ptype and rec.type != ptype:
            raise KernelError(_errno.EINVAL, op, f"the relative program {rec.id} is of another type")
        return rec.id, None

    @staticmethod
    def _pos_exact(hook: _Hook, prog_id: int | None, link_id: int) -> int:
        for i, e in enumerate(hook.entries):
            if e.prog_id == prog_id:
                return i if e.link_id == link_id else -_errno.EBUSY
        return -_errno.ENOENT

    @staticmethod
    def _pos_before(hook: _Hook, rel: tuple[int | None, int | None]) -> int:
        for i, e in enumerate(hook.entries):
            if e.prog_id == rel[0] and (rel[1] is None or rel[1] == e.link_id):
                return i - 1
        return -_errno.ENOENT if rel[0] is not None else -1

    @staticmethod
    def _pos_after(hook: _Hook, rel: tuple[int | None, int | None]) -> int:
        for i, e in enumerate(hook.entries):
            if e.prog_id == rel[0] and (rel[1] is None or rel[1] == e.link_id):
                return i + 1
        return -_errno.ENOENT if rel[0] is not None else len(hook.entries)

    def _position(self, hook: _Hook, flags: int, rel: tuple[int | None, int | None], idx: int,
                  op: str) -> tuple[int, int]:
        """The BPF_F_BEFORE / BPF_F_AFTER rules of bpf_mprog_attach and _detach: every rule given must agree
        on one position. Returns (index, flags)."""
        if flags & bpf.BPF_F_BEFORE:
            t = self._pos_before(hook, rel)
            if t < -1 or (idx >= -1 and t != idx):
                self._fail(-t if t < -1 else _errno.ERANGE, op, "the position rules disagree")
            idx = t
        if flags & bpf.BPF_F_AFTER:
            t = self._pos_after(hook, rel)
            if t < -1 or (idx >= -1 and t != idx):
                self._fail(-t if t < 0 else _errno.ERANGE, op, "the position rules disagree")
            idx = t
        if idx < -1:
            if rel[0] is not None or flags:
                self._fail(_errno.EINVAL, op, "a relative or flags without BPF_F_BEFORE / BPF_F_AFTER")
            idx, flags = len(hook.entries), bpf.BPF_F_AFTER
        if idx >= MAX_TCX_PROGS:
            self._fail(_errno.ERANGE, op, f"the hook holds {MAX_TCX_PROGS} programs")
        return idx, flags

    @staticmethod
    def _fail(err: int, op: str, detail: str) -> NoReturn:
        raise KernelError(err, op, detail)

    def _mprog_attach(self, hook: _Hook, prog: _Prog, link_id: int, flags: int, id_or_fd: int, revision: int,
                      op: str, old_prog_id: int | None = None) -> None:
        """bpf_mprog_attach and its commit: insert (or with BPF_F_REPLACE, replace `old_prog_id`'s entry of
        link `link_id`, 0 for none) and count the revision. Lock held."""
        if revision and revision != hook.revision:
            self._fail(_errno.ESTALE, op, f"revision is {hook.revision}, not {revision}")
        if any(e.prog_id == prog.id for e in hook.entries):
            self._fail(_errno.EEXIST, op, f"program {prog.id} is already on the hook")
        rel = self._relative(id_or_fd, flags & ~bpf.BPF_F_REPLACE, prog.type, op)
        idx = -_errno.ERANGE
        if flags & bpf.BPF_F_REPLACE:
            idx = self._pos_exact(hook, old_prog_id, link_id)
            if idx < 0:
                self._fail(-idx, op, "the program to replace is not on the hook")
        elif len(hook.entries) >= MAX_TCX_PROGS:
            self._fail(_errno.ERANGE, op, f"the hook holds {MAX_TCX_PROGS} programs")
        idx, flags = self._position(hook, flags, rel, idx, op)
        if flags & bpf.BPF_F_REPLACE:
            hook.entries[idx].prog_id = prog.id
        else:
            if idx != len(hook.entries) and flags & bpf.BPF_F_BEFORE:
                idx += 1
            hook.entries.insert(idx, _Entry(prog.id, link_id))
        hook.revision += 1

    def _mprog_detach(self, d: _Device, direction: Direction, prog: _Prog | None, flags: int, id_or_fd: int,
                      revision: int, op: str) -> None:
        """bpf_mprog_detach of a link-less entry (BPF_PROG_DETACH) and its commit. Lock held."""
        hook = d.hooks[direction]
        if flags & bpf.BPF_F_REPLACE:
            self._fail(_errno.EINVAL, op, "BPF_F_REPLACE is not valid for a detach")
        if revision and revision != hook.revision:
            self._fail(_errno.ESTALE, op, f"revision is {hook.revision}, not {revision}")
        rel = self._relative(id_or_fd, flags, prog.type if prog is not None else 0, op)
        idx = -_errno.ERANGE
        if prog is not None:
            idx = self._pos_exact(hook, prog.id, 0)
            if idx < 0:
                self._fail(-idx, op, f"program {prog.id} is not attached without a link")
        idx, flags = self._position(hook, flags, rel, idx, op)
        total = len(hook.entries)
        if idx == -1:
            idx = 0
        elif idx == total:
            idx = total - 1
        if not 0 <= idx < total:
            self._fail(_errno.ENOENT, op, "the hook is empty")
        if hook.entries[idx].link_id:
            self._fail(_errno.EBUSY, op, "that entry belongs to a link: detach the link")
        self._tcx_remove(d, direction, idx)

    def link_create(
        self,
        dev: DevRef,
        direction: Direction | str,
        prog_id: int,
        *,
        before: bool = False,
        after: bool = False,
        relative_id: int | None = None,
        relative_is_link: bool = False,
        expected_revision: int = 0,
        creator: str | None = None,
    ) -> int:
        """BPF_LINK_CREATE of a tcx link; returns the new link id (its holder count is 1, an open fd).

        `before`/`after` with no `relative_id` prepend/append (neither: append); with one, place the program
        next to the relative program (or link, `relative_is_link`). Errors: EINVAL (not SCHED_CLS, relative
        without before/after), ENODEV, ESTALE (`expected_revision`, 0 = don't check), EEXIST (program
        already on the hook), ERANGE (hook full, or before and after together), ENOENT (relative not
        attached). `creator` records the session tag that owns the link.
        """
        direction = Direction.coerce(direction)
        op = "link_create"
        with self._lock, self._gc_on_error():
            self._enter(op)
            prog = self._check_tcx_prog(prog_id, op)
            d = self._dev(dev, op)
            link_id = next(self._link_ids)
            self._tcx_insert(
                op, d, direction, prog, link_id, before=before, after=after, relative_id=relative_id,
                relative_is_link=relative_is_link, expected_revision=expected_revision,
            )
            self._links[link_id] = _Link(link_id, prog_id, d.ifindex, direction, creator)
            return link_id

    def prog_attach(
        self,
        dev: DevRef,
        direction: Direction | str,
        prog_id: int,
        *,
        before: bool = False,
        after: bool = False,
        relative_id: int | None = None,
        relative_is_link: bool = False,
        expected_revision: int = 0,
    ) -> None:
        """BPF_PROG_ATTACH to a tcx hook: a plain entry without a link (link id 0). Same rules as
        `link_create`. Such entries are never touched by asynctc (they have no owner)."""
        direction = Direction.coerce(direction)
        op = "prog_attach"
        with self._lock, self._gc_on_error():
            self._enter(op)
            prog = self._check_tcx_prog(prog_id, op)
            d = self._dev(dev, op)
            self._tcx_insert(
                op, d, direction, prog, 0, before=before, after=after, relative_id=relative_id,
                relative_is_link=relative_is_link, expected_revision=expected_revision,
            )

    def prog_detach(self, dev: DevRef, direction: Direction | str, prog_id: int) -> None:
        """BPF_PROG_DETACH of a plain (link-less) entry; ENOENT if it is not there."""
        direction = Direction.coerce(direction)
        op = "prog_detach"
        with self._lock:
            self._enter(op)
            d = self._dev(dev, op)
            for i, e in enumerate(d.hooks[direction].entries):
                if e.prog_id == prog_id and e.link_id == 0:
                    self._tcx_remove(d, direction, i)
                    self._gc_progs()
                    return
            raise KernelError(_errno.ENOENT, op, f"program {prog_id} is not attached without a link")

    def prog_query(self, dev: DevRef, direction: Direction | str) -> TcxQuery:
        """BPF_PROG_QUERY: the hook's revision and entries in run order; ENODEV for a missing device."""
        direction = Direction.coerce(direction)
        with self._lock:
            self._enter("prog_query")
            hook = self._dev(dev, "prog_query").hooks[direction]
            return TcxQuery(hook.revision, tuple(TcxEntryInfo(e.prog_id, e.link_id) for e in hook.entries))

    def _link(self, link_id: int, op: str) -> _Link:
        link = self._links.get(link_id)
        if link is None:
            raise KernelError(_errno.ENOENT, op, f"no link with id {link_id}")
        return link

    def _link_index(self, link: _Link) -> tuple[_Device, int] | None:
        if link.ifindex == 0:
            return None
        d = self._devices.get(link.ifindex)
        if d is None:
            return None
        for i, e in enumerate(d.hooks[link.direction].entries):
            if e.link_id == link.id:
                return d, i
        return None

    def link_info(self, link_id: int) -> LinkInfo:
        """bpf_link_info of a link; ENOENT if no such link exists (closed and unpinned)."""
        with self._lock:
            self._enter("link_info")
            link = self._link(link_id, "link_info")
            return LinkInfo(link.id, link.prog_id, link.ifindex, link.direction, link.creator,
                            tuple(sorted(link.pins)))

    def link_update(self, link_id: int, new_prog_id: int, *, old_prog_id: int | None = None) -> None:
        """BPF_LINK_UPDATE: swap the link's program in place, by the same rules as the bpf(2) call
        (`_tcx_link_update`). With `old_prog_id` (BPF_F_REPLACE) it is a compare-and-swap: EPERM when the
        link runs another program. The same program again: success, no revision change. ENOENT for an
        unknown link, EBADF for an unknown program, ENOLINK on a detached or severed link, EINVAL for a
        non-SCHED_CLS program, EEXIST when the new program is already elsewhere on the hook."""
        op = "link_update"
        with self._lock, self._gc_on_error():
            self._enter(op)
            link = self._link(link_id, op)
            new = self._progs.get(new_prog_id)
            if new is None:  # what bpf_prog_get answers for the fd of no program
                raise KernelError(_errno.EBADF, op, f"no program with id {new_prog_id}")
            self._tcx_link_update(link, new, old_prog_id, op)
            self._gc_progs()

    def _tcx_link_update(self, link: _Link, new: _Prog, old_prog_id: int | None, op: str) -> None:
        """tcx_link_update, for BPF_LINK_UPDATE and the high-level `link_update`: ENOLINK on a detached or
        severed link, EPERM when `old_prog_id` (BPF_F_REPLACE) is not the link's program, nothing for the
        same program, else `_mprog_attach` with BPF_F_REPLACE of the link's entry. Lock held."""
        where = self._link_index(link)
        if where is None:
            raise KernelError(_errno.ENOLINK, op, f"link {link.id} is detached")
        d, _idx = where
        if old_prog_id is not None and old_prog_id != link.prog_id:
            raise KernelError(_errno.EPERM, op, f"link {link.id} runs program {link.prog_id}, not {old_prog_id}")
        if new.id == link.prog_id:
            return
        self._mprog_attach(d.hooks[link.direction], new, link.id, bpf.BPF_F_REPLACE | bpf.BPF_F_ID, link.prog_id, 0,
                           op, old_prog_id=link.prog_id)
        link.prog_id = new.id

    def link_detach(self, link_id: int) -> None:
        """BPF_LINK_DETACH: take the link's program off its hook (revision +1, and the reset rule). On a
        link that is already detached or severed it succeeds and does nothing, as the kernel does."""
        op = "link_detach"
        with self._lock:
            self._enter(op)
            link = self._link(link_id, op)
            self._detach_link_locked(link)

    def _detach_link_locked(self, link: _Link) -> None:
        where = self._link_index(link)
        if where is not None:
            d, idx = where
            self._tcx_remove(d, link.direction, idx)
        link.ifindex = 0
        self._gc_progs()

    def link_close(self, link_id: int) -> None:
        """The close() of the holder a high-level `link_create` (or `obj_get`) gave: the last close of an
        unpinned link detaches and destroys it; a pinned link lives on. ENOENT if the link does not
        exist. (Links made through `bpf` are held by their fds instead: close those with `bpf.close`.)"""
        with self._lock:
            self._enter("link_close")
            link = self._link(link_id, "link_close")
            link.holders = max(0, link.holders - 1)
            self._maybe_destroy(link)

    def _maybe_destroy(self, link: _Link) -> None:
        if link.holders == 0 and link.files == 0 and not link.pins:
            self._detach_link_locked(link)
            del self._links[link.id]
            self._gc_progs()

    def links(self) -> tuple[LinkInfo, ...]:
        """Every link that exists (attached, detached or severed), by id."""
        with self._lock:
            return tuple(
                LinkInfo(x.id, x.prog_id, x.ifindex, x.direction, x.creator, tuple(sorted(x.pins)))
                for x in sorted(self._links.values(), key=lambda x: x.id)
            )

    # ====================================================================================================
    # pins (bpffs)
    # ====================================================================================================
    def _check_pin_path(self, path: str, op: str) -> None:
        if not path.startswith("/") or path.endswith("/"):
            raise KernelError(_errno.EINVAL, op, f"{path!r} is not a file path on bpffs")

    def obj_pin(self, link_id: int, path: str) -> None:
        """Pin a link at `path` (absolute): it then outlives its holders. EEXIST if the path is taken."""
        op = "obj_pin"
        with self._lock:
            self._enter(op)
            self._check_pin_path(path, op)
            link = self._link(link_id, op)
            if path in self._pins:
                raise KernelError(_errno.EEXIST, op, f"{path} exists")
            self._pins[path] = _Pin("link", link_id=link_id)
            link.pins.add(path)

    def obj_pin_filter(self, dev: DevRef, direction: Direction | str, priority: int, handle: int,
                       path: str) -> None:
        """Record a cls_bpf filter at `path` (how the mock pins legacy attachments). EEXIST if taken,
        ENOENT if the filter does not exist."""
        direction = Direction.coerce(direction)
        op = "obj_pin"
        with self._lock:
            self._enter(op)
            self._check_pin_path(path, op)
            d = self._dev(dev, op)
            if (direction, priority, handle) not in d.filters:
                raise KernelError(_errno.ENOENT, op, "no such filter")
            if path in self._pins:
                raise KernelError(_errno.EEXIST, op, f"{path} exists")
            self._pins[path] = _Pin("filter", ifindex=d.ifindex, direction=direction, priority=priority,
                                    handle=handle)

    def obj_unpin(self, path: str) -> None:
        """unlink() of a pin; a link nobody holds any more is destroyed. ENOENT if nothing is there."""
        op = "obj_unpin"
        with self._lock:
            self._enter(op)
            pin = self._pins.pop(path, None)
            if pin is None:
                raise KernelError(_errno.ENOENT, op, f"nothing pinned at {path}")
            if pin.kind == "link":
                link = self._links.get(pin.link_id)
                if link is not None:
                    link.pins.discard(path)
                    self._maybe_destroy(link)

    def obj_get(self, path: str) -> tuple[Literal["link"], int] | tuple[Literal["filter"], FilterInfo]:
        """BPF_OBJ_GET of a pin: ("link", link_id) (the caller now holds one more fd on it), or
        ("filter", FilterInfo) for a pinned filter. ENOENT if nothing is pinned there or the pinned
        filter is gone."""
        op = "obj_get"
        with self._lock:
            self._enter(op)
            self._check_pin_path(path, op)
            pin = self._pins.get(path)
            if pin is None:
                raise KernelError(_errno.ENOENT, op, f"nothing pinned at {path}")
            if pin.kind == "link":
                self._links[pin.link_id].holders += 1
                return "link", pin.link_id
            if pin.kind != "filter":
                raise KernelError(_errno.EINVAL, op, f"a {pin.kind} is pinned at {path}; use kernel.bpf.obj_get")
            d = self._devices.get(pin.ifindex)
            f = d.filters.get((pin.direction, pin.priority, pin.handle)) if d is not None else None
            if d is None or f is None:
                raise KernelError(_errno.ENOENT, op, f"the filter pinned at {path} is gone")
            return "filter", self._filter_info(d, f)

    def _pin_table(self) -> dict[str, str]:
        """{path: what} for every pin ("link N", "prog N", "map N" or "filter IFINDEX/DIR/PRIO/HANDLE"):
        what `kernel.pins()` answers."""
        with self._lock:
            return {
                p: (f"{x.kind} {x.link_id}" if x.kind != "filter"
                    else f"filter {x.ifindex}/{x.direction.value}/{x.priority}/{x.handle}")
                for p, x in self._pins.items()
            }

    # ====================================================================================================
    # legacy tc: qdiscs and filters
    #
    # The `_tc_*` methods are the kernel's rules (tc_modify_qdisc, tc_get_qdisc, tc_new_tfilter,
    # tc_del_tfilter, tc_get_tfilter, tc_dump_tfilter and cls_bpf's / cls_u32's parts of them), with the
    # kernel's errnos and extended-ACK texts; rtnetlink requests and the helper methods below both go
    # through them. Call them with the kernel lock held.
    # ====================================================================================================
    def _tc_dev(self, ifindex: int, op: str) -> _Device:
        d = self._devices.get(ifindex) if ifindex > 0 else None
        if d is None:
            raise KernelError(_errno.ENODEV, op, f"no device with ifindex {ifindex}")
        return d

    def _tc_new_qdisc(self, op: str, d: _Device, parent: int, handle: int, flags: int, kind: str | None,
                      has_options: bool, req: _NlReq | None) -> _Qdisc:
        """tc_modify_qdisc for what the mock models: clsact and ingress qdiscs (at TC_H_INGRESS)."""
        q = d.qdisc
        found: _Qdisc | None = None
        create = False
        if parent == 0:
            if not handle:
                raise KernelError(_errno.EINVAL, op, extack="Handle cannot be zero")
            found = q if handle == CLSACT_HANDLE else None
        elif parent == TC_H_CLSACT:
            d.ingress_queue = True
            if q is None or not handle or handle != CLSACT_HANDLE:
                if handle:
                    if q is not None and not flags & codec.NLM_F_REPLACE:
                        raise KernelError(_errno.EEXIST, op, extack="NLM_F_REPLACE needed to override")
                    if handle & 0xFFFF:
                        raise KernelError(_errno.EINVAL, op, extack="Invalid minor handle")
                    create = True  # no other qdisc has handle `handle`: a new one replaces q, if any
                elif q is None:
                    create = True
                elif kind is not None and kind != q.kind:
                    # Measured on Linux 6.18: a different kind replaces the qdisc (grafts a new one) when
                    # no flag is set, or with CREATE and EXCL or REPLACE; otherwise the change path refuses.
                    cxr = flags & (codec.NLM_F_CREATE | codec.NLM_F_EXCL | codec.NLM_F_REPLACE)
                    if not cxr:
                        return self._graft_qdisc(d, parent, kind, req)
                    if flags & codec.NLM_F_CREATE and flags & (codec.NLM_F_EXCL | codec.NLM_F_REPLACE):
                        create = True
            found = q
        elif parent == TC_H_ROOT or parent & 0xFFFF0000 == CLSACT_HANDLE:
            if parent != TC_H_ROOT:
                if q is None:
                    raise KernelError(_errno.ENOENT, op, extack="Failed to find specified qdisc")
                raise KernelError(_errno.EOPNOTSUPP, op, extack="Cannot add children to ingress/clsact qdisc")
            if handle:
                if handle & 0xFFFF:
                    raise KernelError(_errno.EINVAL, op, extack="Invalid minor handle")
                if q is not None and handle == CLSACT_HANDLE:
                    raise KernelError(_errno.EINVAL, op,
                                      extack="Cannot move an existing qdisc to a different parent")
            if not flags & codec.NLM_F_CREATE:
                raise KernelError(_errno.ENOENT, op,
                                  extack="Qdisc not found. To create specify NLM_F_CREATE flag")
            if kind in ("clsact", "ingress"):
                raise KernelError(_errno.EOPNOTSUPP, op, f"{kind} lives at parent ffff:fff1 only")
            raise self._unmodelled_qdisc(op, kind)
        else:
            raise KernelError(_errno.ENOENT, op, extack="Failed to find specified qdisc")
        if create:
            if not flags & codec.NLM_F_CREATE:
                raise KernelError(_errno.ENOENT, op,
                                  extack="Qdisc not found. To create specify NLM_F_CREATE flag")
            if kind not in ("clsact", "ingress"):
                raise self._unmodelled_qdisc(op, kind)
            return self._graft_qdisc(d, parent, kind, req)
        if found is None:
            raise KernelError(_errno.ENOENT, op, extack="Specified qdisc not found")
        if flags & codec.NLM_F_EXCL:
            raise KernelError(_errno.EEXIST, op, f"{d.name} has a {found.kind} qdisc already",
                              extack="Exclusivity flag on, cannot modify")
        if kind is not None and kind != found.kind:
            raise KernelError(_errno.EINVAL, op, extack="Invalid qdisc name: must match existing qdisc")
        if has_options:
            raise KernelError(_errno.EINVAL, op, extack="Change operation not supported by specified qdisc")
        self._qdisc_changed(d, codec.RTM_NEWQDISC, parent, found.kind, req)
        return found

    def _graft_qdisc(self, d: _Device, parent: int, kind: str, req: _NlReq | None) -> _Qdisc:
        """Put a new clsact/ingress qdisc on the device's ingress queue, replacing (and destroying, with
        its filters) the one there: one notification with the old one's RTM_DELQDISC and the new one's
        RTM_NEWQDISC, then the old one's chains are announced gone."""
        new = _Qdisc(kind, None)
        if kind == "clsact":
            new.blocks = {dr: _Block(dr, HOOK_PARENTS[dr]) for dr in Direction}
        else:
            new.blocks = {Direction.INGRESS: _Block(Direction.INGRESS, TC_H_CLSACT)}
        old, d.qdisc = d.qdisc, new
        if old is None:
            self._qdisc_changed(d, codec.RTM_NEWQDISC, parent, kind, req)
            return new
        flags = req.flags & codec.NLM_F_ECHO if req is not None else 0
        self._nl_notify(codec.RTNLGRP_TC, req, lambda seq, portid: encode_qdisc_msg(
            codec.RTM_DELQDISC, flags, seq, portid, d.ifindex, parent, CLSACT_HANDLE, old.kind)
            + encode_qdisc_msg(codec.RTM_NEWQDISC, flags, seq, portid, d.ifindex, parent, CLSACT_HANDLE, kind))
        for block in old.blocks.values():
            for chain in list(block.chains):
                self._chain_changed(d, codec.RTM_DELCHAIN, chain)
        return new

    @staticmethod
    def _unmodelled_qdisc(op: str, kind: str | None) -> KernelError:
        if kind is None:
            return KernelError(_errno.ENOENT, op, extack="Specified qdisc kind is unknown")
        return KernelError(_errno.EOPNOTSUPP, op, f"MockKernel models clsact and ingress qdiscs only, not "
                           f"{kind!r}")

    def _tc_qdisc_lookup(self, op: str, d: _Device, parent: int, handle: int, kind: str | None) -> _Qdisc | None:
        """tc_get_qdisc's lookup (for RTM_DELQDISC and RTM_GETQDISC): the hook qdisc, or None for the
        builtin noop qdisc (handle 0) that stands in when there is none."""
        q = d.qdisc
        if parent == 0:
            if not (q is not None and handle == CLSACT_HANDLE):
                raise KernelError(_errno.ENOENT, op, extack="Failed to find qdisc with specified handle")
            target: _Qdisc | None = q
        elif parent == TC_H_ROOT:
            target = None
        elif parent & 0xFFFF0000 == CLSACT_HANDLE:
            if not d.ingress_queue:
                raise KernelError(_errno.ENOENT, op, f"{d.name} has no clsact/ingress qdisc",
                                  extack="Cannot find specified qdisc on specified device")
            target = q
        else:
            raise KernelError(_errno.ENOENT, op, extack="Failed to find qdisc with specified classid")
        if handle and (CLSACT_HANDLE if target is not None else 0) != handle:
            raise KernelError(_errno.EINVAL, op, extack="Invalid handle")
        if kind is not None and kind != (target.kind if target is not None else "noop"):
            raise KernelError(_errno.EINVAL, op, extack="Invalid qdisc name: must match existing qdisc")
        return target

    def _tc_del_qdisc(self, op: str, d: _Device, parent: int, handle: int, kind: str | None,
                      req: _NlReq | None) -> None:
        target = self._tc_qdisc_lookup(op, d, parent, handle, kind)
        if parent == 0:
            raise KernelError(_errno.EINVAL, op, extack="Classid cannot be zero")
        if target is None:
            raise KernelError(_errno.ENOENT, op, f"{d.name} has no clsact/ingress qdisc",
                              extack="Cannot delete qdisc with handle of zero")
        d.qdisc = None  # its blocks and every filter on them go with it, without filter notifications
        for hook in d.hooks.values():
            if not hook.entries:
                hook.revision = 1
        self._qdisc_changed(d, codec.RTM_DELQDISC, parent, target.kind, req)
        for block in target.blocks.values():  # then each chain of its blocks is put, and announced gone
            for chain in list(block.chains):
                self._chain_changed(d, codec.RTM_DELCHAIN, chain)

    def _qdisc_changed(self, d: _Device, mtype: int, parent: int, kind: str, req: _NlReq | None) -> None:
        flags = req.flags & codec.NLM_F_ECHO if req is not None else 0
        self._nl_notify(codec.RTNLGRP_TC, req, lambda seq, portid: encode_qdisc_msg(
            mtype, flags, seq, portid, d.ifindex, parent, CLSACT_HANDLE, kind))

    # -- filters -------------------------------------------------------------------------------------
    def _tc_block(self, op: str, d: _Device, parent: int) -> _Block:
        """__tcf_qdisc_find + __tcf_qdisc_cl_find + __tcf_block_find for a filter request's parent."""
        q = d.qdisc
        if parent == 0:
            raise KernelError(_errno.EINVAL, op, extack="Qdisc not classful")
        if q is None or parent & 0xFFFF0000 != CLSACT_HANDLE:
            raise KernelError(_errno.EINVAL, op, f"{d.name} has no qdisc at {parent:#x}",
                              extack="Parent Qdisc doesn't exists")
        if q.kind == "ingress":
            return q.blocks[Direction.INGRESS]  # ingress_find: any minor is its class; one block
        minor = parent & 0xFFFF
        if minor == 0:
            raise KernelError(_errno.EINVAL, op, "clsact has no block at minor 0")
        for direction, hook_parent in HOOK_PARENTS.items():
            if parent == hook_parent:
                return q.blocks[direction]
        raise KernelError(_errno.ENOENT, op, extack="Specified class doesn't exist")

    @staticmethod
    def _tp_find(op: str, tps: list[_Tp], protocol: int, prio: int, allocate: bool) -> tuple[int, _Tp | None]:
        """tcf_chain_tp_find: (insertion index, the classifier of `prio` or None)."""
        for i, tp in enumerate(tps):
            if tp.priority >= prio:
                if tp.priority != prio:
                    return i, None
                if allocate:
                    raise KernelError(_errno.ENOSPC, op, extack="Lowest ID from auto-alloc range already in use")
                if protocol and tp.protocol != protocol:
                    raise KernelError(_errno.EINVAL, op,
                                      extack="Filter with specified priority/protocol not found")
                return i, tp
        return len(tps), None

    @staticmethod
    def _tp_get(block: _Block, tp: _Tp, handle: int) -> tuple[_Filter | Literal["ht"] | None, _Tp]:
        """The classifier's `get`: (the filter or None, the classifier holding it). cls_u32 looks a handle
        up among the hash tables of every u32 classifier of the block, whatever the priority asked."""
        if not handle:
            return None, tp
        if tp.kind != "u32":
            return next((f for f in tp.filters if f.handle == handle), None), tp
        for tps in block.chains.values():
            for t in tps:
                if t.kind != "u32":
                    continue
                if handle == t.ht:
                    return "ht", t
                for f in t.filters:
                    if f.handle == handle:
                        return f, t
        return None, tp

    def _chain_changed(self, d: _Device, mtype: int, chain: int) -> None:
        self._nl_notify(codec.RTNLGRP_TC, None, lambda seq, portid: encode_chain_msg(
            mtype, codec.NLM_F_CREATE | codec.NLM_F_EXCL if mtype == codec.RTM_NEWCHAIN else 0, seq, portid,
            d.ifindex, CLSACT_HANDLE, chain))

    def _chain_check(self, d: _Device, block: _Block, chain: int) -> None:
        """After a request: a chain whose last classifier went is gone, and the kernel says so."""
        if chain not in block.chains:
            self._chain_changed(d, codec.RTM_DELCHAIN, chain)

    def _tp_remove(self, block: _Block, tp: _Tp) -> None:
        tps = block.chains.get(tp.chain, [])
        if tp in tps:
            tps.remove(tp)
        if not tps:
            block.chains.pop(tp.chain, None)  # a chain lives while classifiers hold it
        if tp.kind == "u32" and block.u32 is not None:
            u = block.u32
            u.refcnt -= 1
            u.knodes -= len(tp.filters)
            u.ids.discard((tp.ht >> 20) & 0x7FF)
            if u.refcnt <= 0:
                block.u32 = None

    def _u32_attach(self, block: _Block) -> int:
        """u32_init: the new classifier's root hash table handle (800: for the block's first one, then ids
        handed out cyclically, as idr_alloc_cyclic does)."""
        if block.u32 is None:
            block.u32 = _U32Common(refcnt=1)
            return 0x80000000
        u = block.u32
        u.refcnt += 1
        for n in range(0x7FE):
            cand = (u.next_id - 1 + n) % 0x7FE + 1
            if cand not in u.ids:
                u.ids.add(cand)
                u.next_id = cand % 0x7FE + 1
                return (cand | 0x800) << 20
        raise KernelError(_errno.ENOSPC, "filter_add", "no u32 hash table id left")

    def _tc_new_filter(
        self,
        op: str,
        d: _Device,
        parent: int,
        prio: int,
        protocol: int,
        handle: int,
        flags: int,
        kind: str | None,
        chain: int,
        change: Callable[[_Block, _Tp, _Filter | None, int], _Filter],
        req: _NlReq | None,
    ) -> tuple[_Block, _Tp, _Filter]:
        """tc_new_tfilter: find or create the classifier, then let `change` add or replace the filter."""
        allocate = False
        if prio == 0:
            if not flags & codec.NLM_F_CREATE:
                raise KernelError(_errno.ENOENT, op, extack="Invalid filter command with priority of zero")
            prio, allocate = AUTO_PRIO_LOWEST, True
        block = self._tc_block(op, d, parent)
        block.classid = parent
        if chain > 0x0FFFFFFF:
            raise KernelError(_errno.EINVAL, op, extack="Specified chain index exceeds upper limit")
        chain_created = chain not in block.chains
        if chain_created:  # tcf_chain_get(create): the chain's first reference announces it
            self._chain_changed(d, codec.RTM_NEWCHAIN, chain)
        try:
            tps = block.chains.get(chain, [])
            idx, tp = self._tp_find(op, tps, protocol, prio, allocate)
            created = False
            if tp is None:
                if kind is None or not protocol:
                    raise KernelError(_errno.EINVAL, op, extack="Filter kind and protocol must be specified")
                if kind not in ("bpf", "u32"):
                    raise KernelError(_errno.ENOENT, op, f"MockKernel has cls_bpf and u32 only, not {kind!r}",
                                      extack="TC classifier not found")
                if allocate:
                    prio = tps[idx].priority - 1 if idx < len(tps) else AUTO_PRIO_FIRST
                    idx, tp = self._tp_find(op, tps, protocol, prio, False)
                if tp is None:
                    tp = _Tp(prio, protocol, kind, chain)
                    if kind == "u32":
                        tp.ht = self._u32_attach(block)
                    block.chains.setdefault(chain, tps).insert(idx, tp)
                    created = True
            try:
                if kind is not None and kind != tp.kind:
                    raise KernelError(_errno.EINVAL, op, f"priority {tp.priority} holds a {tp.kind} classifier",
                                      extack="Specified filter kind does not match existing one")
                old, _owner = self._tp_get(block, tp, handle)
                if old is None and not flags & codec.NLM_F_CREATE:
                    raise KernelError(_errno.ENOENT, op, f"no filter prio {prio} handle {handle:#x}",
                                      extack="Need both RTM_NEWTFILTER and NLM_F_CREATE to create a new filter")
                if old is not None and flags & codec.NLM_F_EXCL:
                    raise KernelError(_errno.EEXIST, op, f"filter prio {prio} handle {handle:#x} exists",
                                      extack="Filter already exists")
                if old == "ht":
                    raise KernelError(_errno.EOPNOTSUPP, op, "changing a u32 hash table is not modelled by MockKernel")
                f = change(block, tp, old, handle)
            except KernelError:
                if created:
                    self._tp_remove(block, tp)
                raise
            self._filter_changed(d, codec.RTM_NEWTFILTER, parent, tp, f, req)
            return block, tp, f
        except KernelError:
            if chain_created:
                self._chain_check(d, block, chain)
            raise

    def _cls_bpf_change(self, op: str, d: _Device, p: _BpfParams, block: _Block, tp: _Tp, old: _Filter | None,
                        handle: int) -> _Filter:
        """cls_bpf_change: check the options in the kernel's order, take the program, offload when asked,
        and put the filter at the head of its priority (a replacement keeps its place)."""
        if not p.has_options:
            raise KernelError(_errno.EINVAL, op, "cls_bpf needs TCA_OPTIONS")
        if handle == 0:
            taken = {f.handle for f in tp.filters}
            handle = next((h for h in range(1, 0x80000000) if h not in taken), 0)
            if not handle:
                raise KernelError(_errno.ENOSPC, op, "no cls_bpf handle left")
        is_ebpf = p.fd is not None or p.prog_id is not None
        if is_ebpf == p.classic:
            raise KernelError(_errno.EINVAL, op, "cls_bpf needs exactly one of TCA_BPF_FD and TCA_BPF_OPS")
        if p.bpf_flags is not None and p.bpf_flags & ~TCA_BPF_FLAG_ACT_DIRECT:
            raise KernelError(_errno.EINVAL, op, f"unknown TCA_BPF_FLAGS {p.bpf_flags:#x}")
        gen = p.gen_flags or 0
        skip = codec.TCA_CLS_FLAGS_SKIP_HW | codec.TCA_CLS_FLAGS_SKIP_SW
        if gen & ~skip or gen & skip == skip:
            raise KernelError(_errno.EINVAL, op, f"invalid TCA_BPF_FLAGS_GEN {gen:#x}")
        if p.classic:
            raise KernelError(_errno.EOPNOTSUPP, op, "classic BPF (TCA_BPF_OPS) is not modelled by MockKernel")
        prog = self._tc_prog(op, p)
        skip_sw, skip_hw = bool(gen & codec.TCA_CLS_FLAGS_SKIP_SW), bool(gen & codec.TCA_CLS_FLAGS_SKIP_HW)
        if old is not None and (old.skip_sw, old.skip_hw) != (skip_sw, skip_hw):
            raise KernelError(_errno.EINVAL, op, "a replacement cannot change skip_sw/skip_hw")
        in_hw = False
        if not skip_hw and (skip_sw or d.offload):
            try:
                self._hw_step(d, prog, "filter_replace_hw" if old is not None else "filter_add_hw",
                              p.refused_errno)
                in_hw = True
            except KernelError:
                if skip_sw:
                    raise
        f = _Filter(block.direction, tp.priority, handle, "bpf", prog.id, p.name or "", skip_sw, skip_hw, in_hw,
                    "next", named=p.name is not None, bpf_flags=p.bpf_flags or 0, classid=p.classid or 0)
        if old is not None:
            tp.filters[tp.filters.index(old)] = f
        else:
            tp.filters.insert(0, f)  # list_add_rcu: the newest filter of a priority runs first
        return f

    def _tc_prog(self, op: str, p: _BpfParams) -> _Prog:
        """The SCHED_CLS program a filter names: by id, or by TCA_BPF_FD (a program fd of this kernel, or a
        real program's fd of this process, which the kernel then holds). Lock held."""
        if p.prog_id is not None:
            return self._check_tcx_prog(p.prog_id, op)
        return self._prog_by_fd(p.fd or 0, op, bpf.BPF_PROG_TYPE_SCHED_CLS)

    def _tc_del_filter(self, op: str, d: _Device, parent: int, prio: int, protocol: int, handle: int,
                       kind: str | None, chain: int, req: _NlReq | None) -> None:
        """tc_del_tfilter: one filter, a whole priority (handle 0) or a whole chain (priority 0)."""
        if prio == 0 and (protocol or handle or kind is not None):
            raise KernelError(_errno.ENOENT, op, extack="Cannot flush filters with protocol, handle or kind set")
        block = self._tc_block(op, d, parent)
        tps = block.chains.get(chain)
        if not tps:
            if prio == 0:
                return
            raise KernelError(_errno.ENOENT, op, f"no filter prio {prio} handle {handle:#x}",
                              extack="Cannot find specified filter chain")
        if prio == 0:
            for each in list(tps):
                self._filter_changed(d, codec.RTM_DELTFILTER, parent, each, None, req)
                self._tp_remove(block, each)
            self._chain_check(d, block, chain)
            return
        _idx, tp = self._tp_find(op, tps, protocol, prio, False)
        if tp is None:
            raise KernelError(_errno.ENOENT, op, f"no filter prio {prio}",
                              extack="Filter with specified priority/protocol not found")
        if kind is not None and kind != tp.kind:
            raise KernelError(_errno.EINVAL, op, extack="Specified filter kind does not match existing one")
        if handle == 0:
            self._tp_remove(block, tp)
            self._filter_changed(d, codec.RTM_DELTFILTER, parent, tp, None, req)
            self._chain_check(d, block, chain)
            return
        fh, owner = self._tp_get(block, tp, handle)
        if fh is None:
            raise KernelError(_errno.ENOENT, op, f"no filter prio {prio} handle {handle:#x}",
                              extack="Specified filter handle not found")
        if fh == "ht":  # every hash table modelled is some u32 classifier's root
            raise KernelError(_errno.EINVAL, op, extack="cls_u32: Not allowed to delete root node")
        self._filter_changed(d, codec.RTM_DELTFILTER, parent, tp, fh, req)
        owner.filters.remove(fh)
        if tp.kind == "u32" and block.u32 is not None:
            block.u32.knodes -= 1
            last = block.u32.refcnt == 1 and block.u32.knodes == 0
        else:
            last = not tp.filters
        if last:
            self._tp_remove(block, tp)
            self._chain_check(d, block, chain)

    def _tc_get_filter(self, op: str, d: _Device, parent: int, prio: int, protocol: int, handle: int,
                       kind: str | None, chain: int) -> tuple[_Tp, _Filter | Literal["ht"], _Tp]:
        """tc_get_tfilter: the filter a non-dump RTM_GETTFILTER names."""
        if prio == 0:
            raise KernelError(_errno.ENOENT, op, extack="Invalid filter command with priority of zero")
        block = self._tc_block(op, d, parent)
        tps = block.chains.get(chain)
        if not tps:
            raise KernelError(_errno.EINVAL, op, extack="Cannot find specified filter chain")
        _idx, tp = self._tp_find(op, tps, protocol, prio, False)
        if tp is None:
            raise KernelError(_errno.ENOENT, op, extack="Filter with specified priority/protocol not found")
        if kind is not None and kind != tp.kind:
            raise KernelError(_errno.EINVAL, op, extack="Specified filter kind does not match existing one")
        fh, owner = self._tp_get(block, tp, handle)
        if fh is None:
            raise KernelError(_errno.ENOENT, op, extack="Specified filter handle not found")
        return tp, fh, owner

    def _tc_dump_filters(self, ifindex: int, parent: int) -> list[FilterWire]:
        """tc_dump_tfilter: every chain, classifier (its head first) and filter of the block `parent`
        names, in the kernel's order, each with the block's classid as parent; nothing where the device or
        the block does not exist."""
        d = self._devices.get(ifindex)
        if d is None:
            return []
        try:
            block = self._tc_block("filter_dump", d, parent)
        except KernelError:
            return []
        out: list[FilterWire] = []
        for tps in block.chains.values():
            for tp in tps:
                out.append(self._filter_wire(d, block.classid, tp, None))
                if tp.kind == "u32":
                    out.append(self._filter_wire(d, block.classid, tp, "ht"))
                out.extend(self._filter_wire(d, block.classid, tp, f) for f in tp.filters)
        return out

    def _filter_wire(self, d: _Device, parent: int, tp: _Tp, f: _Filter | Literal["ht"] | None,
                     owner: _Tp | None = None) -> FilterWire:
        """A filter message's content: the classifier `tp` the request named (its priority), and the
        filter `f` (a u32 hash table: `owner`'s, which may be another u32 classifier's of the block)."""
        base = FilterWire(d.ifindex, parent, tp.priority, tp.protocol, tp.chain, tp.kind)
        if f is None:
            return base
        if f == "ht":
            return FilterWire(d.ifindex, parent, tp.priority, tp.protocol, tp.chain, tp.kind, (owner or tp).ht)
        if f.kind != "bpf":
            return FilterWire(d.ifindex, parent, tp.priority, tp.protocol, tp.chain, tp.kind, f.handle,
                              classid=f.classid)
        rec = self._progs.get(f.prog_id or 0)
        return FilterWire(d.ifindex, parent, tp.priority, tp.protocol, tp.chain, tp.kind, f.handle,
                          bpf_name=f.name if f.named else None, bpf_id=f.prog_id,
                          bpf_tag=rec.tag if rec is not None else None, bpf_flags=f.bpf_flags,
                          gen_flags=f.gen_flags, classid=f.classid)

    def _filter_changed(self, d: _Device, mtype: int, parent: int, tp: _Tp, f: _Filter | None,
                        req: _NlReq | None) -> None:
        """Tell the RTNLGRP_TC sockets (and an NLM_F_ECHO requester) of a filter added, replaced or deleted
        (`f` None: a whole classifier)."""
        wire = self._filter_wire(d, parent, tp, f)
        flags = req.flags if req is not None else 0
        self._nl_notify(codec.RTNLGRP_TC, req, lambda seq, portid: encode_filter_msg(mtype, flags, seq, portid, wire))

    # -- the helpers' API ------------------------------------------------------------------------------
    def qdisc_add(self, dev: DevRef, kind: str = "clsact", *, creator: str | None = None) -> None:
        """Create the device's clsact (or ingress) qdisc, recording `creator` (a session tag). EEXIST if
        one is there already (an ingress qdisc blocks clsact, and the other way round)."""
        if kind not in ("clsact", "ingress"):
            raise ValueError(f"the mock models clsact and ingress qdiscs only, got {kind!r}")
        op = "qdisc_add"
        with self._lock:
            self._enter(op)
            d = self._dev(dev, op)
            q = self._tc_new_qdisc(op, d, TC_H_CLSACT, CLSACT_HANDLE,
                                   codec.NLM_F_CREATE | codec.NLM_F_EXCL, kind, False, None)
            q.creator = creator

    def qdisc_get(self, dev: DevRef) -> QdiscInfo | None:
        """The device's clsact/ingress qdisc, or None."""
        with self._lock:
            self._enter("qdisc_get")
            d = self._dev(dev, "qdisc_get")
            if d.qdisc is None:
                return None
            return QdiscInfo(d.ifindex, d.qdisc.kind, CLSACT_HANDLE, TC_H_CLSACT, d.qdisc.creator)

    def qdisc_delete(self, dev: DevRef) -> None:
        """Delete the device's clsact/ingress qdisc and every filter on it (whoever owns them); empty tcx
        hooks of the device then count their revision from 1 again. ENOENT if there is none."""
        op = "qdisc_delete"
        with self._lock:
            self._enter(op)
            d = self._dev(dev, op)
            self._tc_del_qdisc(op, d, TC_H_CLSACT, 0, None, None)
            self._gc_progs()

    def _check_parent(self, d: _Device, direction: Direction, op: str) -> None:
        if d.qdisc is None or (d.qdisc.kind == "ingress" and direction is Direction.EGRESS):
            raise KernelError(_errno.ENOENT, op, f"{d.name} has no qdisc for {direction.value} filters")

    def _hw_step(self, d: _Device, prog: _Prog | None, op: str, refused: int = _errno.EINVAL) -> None:
        """The hardware step of a skip_sw add or an in_hw replace: the device and the program must allow
        it (`refused`: the errno of a refusal; the kernel's cls_bpf gives EOPNOTSUPP on a device without
        offload)."""
        self._enter(op)
        if not d.offload:
            raise KernelError(refused, op, f"{d.name} cannot offload (skip_sw refused)")
        if prog is not None and not prog.offloadable:
            raise KernelError(refused, op, f"the hardware of {d.name} refused program {prog.id}")

    def filter_add(
        self,
        dev: DevRef,
        direction: Direction | str,
        prog_id: int,
        *,
        priority: int = 0,
        handle: int = 0,
        name: str = "",
        skip_sw: bool = False,
        skip_hw: bool = False,
        excl: bool = True,
    ) -> FilterInfo:
        """RTM_NEWTFILTER of a cls_bpf filter (direct action) with CREATE (and EXCL unless `excl=False`,
        which makes it CREATE|REPLACE). Returns the filter as the kernel recorded it; within a priority the
        newest filter runs first.

        priority 0: the kernel picks one (0xC000 when nothing is at 0x8000 or above, else one below the
        lowest priority from 0x8000 up); handle 0: the lowest free handle. Errors: ENODEV; ENOENT when no
        qdisc holds that direction; EEXIST when the (priority, handle) slot is taken and `excl`; EINVAL
        for a non-SCHED_CLS program, a priority used by another classifier kind, skip_sw with skip_hw, or
        (raised by the "filter_add_hw" step) skip_sw on a device or with a program the hardware refuses.
        """
        direction = Direction.coerce(direction)
        op = "filter_add"
        with self._lock, self._gc_on_error():
            self._enter(op)
            d = self._dev(dev, op)
            self._check_parent(d, direction, op)
            if not 0 <= priority <= 0xFFFF or not 0 <= handle <= 0xFFFFFFFF:
                raise KernelError(_errno.EINVAL, op, "priority or handle out of range")
            gen = (codec.TCA_CLS_FLAGS_SKIP_SW if skip_sw else 0) | (codec.TCA_CLS_FLAGS_SKIP_HW if skip_hw else 0)
            params = _BpfParams(prog_id=prog_id, name=name, bpf_flags=TCA_BPF_FLAG_ACT_DIRECT, gen_flags=gen)
            flags = codec.NLM_F_CREATE | (codec.NLM_F_EXCL if excl else codec.NLM_F_REPLACE)
            _block, _tp, f = self._tc_new_filter(
                op, d, HOOK_PARENTS[direction], priority, codec.ETH_P_ALL, handle, flags, "bpf", 0,
                lambda b, t, old, h: self._cls_bpf_change(op, d, params, b, t, old, h), None)
            self._gc_progs()
            return self._filter_info(d, f)

    def filter_replace(
        self,
        dev: DevRef,
        direction: Direction | str,
        priority: int,
        handle: int,
        prog_id: int,
        *,
        name: str | None = None,
    ) -> FilterInfo:
        """RTM_NEWTFILTER with REPLACE (no CREATE): swap the program of an existing cls_bpf filter
        atomically, keeping its flags, its place in the run order (and its name unless `name` is given).
        ENOENT if the filter is gone, EINVAL for a non-SCHED_CLS program or another classifier kind; for a
        filter in hardware, the "filter_replace_hw" step may refuse (EINVAL) and then nothing changes."""
        direction = Direction.coerce(direction)
        op = "filter_replace"
        with self._lock, self._gc_on_error():
            self._enter(op)
            d = self._dev(dev, op)
            self._check_parent(d, direction, op)
            # what to keep comes from the filter there; whether there is one (ENOENT), of cls_bpf (EINVAL),
            # and whether the program will do (EBADF, EINVAL) the shared tc code answers, as over netlink
            cur = self._ordered_filter(d, direction, priority, handle)
            gen, keep, named, bpf_flags = 0, name, name is not None, TCA_BPF_FLAG_ACT_DIRECT
            if cur is not None:
                gen = (codec.TCA_CLS_FLAGS_SKIP_SW if cur.skip_sw else 0) | (
                    codec.TCA_CLS_FLAGS_SKIP_HW if cur.skip_hw else 0)
                keep = cur.name if name is None else name
                named = name is not None or cur.named
                bpf_flags = cur.bpf_flags
            params = _BpfParams(prog_id=prog_id, name=keep if named else None, bpf_flags=bpf_flags, gen_flags=gen)
            _block, _tp, f = self._tc_new_filter(
                op, d, HOOK_PARENTS[direction], priority, codec.ETH_P_ALL, handle, codec.NLM_F_REPLACE, "bpf",
                0, lambda b, t, old, h: self._cls_bpf_change(op, d, params, b, t, old, h), None)
            self._gc_progs()
            return self._filter_info(d, f)

    def filter_delete(self, dev: DevRef, direction: Direction | str, priority: int, handle: int) -> None:
        """RTM_DELTFILTER of one filter; ENOENT if it is not there."""
        direction = Direction.coerce(direction)
        op = "filter_delete"
        with self._lock:
            self._enter(op)
            d = self._dev(dev, op)
            self._check_parent(d, direction, op)
            if not priority or not handle:  # RTM_DELTFILTER would flush the chain or the whole priority
                raise KernelError(_errno.ENOENT, op, f"no filter prio {priority} handle {handle:#x}")
            self._tc_del_filter(op, d, HOOK_PARENTS[direction], priority, codec.ETH_P_ALL, handle, None, 0, None)
            self._gc_progs()

    def filter_dump(self, dev: DevRef, direction: Direction | str) -> tuple[FilterInfo, ...]:
        """Every filter of one direction in run order (priority, then newest first within a priority)."""
        direction = Direction.coerce(direction)
        with self._lock:
            self._enter("filter_dump")
            d = self._dev(dev, "filter_dump")
            return tuple(self._filter_info(d, f) for f in self._ordered_filters(d, direction))

    def _ordered_filters(self, d: _Device, direction: Direction) -> list[_Filter]:
        """The filters of chain 0 of a hook, in the order the kernel runs them."""
        if d.qdisc is None:
            return []
        block = d.qdisc.blocks.get(direction)
        if block is None:
            return []
        return [f for tp in block.chains.get(0, []) for f in tp.filters]

    def _ordered_filter(self, d: _Device, direction: Direction, priority: int, handle: int) -> _Filter | None:
        """The filter of chain 0 of a hook at (priority, handle), or None."""
        return next((f for f in self._ordered_filters(d, direction)
                     if f.priority == priority and f.handle == handle), None)

    @staticmethod
    def _filter_info(d: _Device, f: _Filter) -> FilterInfo:
        return FilterInfo(d.ifindex, f.direction, f.priority, f.handle, f.kind, f.prog_id, f.name,
                          f.skip_sw, f.skip_hw, f.in_hw)

    # ====================================================================================================
    # foreign objects (for tests): what other programs and tools put in the kernel
    # ====================================================================================================
    def add_foreign_filter(
        self,
        dev: DevRef,
        direction: Direction | str,
        program: Program | None = None,
        *,
        priority: int,
        handle: int | None = None,
        kind: str | None = None,
        name: str = "",
        verdict: Verdict = "next",
        classid: int | None = None,
        create_qdisc: bool = True,
    ) -> FilterInfo:
        """Add a filter as another tool would (`tc filter add ...`): a cls_bpf filter running `program`
        (handle 1 unless given), or, without a program, a u32 filter (`kind` "u32", the only other
        classifier modelled) as `tc filter add dev D ingress prio N u32 match u32 0 0 [classid X]` makes
        it: in the priority's u32 classifier (created with its root hash table), with the next free key
        handle (800::800, 800::801, ...) unless `handle` is given. A u32 filter with a `classid` ends
        classification for the packets it matches (they pass, and no classifier behind it sees them);
        without one a match means `verdict`. Creates the clsact qdisc (creator "foreign") when the
        device has none, unless `create_qdisc=False` (then ENOENT, as `tc filter add` fails)."""
        direction = Direction.coerce(direction)
        with self._lock:
            d = self._dev(dev, "filter_add")
            if d.qdisc is None and create_qdisc:
                self.qdisc_add(d.ifindex, creator="foreign")
            if program is not None:
                pid = self.register_program(program)
                return self.filter_add(d.ifindex, direction, pid, priority=priority,
                                       handle=1 if handle is None else handle, name=name)
            fkind = kind or "u32"
            if fkind != "u32":
                raise ValueError(f"MockKernel models cls_bpf and u32 classifiers only, got {kind!r}")
            op = "filter_add"
            self._enter(op)
            self._check_parent(d, direction, op)
            match_verdict: Verdict = "pass" if classid else verdict

            def add_knode(block: _Block, tp: _Tp, old: _Filter | None, _h: int) -> _Filter:
                if old is not None:
                    raise KernelError(_errno.EEXIST, op, "slot taken", extack="Filter already exists")
                if handle:
                    knode = handle
                else:
                    taken = {f.handle & 0xFFF for f in tp.filters}
                    node = next((n for n in range(0x800, 0x1000) if n not in taken), 0)
                    if not node:
                        raise KernelError(_errno.ENOMEM, op, "no u32 key handle left")
                    knode = tp.ht | node
                f = _Filter(block.direction, tp.priority, knode, "u32", None, name, False, False, False,
                            match_verdict, named=False, bpf_flags=0, classid=classid or 0)
                tp.filters.append(f)
                tp.filters.sort(key=lambda x: x.handle & 0xFFF)
                if block.u32 is not None:
                    block.u32.knodes += 1
                return f

            _block, _tp, f = self._tc_new_filter(
                op, d, HOOK_PARENTS[direction], priority, codec.ETH_P_ALL, handle or 0,
                codec.NLM_F_CREATE | codec.NLM_F_EXCL, "u32", 0, add_knode, None)
            return self._filter_info(d, f)

    def attach_foreign_tcx(
        self,
        dev: DevRef,
        direction: Direction | str,
        program: Program,
        *,
        link: bool = True,
        first: bool = False,
    ) -> int:
        """Attach a program to a tcx hook as another process would: through a link held by that process
        (returns the link id), or with `link=False` as a plain BPF_PROG_ATTACH entry (returns 0).
        Appended, or prepended with `first=True`."""
        pid = self.register_program(program)
        if link:
            return self.link_create(dev, direction, pid, before=first, after=not first, creator="foreign")
        self.prog_attach(dev, direction, pid, before=first, after=not first)
        return 0

    # ====================================================================================================
    # processes (orphans)
    # ====================================================================================================
    def kill_process(self, tag: str) -> None:
        """Simulate the death of the session (process) whose session tag is `tag` (or whose owner tag, a
        filter's name as `asynctc.lowlevel.tcpolicy.format_tag` makes it, is `tag`): `session_alive` and
        `tag_alive` of its session tag are False from now on, so its filters stay behind as orphans; the
        fds opened inside `with kernel.process(tag):` are closed as SIGKILL closes them, and the links
        made with `link_create(creator=tag)` lose their holder: a link that nothing else holds (no pin,
        no other fd) is detached. A session's own fds belong to no simulated process (it makes its calls outside
        `process()`): the links it holds stay until it detaches them or closes."""
        owner_tag = parse_tag(tag)
        if owner_tag is not None:
            tag = owner_tag.session_tag
        with self._lock:
            self._dead_tags.add(tag)
            # SIGKILL closes every fd the process held: their files drop their references (the fd numbers
            # stay reserved until closed, answering EBADF) ...
            for f in list(self._files.values()):
                if f.owner == tag:
                    self._release_file(f)
            # ... and the fd-less holders of the links it made through the high-level API
            for link in list(self._links.values()):
                if link.creator == tag and link.holders:
                    link.holders = 0
                    self._maybe_destroy(link)

    def tag_alive(self, tag: str) -> bool:
        """Whether the process behind a session tag "owner:pid.start.serial" is alive: the same answer as
        `session_alive` (it calls it), so a tag that cannot be parsed counts as alive here too (nothing
        is taken for an orphan when its owner cannot be told)."""
        return self.session_alive(tag)

    # ====================================================================================================
    # packets
    # ====================================================================================================
    def _run_prog(self, prog_id: int) -> Verdict:
        rec = self._progs[prog_id]
        if rec.verdict is not None:
            rec.count += 1
            return rec.verdict
        if rec.real_fd is None:  # pragma: no cover - the kernel holds every attached real program
            return "next"
        code = bpf.prog_test_run(rec.real_fd)
        return _VERDICT_CODES.get(code, "pass")

    def send(self, dev: DevRef, direction: Direction | str, count: int = 1) -> Verdict:
        """Push `count` packets through a device's hook and return the last packet's final verdict.

        Run order: on ingress of an offload-capable device, filters in hardware first (by priority; "drop"
        there ends the packet); then the tcx programs in array order until one says something other than
        "next"; then, if tcx said "next" or is empty, the software cls_bpf filters (not skip_sw) by
        priority with the same rule. A packet nobody decides on passes. Simulated programs count in Python;
        real programs run through BPF_PROG_TEST_RUN, so a real counting program's map counts them.
        """
        direction = Direction.coerce(direction)
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        with self._lock:
            d = self._dev(dev, "send")
            final: Verdict = "pass"
            for _ in range(count):
                final = self._one_packet(d, direction)
            return final

    def _one_packet(self, d: _Device, direction: Direction) -> Verdict:
        filters = self._ordered_filters(d, direction)
        if direction is Direction.INGRESS and d.offload:
            for f in filters:
                if f.in_hw and f.prog_id is not None and self._run_prog(f.prog_id) == "drop":
                    return "drop"
        for e in list(d.hooks[direction].entries):
            v = self._run_prog(e.prog_id)
            if v != "next":
                return v
        for f in filters:
            if f.skip_sw:
                continue
            v = self._run_prog(f.prog_id) if f.prog_id is not None else f.verdict
            if v != "next":
                return v
        return "pass"

    # ====================================================================================================
    # events
    # ====================================================================================================
    def overflow_events(self) -> None:
        """Make every multicast netlink socket lose the events it has not read yet, as a netlink reader that
        fell behind does (its next read raises ENOBUFS); each must re-read the kernel's state and
        resynchronise."""
        with self._lock:
            for sock in self.rtnl.sockets():
                if sock.groups:
                    sock.lose_queued()

    # ====================================================================================================
    # rtnetlink: sockets, requests, notifications
    # ====================================================================================================
    def open_netlink_socket(
        self, groups: Iterable[int] = (), rcvbuf: int | None = None, blocking: bool = False
    ) -> MockNetlinkSocket:
        """A NETLINK_ROUTE socket of this kernel (`asynctc.lowlevel.kernel.Kernel.open_netlink_socket`):
        requests and dumps in the kernel's bytes, the multicast `groups` joined (RTNLGRP_LINK = 1,
        RTNLGRP_TC = 4), a receive buffer of 2 * `rcvbuf` bytes (the kernel's default when None), ENOBUFS
        when it overflows. Extended and capped ACKs are on, as on asynctc's real sockets."""
        return self.rtnl.open(groups, rcvbuf, blocking)

    def _nl_notify(self, group: int, req: _NlReq | None, build: Callable[[int, int], bytes]) -> None:
        """Multicast a notification built by `build(seq, portid)` (the request's, or 0 and 0 for a change
        no request made) to `group`, and echo it to the requester when it asked for NLM_F_ECHO."""
        seq, portid = (req.seq, req.sock.portid) if req is not None else (0, 0)
        message = build(seq, portid)
        self.rtnl.notify(group, message, exclude=portid)
        if req is not None and req.flags & codec.NLM_F_ECHO:
            req.sock.deliver(message, NLMSG_GOODSIZE)

    def rtnl_request(self, sock: MockNetlinkSocket, mtype: int, flags: int, msg: bytes) -> None:
        """Handle one rtnetlink request from `sock` (called by its `send`): answers and notifications are
        queued before this returns; a refusal raises `RequestError` (answered with NLMSG_ERROR). Fault and
        latency injection apply, by operation name: "link_get", "link_dump", "qdisc_add",
        "qdisc_delete", "qdisc_get", "qdisc_dump", "filter_add", "filter_replace" (RTM_NEWTFILTER with
        NLM_F_REPLACE and without NLM_F_EXCL), "filter_delete", "filter_get", "filter_dump"."""
        dump = bool(flags & codec.NLM_F_DUMP)
        _length, _t, _f, seq, _pid = struct.unpack_from("=IHHII", msg, 0)
        req = _NlReq(sock, seq, flags)
        with self._lock:
            try:
                if mtype == codec.RTM_GETLINK:
                    self._rtnl_link(sock, msg, seq, dump)
                elif mtype in (codec.RTM_NEWQDISC, codec.RTM_DELQDISC, codec.RTM_GETQDISC):
                    self._rtnl_qdisc(sock, mtype, msg, req, dump)
                elif mtype in (codec.RTM_NEWTFILTER, codec.RTM_DELTFILTER, codec.RTM_GETTFILTER):
                    self._rtnl_filter(sock, mtype, msg, req, dump)
                else:
                    raise RequestError(_errno.EOPNOTSUPP)
            except KernelError as exc:
                raise RequestError(exc.errno or _errno.EINVAL,
                                   exc.extack if exc.detail != "injected fault" else "injected fault") from None
            finally:
                self._gc_progs()

    def _rtnl_link(self, sock: MockNetlinkSocket, msg: bytes, seq: int, dump: bool) -> None:
        if dump:
            self._enter("link_dump")
            sock.start_dump([encode_link_msg(codec.RTM_NEWLINK, codec.NLM_F_MULTI, seq, sock.portid, d.ifindex,
                                             d.name, d.ifflags, d.loopback)
                             for d in sorted(self._devices.values(), key=lambda x: x.ifindex)],
                            encode_done(seq, sock.portid), consistent=True)
            return
        self._enter("link_get")
        ifindex, name = parse_link(msg)
        if ifindex > 0:
            d = self._devices.get(ifindex)
        elif name is not None:
            d = next((x for x in self._devices.values() if x.name == name), None)
        else:
            raise RequestError(_errno.EINVAL)
        if d is None:
            raise RequestError(_errno.ENODEV)
        sock.deliver(encode_link_msg(codec.RTM_NEWLINK, 0, seq, sock.portid, d.ifindex, d.name, d.ifflags,
                                     d.loopback))

    def _rtnl_qdisc(self, sock: MockNetlinkSocket, mtype: int, msg: bytes, req: _NlReq, dump: bool) -> None:
        r = parse_tc(msg)
        if mtype == codec.RTM_GETQDISC and dump:
            self._enter("qdisc_dump")
            sock.start_dump([encode_qdisc_msg(codec.RTM_NEWQDISC, codec.NLM_F_MULTI, r.seq, sock.portid,
                                              d.ifindex, TC_H_CLSACT, CLSACT_HANDLE, d.qdisc.kind)
                             for d in sorted(self._devices.values(), key=lambda x: x.ifindex)
                             if d.qdisc is not None],
                            encode_done(r.seq, sock.portid))
            return
        op = {codec.RTM_NEWQDISC: "qdisc_add", codec.RTM_DELQDISC: "qdisc_delete"}.get(mtype, "qdisc_get")
        self._enter(op)
        d = self._tc_dev(r.ifindex, op)
        if mtype == codec.RTM_NEWQDISC:
            self._tc_new_qdisc(op, d, r.parent, r.handle, r.flags, r.kind, r.raw_options, req)
        elif mtype == codec.RTM_DELQDISC:
            self._tc_del_qdisc(op, d, r.parent, r.handle, r.kind, req)
        else:
            q = self._tc_qdisc_lookup(op, d, r.parent, r.handle, r.kind)
            if q is not None:
                sock.deliver(encode_qdisc_msg(codec.RTM_NEWQDISC, 0, r.seq, sock.portid, d.ifindex, TC_H_CLSACT,
                                              CLSACT_HANDLE, q.kind))

    def _rtnl_filter(self, sock: MockNetlinkSocket, mtype: int, msg: bytes, req: _NlReq, dump: bool) -> None:
        r = parse_tc(msg)
        if mtype == codec.RTM_GETTFILTER and dump:
            self._enter("filter_dump")
            sock.start_dump([encode_filter_msg(codec.RTM_NEWTFILTER, codec.NLM_F_MULTI, r.seq, sock.portid, w)
                             for w in self._tc_dump_filters(r.ifindex, r.parent)
                             if not r.priority or w.priority == r.priority],
                            encode_done(r.seq, sock.portid))
            return
        chain = r.chain or 0
        if mtype == codec.RTM_NEWTFILTER:
            replace = r.flags & codec.NLM_F_REPLACE and not r.flags & codec.NLM_F_EXCL
            op = "filter_replace" if replace else "filter_add"
            self._enter(op)
            if r.priority == 0 and not r.flags & codec.NLM_F_CREATE:
                raise KernelError(_errno.ENOENT, op, extack="Invalid filter command with priority of zero")
            d = self._tc_dev(r.ifindex, op)
            opts = r.options or {}
            params = _BpfParams(
                fd=_opt_u32(opts, _TCA_BPF_FD), name=_opt_str(opts, _TCA_BPF_NAME),
                bpf_flags=_opt_u32(opts, _TCA_BPF_FLAGS), gen_flags=_opt_u32(opts, _TCA_BPF_FLAGS_GEN),
                classid=_opt_u32(opts, _TCA_BPF_CLASSID),
                classic=_TCA_BPF_OPS in opts and _TCA_BPF_OPS_LEN in opts,
                has_options=r.raw_options, refused_errno=_errno.EOPNOTSUPP)

            def change(block: _Block, tp: _Tp, old: _Filter | None, handle: int) -> _Filter:
                if tp.kind != "bpf":
                    raise KernelError(_errno.EOPNOTSUPP, op, f"changing {tp.kind} filters over netlink is not "
                                      "modelled by MockKernel (add them with add_foreign_filter)")
                return self._cls_bpf_change(op, d, params, block, tp, old, handle)

            self._tc_new_filter(op, d, r.parent, r.priority, r.protocol, r.handle, r.flags, r.kind, chain,
                                change, req)
        elif mtype == codec.RTM_DELTFILTER:
            op = "filter_delete"
            self._enter(op)
            if r.priority == 0 and (r.protocol or r.handle or r.kind is not None):
                raise KernelError(_errno.ENOENT, op, extack="Cannot flush filters with protocol, handle or kind set")
            d = self._tc_dev(r.ifindex, op)
            self._tc_del_filter(op, d, r.parent, r.priority, r.protocol, r.handle, r.kind, chain, req)
        else:
            op = "filter_get"
            self._enter(op)
            if r.priority == 0:
                raise KernelError(_errno.ENOENT, op, extack="Invalid filter command with priority of zero")
            d = self._tc_dev(r.ifindex, op)
            tp, fh, owner = self._tc_get_filter(op, d, r.parent, r.priority, r.protocol, r.handle, r.kind, chain)
            sock.deliver(encode_filter_msg(codec.RTM_NEWTFILTER, r.flags, r.seq, sock.portid,
                                           self._filter_wire(d, r.parent, tp, fh, owner)))

    # ====================================================================================================
    # inspection for tests
    # ====================================================================================================
    def hook(self, dev: DevRef, direction: Direction | str) -> TcxQuery:
        """The tcx hook now (like prog_query, but not counted and never faulted)."""
        direction = Direction.coerce(direction)
        with self._lock:
            h = self._dev(dev, "hook").hooks[direction]
            return TcxQuery(h.revision, tuple(TcxEntryInfo(e.prog_id, e.link_id) for e in h.entries))

    def filters(self, dev: DevRef, direction: Direction | str) -> tuple[FilterInfo, ...]:
        """The filters of one direction in run order (like filter_dump, not counted, never faulted)."""
        direction = Direction.coerce(direction)
        with self._lock:
            d = self._dev(dev, "filters")
            return tuple(self._filter_info(d, f) for f in self._ordered_filters(d, direction))

    def qdisc(self, dev: DevRef) -> QdiscInfo | None:
        """The device's clsact/ingress qdisc (not counted, never faulted)."""
        with self._lock:
            d = self._dev(dev, "qdisc")
            if d.qdisc is None:
                return None
            return QdiscInfo(d.ifindex, d.qdisc.kind, CLSACT_HANDLE, TC_H_CLSACT, d.qdisc.creator)

    def tagged(self, tag: str) -> tuple[tuple[object, ...], ...]:
        """Everything attached that `tag` created: ("tcx", link_id) for attached links it created and
        ("cls_bpf", ifindex, direction, priority, handle) for filters named with it, plus
        ("qdisc", ifindex) for qdiscs it created. For leak checks in tests."""
        out: list[tuple[object, ...]] = []
        with self._lock:
            for link in self._links.values():
                if link.creator == tag and self._link_index(link) is not None:
                    out.append(("tcx", link.id))
            for d in self._devices.values():
                for f in d.filters.values():
                    if f.name == tag or f.name.startswith(tag + "/"):
                        out.append(("cls_bpf", d.ifindex, f.direction, f.priority, f.handle))
                if d.qdisc is not None and d.qdisc.creator == tag:
                    out.append(("qdisc", d.ifindex))
        return tuple(out)

    def close(self) -> None:
        """Drop the kernel's references on real programs (their dup'd fds). The kernel stays usable (its
        own fds stay open until closed, or until the kernel is garbage collected)."""
        with self._lock:
            for rec in self._progs.values():
                if rec.real_fd is not None:
                    fd, rec.real_fd = rec.real_fd, None
                    os.close(fd)
