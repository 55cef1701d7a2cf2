"""bpf(2) through ctypes: programs, maps, pins, tcx links and hook queries.

Plain synchronous functions with no trio in them: asynctc calls the ones that can block (link create,
update and detach, close() of a link fd, queries) from worker threads through `lowlevel.netns`. A failed call
raises `BpfError`, an OSError that records which operation failed; `asynctc._errors.from_errno` turns it into
the public exception at the boundary, once.

Layouts of `union bpf_attr` and of the info structs are in KERNEL.md (byte offsets; fields are in the
machine's byte order). The system call number is chosen by architecture (`bpf_syscall_number`).
"""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import errno as _errno
import os
import platform
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "LINUX",
    "Bpf",
    "LinuxSyscalls",
    "Syscalls",
    "BPF_F_AFTER",
    "BPF_F_BEFORE",
    "BPF_F_ID",
    "BPF_F_LINK",
    "BPF_F_REPLACE",
    "BPF_LINK_TYPE_TCX",
    "BPF_PROG_TYPE_SCHED_CLS",
    "BPF_PROG_TYPE_SOCKET_FILTER",
    "BPF_PROG_TYPE_XDP",
    "BPF_TCX_EGRESS",
    "BPF_TCX_INGRESS",
    "BPF_ENABLE_STATS",
    "BPF_STATS_RUN_TIME",
    "ProgRunStats",
    "enable_stats",
    "prog_run_stats",
    "BpfError",
    "HookQuery",
    "LinkInfo",
    "MapInfo",
    "ProgInfo",
    "asm",
    "bpf_syscall_number",
    "check_field",
    "fd_object_kind",
    "link_create_tcx",
    "link_detach",
    "link_get_fd_by_id",
    "link_ids",
    "link_info",
    "link_update",
    "map_create_array",
    "map_delete_elem",
    "map_get_fd_by_id",
    "map_get_next_key",
    "map_info",
    "map_lookup_elem",
    "map_lookup_u64",
    "map_update_elem",
    "obj_get",
    "obj_pin",
    "possible_cpus",
    "prog_get_fd_by_id",
    "prog_info",
    "prog_load",
    "prog_query",
    "prog_test_run",
    "probe_tcx",
]

# The bpf(2) system call number differs by architecture (the kernel's syscall tables), by platform.machine().
SYS_BPF_BY_MACHINE: Final[Mapping[str, int]] = {
    "x86_64": 321,
    "aarch64": 280,
    "arm64": 280,
    "i386": 357,
    "i686": 357,
    "armv7l": 386,
    "armv7": 386,
    "ppc64": 361,
    "ppc64le": 361,
    "s390x": 351,
    "riscv64": 280,
}


def bpf_syscall_number(machine: str | None = None) -> int:
    """The bpf(2) system call number of `machine` (default: this one, `platform.machine()`).

    Raises OSError(ENOSYS) naming the architecture when asynctc does not know it."""
    machine = platform.machine() if machine is None else machine
    try:
        return SYS_BPF_BY_MACHINE[machine]
    except KeyError:
        known = ", ".join(sorted(SYS_BPF_BY_MACHINE))
        raise OSError(
            _errno.ENOSYS,
            f"bpf(2): asynctc does not know the system call number on the {machine!r} architecture (known: "
            f"{known}); use a backend that needs no bpf(2) (mock), or add the number to "
            "asynctc.lowlevel.bpf.SYS_BPF_BY_MACHINE",
        ) from None


_sys_bpf_number: int | None = None


def _bpf_nr(op: str) -> int:
    global _sys_bpf_number
    if _sys_bpf_number is None:
        try:
            _sys_bpf_number = bpf_syscall_number()
        except OSError as exc:
            raise BpfError(exc.errno or _errno.ENOSYS, op, str(exc)) from None
    return _sys_bpf_number

# commands
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34
BPF_ENABLE_STATS = 32

# BPF_ENABLE_STATS types
BPF_STATS_RUN_TIME = 0

# program and map types
BPF_PROG_TYPE_SOCKET_FILTER = 1
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
BPF_MAP_TYPE_ARRAY = 2

# attach and link types
BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_TCX = 11

# flags
BPF_OBJ_NAME_LEN = 16  # program and map names: 15 characters and a NUL
BPF_PSEUDO_MAP_FD = 1  # src_reg of a ld_imm64 whose immediate is a map fd
BPF_REG_FP = 10  # the read-only frame pointer register
BPF_FUNC_MAP_LOOKUP_ELEM = 1  # helper id of bpf_map_lookup_elem

BPF_F_REPLACE = 0x4
BPF_F_BEFORE = 0x8
BPF_F_AFTER = 0x10
BPF_F_ID = 0x20
BPF_F_LINK = 0x2000

ATTR_SIZE = 128

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A failed bpf(2) call. `op` names the operation (e.g. "link_create"); `log` holds a verifier log."""

    def __init__(self, err: int, op: str, log: str = "") -> None:
        super().__init__(err, os.strerror(err))
        self.op = op
        self.log = log

    @property
    def detail(self) -> str | None:
        """The kernel's own words (a verifier log), for messages."""
        return self.log or None

    def __str__(self) -> str:
        s = f"bpf {self.op}: [Errno {self.errno}] {self.strerror}"
        return s + (f"\n{self.log}" if self.log else "")


class Syscalls(abc.ABC):
    """The system calls under `Bpf`: the kernel boundary of every bpf(2) call asynctc makes.

    `LinuxSyscalls` makes them for real; an in-memory kernel (`asynctc_mock.MockKernel`) answers them itself,
    reading and writing `union bpf_attr` and the memory it points to exactly as the kernel does, so the same
    `Bpf` code (and the backends above it) runs on either."""

    @abc.abstractmethod
    def bpf(self, cmd: int, attr: ctypes.Array[ctypes.c_char], op: str) -> int:
        """bpf(cmd, attr, ATTR_SIZE): the call's non-negative result, or BpfError(errno, op)."""

    @abc.abstractmethod
    def close(self, fd: int) -> None:
        """close(2) of an fd this boundary gave out (a program, map or link fd)."""

    @abc.abstractmethod
    def fdinfo(self, fd: int) -> str:
        """The text of /proc/self/fdinfo/FD, or "" where there is no such fd."""

    @abc.abstractmethod
    def dup(self, fd: int) -> int:
        """dup(2) of an fd this boundary gave out (or a program fd handed to it): a new fd on the same object."""


class LinuxSyscalls(Syscalls):
    """The real bpf(2), close(2) and /proc/self/fdinfo."""

    def bpf(self, cmd: int, attr: ctypes.Array[ctypes.c_char], op: str) -> int:
        ret = int(_libc.syscall(_bpf_nr(op), cmd, attr, ATTR_SIZE))
        if ret < 0:
            raise BpfError(ctypes.get_errno(), op)
        return ret

    def close(self, fd: int) -> None:
        os.close(fd)

    def fdinfo(self, fd: int) -> str:
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                return f.read()
        except OSError:
            return ""

    def dup(self, fd: int) -> int:
        return os.dup(fd)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(ATTR_SIZE)


def _put(buf: ctypes.Array[ctypes.c_char], fmt: str, offset: int, *values: int) -> None:
    struct.pack_into(fmt, buf, offset, *values)


def _put_name(buf: ctypes.Array[ctypes.c_char], offset: int, name: str) -> None:
    encoded = name.encode()[: BPF_OBJ_NAME_LEN - 1]
    ctypes.memmove(ctypes.addressof(buf) + offset, encoded, len(encoded))


U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
FD_MAX = 0x7FFF_FFFF


def check_field(field: str, value: object, hi: int = U32_MAX, lo: int = 0) -> int:
    """`value` if it is an int in lo..hi (the range of the C field it is packed into); TypeError or ValueError
    naming the field otherwise (instead of a raw struct.error from the packing)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{field} must be in {lo}..{hi}, got {value}")
    return value


def _check_path(path: str) -> bytes:
    if "\0" in path:
        raise ValueError(f"the path {path!r} contains a NUL byte: the kernel would cut it there; remove it")
    return os.fsencode(path) + b"\0"


def _addr(obj: ctypes.Array[ctypes.c_char] | ctypes.Array[ctypes.c_uint32]) -> int:
    return ctypes.addressof(obj)


# ---------------------------------------------------------------------------------------------------------
# Instructions


class asm:
    """A few eBPF instruction encoders, enough for asynctc's built-in programs."""

    @staticmethod
    def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
        # The register nibbles follow the byte order (struct bpf_insn's bit fields): dst first on little-endian.
        regs = (src << 4) | dst if sys.byteorder == "little" else (dst << 4) | src
        return struct.pack("=BBhi", code, regs, off, imm)

    @classmethod
    def mov64_imm(cls, dst: int, imm: int) -> bytes:
        return cls.insn(0xB7, dst=dst, imm=imm)

    @classmethod
    def mov64_reg(cls, dst: int, src: int) -> bytes:
        return cls.insn(0xBF, dst=dst, src=src)

    @classmethod
    def add64_imm(cls, dst: int, imm: int) -> bytes:
        return cls.insn(0x07, dst=dst, imm=imm)

    @classmethod
    def ld_map_fd(cls, dst: int, map_fd: int) -> bytes:
        # ld_imm64 with src_reg = BPF_PSEUDO_MAP_FD: two instruction slots
        return cls.insn(0x18, dst=dst, src=BPF_PSEUDO_MAP_FD, imm=map_fd) + cls.insn(0)

    @classmethod
    def st_mem_w(cls, dst: int, off: int, imm: int) -> bytes:
        return cls.insn(0x62, dst=dst, off=off, imm=imm)

    @classmethod
    def call(cls, helper: int) -> bytes:
        return cls.insn(0x85, imm=helper)

    @classmethod
    def jeq_imm(cls, dst: int, imm: int, off: int) -> bytes:
        return cls.insn(0x15, dst=dst, off=off, imm=imm)

    @classmethod
    def atomic_add64(cls, dst: int, src: int, off: int = 0) -> bytes:
        return cls.insn(0xDB, dst=dst, src=src, off=off, imm=0)

    @classmethod
    def exit(cls) -> bytes:
        return cls.insn(0x95)


# ---------------------------------------------------------------------------------------------------------
# Programs and maps


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """The parts of struct bpf_prog_info asynctc uses."""

    type: int
    id: int
    tag: str
    name: str
    ifindex: int


# ---------------------------------------------------------------------------------------------------------
# tcx links and queries


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """The parts of struct bpf_link_info asynctc uses (tcx: ifindex 0 once the device is gone)."""

    type: int
    id: int
    prog_id: int
    ifindex: int
    attach_type: int


def _check_attach(prog_fd: int, ifindex: int, attach_type: int, flags: int, relative: int,
                  expected_revision: int) -> None:
    check_field("prog_fd", prog_fd, FD_MAX)
    check_field("ifindex", ifindex)
    check_field("attach_type", attach_type)
    check_field("flags", flags)
    check_field("relative (anchor id or fd)", relative)
    check_field("expected_revision", expected_revision, U64_MAX)


@dataclass(frozen=True, slots=True)
class HookQuery:
    """BPF_PROG_QUERY's answer for a tcx hook: ids in run order (link_ids[i] = 0 without a link)."""

    revision: int
    prog_ids: tuple[int, ...]
    link_ids: tuple[int, ...]


# ---------------------------------------------------------------------------------------------------------
# Maps by bytes: any key and value size (asynctc.Map). Each call is one syscall of a few microseconds.

# map types asynctc names (see asynctc.Map.type_name); per-CPU maps hold one value per possible CPU
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
PERCPU_MAP_TYPES = frozenset(
    {
        BPF_MAP_TYPE_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_LRU_PERCPU_HASH,
        BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE,
    }
)

# BPF_MAP_UPDATE_ELEM flags
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_MAP_INFO_SIZE = 88  # struct bpf_map_info up to map_extra


def _elem_attr(
    map_fd: int, key: ctypes.Array[ctypes.c_char] | None, value: int, flags: int = 0
) -> ctypes.Array[ctypes.c_char]:
    # BPF_MAP_*_ELEM and BPF_MAP_GET_NEXT_KEY: map_fd@0 key(ptr)@8 value|next_key(ptr)@16 flags(u64)@24
    attr = _attr()
    _put(attr, "=IIQQQ", 0, map_fd, 0, _addr(key) if key is not None else 0, value, flags)
    return attr


@dataclass(frozen=True, slots=True)
class MapInfo:
    """The parts of struct bpf_map_info asynctc uses (the kernel keeps at most 15 bytes of the name)."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def possible_cpus() -> int:
    """How many CPUs the kernel counts as possible (/sys/devices/system/cpu/possible): the number of
    values a per-CPU map holds per key."""
    global _possible_cpus
    if _possible_cpus is None:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        count = 0
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1
        _possible_cpus = count
    return _possible_cpus


_possible_cpus: int | None = None


@dataclass(frozen=True, slots=True)
class ProgRunStats:
    """A program's run statistics (struct bpf_prog_info run_time_ns@192, run_cnt@200): how often it ran and
    how long it ran in total. The kernel adds to them only while run-time statistics are enabled (by a held
    `enable_stats()` fd anywhere on the machine, or the sysctl kernel.bpf_stats_enabled=1)."""

    run_cnt: int
    run_time_ns: int


# ---------------------------------------------------------------------------------------------------------
# The calls, over one kernel boundary


class Bpf:
    """asynctc's bpf(2) calls over one `Syscalls` boundary: the real kernel (`LINUX`, whose methods are also
    this module's functions) or a simulated one. A backend makes its calls through the `Bpf` of its
    session's kernel (`BackendContext.kernel.bpf`), never through the module functions, so it runs unchanged
    on either."""

    def __init__(self, syscalls: Syscalls) -> None:
        self.syscalls = syscalls
        self._sys_bpf = syscalls.bpf

    def close(self, fd: int) -> None:
        """close(2) of a program, map or link fd (closing the last fd of an attached tcx link detaches it and
        can wait for an RCU grace period: call it from a worker thread)."""
        self.syscalls.close(fd)

    def dup(self, fd: int) -> int:
        """dup(2) of a program, map or link fd (never blocks)."""
        return self.syscalls.dup(fd)

    def prog_load(
        self,
        prog_type: int,
        insns: bytes,
        *,
        name: str = "",
        license: str = "GPL",
        prog_ifindex: int = 0,
        expected_attach_type: int = 0,
        log_size: int = 64 * 1024,
    ) -> int:
        """BPF_PROG_LOAD; returns the program fd. On failure the verifier log is in BpfError.log."""
        if len(insns) % 8:
            raise ValueError("instructions must be a multiple of 8 bytes")
        attr = _attr()
        code = ctypes.create_string_buffer(insns, len(insns))
        lic = ctypes.create_string_buffer(license.encode() + b"\0")
        logbuf = ctypes.create_string_buffer(log_size) if log_size else None
        _put(attr, "=IIQQ", 0, prog_type, len(insns) // 8, _addr(code), _addr(lic))
        if logbuf is not None:
            _put(attr, "=IIQ", 24, 1, log_size, _addr(logbuf))
        _put_name(attr, 48, name)
        _put(attr, "=II", 64, prog_ifindex, expected_attach_type)
        try:
            return self._sys_bpf(BPF_PROG_LOAD, attr, "prog_load")
        except BpfError as exc:
            log = logbuf.value.decode(errors="replace").strip() if logbuf is not None else ""
            raise BpfError(exc.errno or 0, "prog_load", log) from None

    def map_create_array(self, value_size: int = 8, max_entries: int = 1, *, name: str = "") -> int:
        """BPF_MAP_CREATE of an ARRAY map with u32 keys; returns the map fd."""
        attr = _attr()
        _put(attr, "=IIIII", 0, BPF_MAP_TYPE_ARRAY, 4, value_size, max_entries, 0)
        _put_name(attr, 28, name)  # map_name@28 (after inner_map_fd@20, numa_node@24)
        try:
            return self._sys_bpf(BPF_MAP_CREATE, attr, "map_create")
        except BpfError as exc:
            if exc.errno != _errno.EINVAL or not name:
                raise
        return self.map_create_array(value_size, max_entries)

    def map_lookup(self, map_fd: int, key: int, value_size: int) -> bytes:
        """BPF_MAP_LOOKUP_ELEM with a u32 key; returns the raw value.

        The kernel writes the map's whole value into the buffer, whatever size the caller expects: the map's
        key and value sizes are checked first (BpfError EINVAL when they are not a u32 key and `value_size`
        bytes), so a map of another shape at a path can never overrun it."""
        info = self.map_info(map_fd)
        if info.key_size != 4 or info.value_size != value_size:
            raise BpfError(_errno.EINVAL, "map_lookup",
                           f"the map has {info.key_size}-byte keys and {info.value_size}-byte values, not 4 and "
                           f"{value_size}")
        value = self.map_lookup_elem(map_fd, struct.pack("=I", key), value_size)
        if value is None:
            raise BpfError(_errno.ENOENT, "map_lookup")
        return value

    def map_lookup_u64(self, map_fd: int, key: int = 0) -> int:
        """The u64 value at `key` of an array map."""
        return int(struct.unpack("=Q", self.map_lookup(map_fd, key, 8))[0])

    def map_update(self, map_fd: int, key: int, value: bytes) -> None:
        """BPF_MAP_UPDATE_ELEM with a u32 key and BPF_ANY."""
        self.map_update_elem(map_fd, struct.pack("=I", key), value)

    def prog_test_run(self, prog_fd: int, data: bytes = bytes(64), repeat: int = 1) -> int:
        """BPF_PROG_TEST_RUN: run the program on `data` and return its verdict (as a signed int)."""
        attr = _attr()
        buf = ctypes.create_string_buffer(data, len(data))
        _put(attr, "=IIII", 0, prog_fd, 0, len(data), 0)
        _put(attr, "=QQI", 16, _addr(buf), 0, repeat)
        self._sys_bpf(BPF_PROG_TEST_RUN, attr, "prog_test_run")
        return int(struct.unpack_from("=i", attr, 4)[0])

    def _get_info(self, fd: int, size: int, op: str) -> ctypes.Array[ctypes.c_char]:
        info = ctypes.create_string_buffer(size)
        attr = _attr()
        _put(attr, "=IIQ", 0, fd, size, _addr(info))
        self._sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr, op)
        return info

    def prog_info(self, prog_fd: int) -> ProgInfo:
        """BPF_OBJ_GET_INFO_BY_FD on a program fd."""
        info = self._get_info(prog_fd, 256, "prog_info")
        ptype, pid = struct.unpack_from("=II", info, 0)
        tag = info.raw[8:16].hex()
        name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
        (ifindex,) = struct.unpack_from("=I", info, 80)
        return ProgInfo(type=ptype, id=pid, tag=tag, name=name, ifindex=ifindex)

    def _fd_by_id(self, cmd: int, obj_id: int, op: str, *, field: str) -> int:
        """BPF_{PROG,MAP,LINK}_GET_FD_BY_ID: an fd on the object with this id (id@0); `field` names the id
        in the error for a value no u32 holds."""
        check_field(field, obj_id)
        attr = _attr()
        _put(attr, "=I", 0, obj_id)
        return self._sys_bpf(cmd, attr, op)

    def prog_get_fd_by_id(self, prog_id: int) -> int:
        return self._fd_by_id(BPF_PROG_GET_FD_BY_ID, prog_id, "prog_get_fd_by_id", field="prog_id")

    def obj_pin(self, fd: int, path: str) -> None:
        """BPF_OBJ_PIN: pin a program, map or link at `path` on a bpffs mount."""
        check_field("fd", fd, FD_MAX)
        attr = _attr()
        p = ctypes.create_string_buffer(_check_path(path))
        _put(attr, "=QI", 0, _addr(p), fd)
        self._sys_bpf(BPF_OBJ_PIN, attr, "obj_pin")

    def obj_get(self, path: str, flags: int = 0) -> int:
        """BPF_OBJ_GET: an fd on what is pinned at `path`."""
        check_field("flags", flags)
        attr = _attr()
        p = ctypes.create_string_buffer(_check_path(path))
        _put(attr, "=QII", 0, _addr(p), 0, flags)
        return self._sys_bpf(BPF_OBJ_GET, attr, "obj_get")

    def fd_object_kind(self, fd: int) -> str:
        """"prog", "map", "link" or "" for an fd, from /proc/self/fdinfo (works for any BPF object)."""
        text = self.syscalls.fdinfo(fd)
        for key, kind in (("link_type:", "link"), ("prog_type:", "prog"), ("map_type:", "map")):
            if f"\n{key}" in text or text.startswith(key):
                return kind
        return ""

    def link_info(self, link_fd: int) -> LinkInfo:
        info = self._get_info(link_fd, 64, "link_info")
        ltype, lid, prog_id = struct.unpack_from("=III", info, 0)
        ifindex, attach_type = struct.unpack_from("=II", info, 16)
        return LinkInfo(type=ltype, id=lid, prog_id=prog_id, ifindex=ifindex, attach_type=attach_type)

    def link_get_fd_by_id(self, link_id: int) -> int:
        return self._fd_by_id(BPF_LINK_GET_FD_BY_ID, link_id, "link_get_fd_by_id", field="link_id")

    def link_ids(self) -> list[int]:
        """The ids of every BPF link that exists now, system-wide (BPF_LINK_GET_NEXT_ID, as `bpftool link`
        lists them): attached, detached or severed links that something (an fd, a pin) still holds."""
        ids: list[int] = []
        start = 0
        while True:
            attr = _attr()
            _put(attr, "<I", 0, start)
            try:
                self._sys_bpf(BPF_LINK_GET_NEXT_ID, attr, "link_get_next_id")
            except BpfError as exc:
                if exc.errno == _errno.ENOENT:
                    return ids
                raise
            (start,) = struct.unpack_from("<I", attr, 4)
            ids.append(start)

    def link_create_tcx(self,
        prog_fd: int,
        ifindex: int,
        attach_type: int,
        *,
        flags: int = 0,
        relative: int = 0,
        expected_revision: int = 0,
    ) -> int:
        """BPF_LINK_CREATE of a tcx link; returns the link fd.

        `flags` combine BPF_F_BEFORE/BPF_F_AFTER with BPF_F_ID/BPF_F_LINK to say what `relative` is (a program
        fd, a program id, a link fd or a link id). expected_revision 0 means "don't check".
        """
        _check_attach(prog_fd, ifindex, attach_type, flags, relative, expected_revision)
        attr = _attr()
        _put(attr, "=IIIIIIQ", 0, prog_fd, ifindex, attach_type, flags, relative, 0, expected_revision)
        return self._sys_bpf(BPF_LINK_CREATE, attr, "link_create")

    def link_update(self, link_fd: int, new_prog_fd: int, *, old_prog_fd: int | None = None) -> None:
        """BPF_LINK_UPDATE; with old_prog_fd it is a compare-and-swap (EPERM when another program is there)."""
        check_field("link_fd", link_fd, FD_MAX)
        check_field("new_prog_fd", new_prog_fd, FD_MAX)
        if old_prog_fd is not None:
            check_field("old_prog_fd", old_prog_fd, FD_MAX)
        attr = _attr()
        if old_prog_fd is None:
            _put(attr, "=III", 0, link_fd, new_prog_fd, 0)
            self._sys_bpf(BPF_LINK_UPDATE, attr, "link_update")
        else:
            _put(attr, "=IIII", 0, link_fd, new_prog_fd, BPF_F_REPLACE, old_prog_fd)
            self._sys_bpf(BPF_LINK_UPDATE, attr, "link_update_cas")

    def link_detach(self, link_fd: int) -> None:
        """BPF_LINK_DETACH: detach now; the fd stays open (close it afterwards)."""
        attr = _attr()
        _put(attr, "=I", 0, link_fd)
        self._sys_bpf(BPF_LINK_DETACH, attr, "link_detach")

    def prog_query(self, ifindex: int, attach_type: int, *, capacity: int = 64) -> HookQuery:
        """BPF_PROG_QUERY of a tcx hook, retrying with a larger array on ENOSPC."""
        check_field("ifindex", ifindex)
        check_field("attach_type", attach_type)
        while True:
            prog_ids = (ctypes.c_uint32 * capacity)()
            link_ids = (ctypes.c_uint32 * capacity)()
            attr = _attr()
            _put(attr, "=IIII", 0, ifindex, attach_type, 0, 0)
            _put(attr, "=QI", 16, _addr(prog_ids), capacity)
            _put(attr, "=Q", 40, _addr(link_ids))
            try:
                self._sys_bpf(BPF_PROG_QUERY, attr, "prog_query")
            except BpfError as exc:
                if exc.errno == _errno.ENOSPC:
                    (count,) = struct.unpack_from("=I", attr, 24)
                    capacity = max(count, capacity * 2)
                    continue
                raise
            (count,) = struct.unpack_from("=I", attr, 24)
            (revision,) = struct.unpack_from("=Q", attr, 56)
            return HookQuery(
                revision=revision,
                prog_ids=tuple(prog_ids[:count]),
                link_ids=tuple(link_ids[:count]),
            )

    def probe_tcx(self) -> tuple[bool, str]:
        """Whether this kernel has tcx: create a link on ifindex 0xffffffff; ENODEV means tcx exists.

        Returns (available, reason). Needs CAP_BPF to load the probe program; without it the answer says so.
        """
        try:
            fd = self.prog_load(BPF_PROG_TYPE_SCHED_CLS, asm.mov64_imm(0, 0) + asm.exit(), name="asynctc_probe")
        except BpfError as exc:
            if exc.errno in (_errno.EPERM, _errno.EACCES):
                from .._errors import _cap_hint

                return False, f"cannot load BPF programs here: {_cap_hint('prog')}"
            return False, f"cannot load a SCHED_CLS program: {exc.strerror}"
        try:
            try:
                lfd = self.link_create_tcx(fd, 0xFFFFFFFF, BPF_TCX_INGRESS)
            except BpfError as exc:
                if exc.errno == _errno.ENODEV:
                    return True, "tcx links are supported (Linux >= 6.6)"
                if exc.errno == _errno.EPERM:
                    from .._errors import _cap_hint

                    return False, f"cannot create tcx links here: {_cap_hint('net')}"
                return False, f"tcx links are not supported by this kernel (probe answered {exc.strerror})"
            self.close(lfd)  # pragma: no cover - no device has that ifindex
            return True, "tcx links are supported"
        finally:
            self.close(fd)

    def _elem_call(self, cmd: int, attr: ctypes.Array[ctypes.c_char], op: str) -> bool:
        """One element call; False where the kernel says there is no such element (ENOENT)."""
        try:
            self._sys_bpf(cmd, attr, op)
        except BpfError as exc:
            if exc.errno == _errno.ENOENT:
                return False
            raise
        return True

    def map_lookup_elem(self, map_fd: int, key: bytes, value_size: int) -> bytes | None:
        """BPF_MAP_LOOKUP_ELEM: the raw value at `key` (`value_size` bytes: for per-CPU maps the value size
        rounded up to 8, times the number of possible CPUs), or None where there is none (ENOENT)."""
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value_size)
        return v.raw if self._elem_call(BPF_MAP_LOOKUP_ELEM, _elem_attr(map_fd, k, _addr(v)), "map_lookup") else None

    def map_update_elem(self, map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """BPF_MAP_UPDATE_ELEM with BPF_ANY (create or replace), BPF_NOEXIST or BPF_EXIST."""
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value, len(value))
        self._sys_bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(map_fd, k, _addr(v), flags), "map_update")

    def map_delete_elem(self, map_fd: int, key: bytes) -> bool:
        """BPF_MAP_DELETE_ELEM: True if an element was deleted, False if there was none (ENOENT)."""
        k = ctypes.create_string_buffer(key, len(key))
        return self._elem_call(BPF_MAP_DELETE_ELEM, _elem_attr(map_fd, k, 0), "map_delete")

    def map_get_next_key(self, map_fd: int, key: bytes | None, key_size: int) -> bytes | None:
        """BPF_MAP_GET_NEXT_KEY: the key after `key` (the first key for None, or for a key not in the map),
        or None after the last one (ENOENT)."""
        k = ctypes.create_string_buffer(key, len(key)) if key is not None else None
        nxt = ctypes.create_string_buffer(key_size)
        found = self._elem_call(BPF_MAP_GET_NEXT_KEY, _elem_attr(map_fd, k, _addr(nxt)), "map_get_next_key")
        return nxt.raw if found else None

    def map_get_fd_by_id(self, map_id: int) -> int:
        """BPF_MAP_GET_FD_BY_ID (needs CAP_SYS_ADMIN)."""
        return self._fd_by_id(BPF_MAP_GET_FD_BY_ID, map_id, "map_get_fd_by_id", field="map_id")

    def map_info(self, map_fd: int) -> MapInfo:
        """BPF_OBJ_GET_INFO_BY_FD on a map fd: type@0 id@4 key_size@8 value_size@12 max_entries@16
        map_flags@20 name[16]@24."""
        info = self._get_info(map_fd, BPF_MAP_INFO_SIZE, "map_info")
        mtype, mid, key_size, value_size, max_entries, flags = struct.unpack_from("<IIIIII", info, 0)
        name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
        return MapInfo(
            type=mtype,
            id=mid,
            key_size=key_size,
            value_size=value_size,
            max_entries=max_entries,
            flags=flags,
            name=name,
        )

    def enable_stats(self, stats_type: int = BPF_STATS_RUN_TIME) -> int:
        """BPF_ENABLE_STATS: switch on the kernel's per-program run statistics; returns an fd that keeps them on
        until it is closed (or the process ends). Needs CAP_SYS_ADMIN."""
        attr = _attr()
        _put(attr, "<I", 0, stats_type)
        return self._sys_bpf(BPF_ENABLE_STATS, attr, "enable_stats")

    def prog_run_stats(self, prog_fd: int) -> ProgRunStats:
        """The run count and total run time of a program (BPF_OBJ_GET_INFO_BY_FD)."""
        info = self._get_info(prog_fd, 216, "prog_info")
        run_time_ns, run_cnt = struct.unpack_from("<QQ", info, 192)
        return ProgRunStats(run_cnt=run_cnt, run_time_ns=run_time_ns)


LINUX: Final = Bpf(LinuxSyscalls())
"""The real kernel's bpf(2) calls; the module functions below are its methods."""

prog_load = LINUX.prog_load
map_create_array = LINUX.map_create_array
map_lookup = LINUX.map_lookup
map_lookup_u64 = LINUX.map_lookup_u64
map_update = LINUX.map_update
prog_test_run = LINUX.prog_test_run
prog_info = LINUX.prog_info
prog_get_fd_by_id = LINUX.prog_get_fd_by_id
obj_pin = LINUX.obj_pin
obj_get = LINUX.obj_get
fd_object_kind = LINUX.fd_object_kind
link_info = LINUX.link_info
link_get_fd_by_id = LINUX.link_get_fd_by_id
link_ids = LINUX.link_ids
link_create_tcx = LINUX.link_create_tcx
link_update = LINUX.link_update
link_detach = LINUX.link_detach
prog_query = LINUX.prog_query
probe_tcx = LINUX.probe_tcx
map_lookup_elem = LINUX.map_lookup_elem
map_update_elem = LINUX.map_update_elem
map_delete_elem = LINUX.map_delete_elem
map_get_next_key = LINUX.map_get_next_key
map_get_fd_by_id = LINUX.map_get_fd_by_id
map_info = LINUX.map_info
enable_stats = LINUX.enable_stats
prog_run_stats = LINUX.prog_run_stats
