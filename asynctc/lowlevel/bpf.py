"""bpf(2) through ctypes: programs, maps, pins, tcx links and hook queries.

Plain synchronous functions with no trio in them: asynctc calls the ones that can block (link create,
update and detach, close() of a link fd, queries) from worker threads through `lowlevel.netns`. A failed call
raises `BpfError`, an OSError that records which operation failed; `asynctc._errors.from_errno` turns it into
the public exception at the boundary, once.

Layouts of `union bpf_attr` and of the info structs are in KERNEL.md (byte offsets, x86_64).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import struct
from dataclasses import dataclass

__all__ = [
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
    "BpfError",
    "HookQuery",
    "LinkInfo",
    "ProgInfo",
    "asm",
    "close_fd",
    "fd_object_kind",
    "link_create_tcx",
    "link_detach",
    "link_get_fd_by_id",
    "link_ids",
    "link_info",
    "link_update",
    "map_create_array",
    "map_lookup_u64",
    "obj_get",
    "obj_pin",
    "prog_attach",
    "prog_detach",
    "prog_get_fd_by_id",
    "prog_info",
    "prog_load",
    "prog_query",
    "prog_test_run",
    "probe_tcx",
]

SYS_bpf = 321  # x86_64

# commands
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34

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

    def __str__(self) -> str:
        s = f"bpf {self.op}: [Errno {self.errno}] {self.strerror}"
        return s + (f"\n{self.log}" if self.log else "")


def _sys_bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], op: str) -> int:
    ret = int(_libc.syscall(SYS_bpf, cmd, attr, ATTR_SIZE))
    if ret < 0:
        raise BpfError(ctypes.get_errno(), op)
    return ret


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(ATTR_SIZE)


def _put(buf: ctypes.Array[ctypes.c_char], fmt: str, offset: int, *values: int) -> None:
    struct.pack_into(fmt, buf, offset, *values)


def _put_name(buf: ctypes.Array[ctypes.c_char], offset: int, name: str) -> None:
    encoded = name.encode()[:15]
    ctypes.memmove(ctypes.addressof(buf) + offset, encoded, len(encoded))


def _addr(obj: ctypes.Array[ctypes.c_char] | ctypes.Array[ctypes.c_uint32]) -> int:
    return ctypes.addressof(obj)


def close_fd(fd: int) -> None:
    """close() an fd; for an attached tcx link this waits for an RCU grace period (run it in a thread)."""
    os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# Instructions


class asm:
    """A few eBPF instruction encoders, enough for asynctc's built-in programs."""

    @staticmethod
    def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
        return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)

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
        # ld_imm64 with src_reg = BPF_PSEUDO_MAP_FD (1): two instruction slots
        return cls.insn(0x18, dst=dst, src=1, imm=map_fd) + cls.insn(0)

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


def prog_load(
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
    _put(attr, "<IIQQ", 0, prog_type, len(insns) // 8, _addr(code), _addr(lic))
    if logbuf is not None:
        _put(attr, "<IIQ", 24, 1, log_size, _addr(logbuf))
    _put_name(attr, 48, name)
    _put(attr, "<II", 64, prog_ifindex, expected_attach_type)
    ret = int(_libc.syscall(SYS_bpf, BPF_PROG_LOAD, attr, ATTR_SIZE))
    if ret < 0:
        err = ctypes.get_errno()
        log = logbuf.value.decode(errors="replace").strip() if logbuf is not None else ""
        raise BpfError(err, "prog_load", log)
    return ret


def map_create_array(value_size: int = 8, max_entries: int = 1, *, name: str = "") -> int:
    """BPF_MAP_CREATE of an ARRAY map with u32 keys; returns the map fd."""
    attr = _attr()
    _put(attr, "<IIIII", 0, BPF_MAP_TYPE_ARRAY, 4, value_size, max_entries, 0)
    _put_name(attr, 28, name)  # map_name@28 (after inner_map_fd@20, numa_node@24)
    try:
        return _sys_bpf(BPF_MAP_CREATE, attr, "map_create")
    except BpfError as exc:
        if exc.errno != _errno.EINVAL or not name:
            raise
    return map_create_array(value_size, max_entries)


def map_lookup(map_fd: int, key: int, value_size: int) -> bytes:
    """BPF_MAP_LOOKUP_ELEM with a u32 key; returns the raw value."""
    attr = _attr()
    k = ctypes.create_string_buffer(struct.pack("<I", key), 4)
    v = ctypes.create_string_buffer(value_size)
    _put(attr, "<IIQQ", 0, map_fd, 0, _addr(k), _addr(v))
    _sys_bpf(BPF_MAP_LOOKUP_ELEM, attr, "map_lookup")
    return v.raw


def map_lookup_u64(map_fd: int, key: int = 0) -> int:
    """The u64 value at `key` of an array map."""
    return int(struct.unpack("<Q", map_lookup(map_fd, key, 8))[0])


def map_update(map_fd: int, key: int, value: bytes) -> None:
    """BPF_MAP_UPDATE_ELEM (2) with a u32 key and BPF_ANY."""
    attr = _attr()
    k = ctypes.create_string_buffer(struct.pack("<I", key), 4)
    v = ctypes.create_string_buffer(value, len(value))
    _put(attr, "<IIQQQ", 0, map_fd, 0, _addr(k), _addr(v), 0)
    _sys_bpf(2, attr, "map_update")


def prog_test_run(prog_fd: int, data: bytes = bytes(64), repeat: int = 1) -> int:
    """BPF_PROG_TEST_RUN: run the program on `data` and return its verdict (as a signed int)."""
    attr = _attr()
    buf = ctypes.create_string_buffer(data, len(data))
    _put(attr, "<IIII", 0, prog_fd, 0, len(data), 0)
    _put(attr, "<QQI", 16, _addr(buf), 0, repeat)
    _sys_bpf(BPF_PROG_TEST_RUN, attr, "prog_test_run")
    return int(struct.unpack_from("<i", attr, 4)[0])


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """The parts of struct bpf_prog_info asynctc uses."""

    type: int
    id: int
    tag: str
    name: str
    ifindex: int


def _get_info(fd: int, size: int, op: str) -> ctypes.Array[ctypes.c_char]:
    info = ctypes.create_string_buffer(size)
    attr = _attr()
    _put(attr, "<IIQ", 0, fd, size, _addr(info))
    _sys_bpf(BPF_OBJ_GET_INFO_BY_FD, attr, op)
    return info


def prog_info(prog_fd: int) -> ProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a program fd."""
    info = _get_info(prog_fd, 256, "prog_info")
    ptype, pid = struct.unpack_from("<II", info, 0)
    tag = info.raw[8:16].hex()
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    (ifindex,) = struct.unpack_from("<I", info, 80)
    return ProgInfo(type=ptype, id=pid, tag=tag, name=name, ifindex=ifindex)


def prog_get_fd_by_id(prog_id: int) -> int:
    attr = _attr()
    _put(attr, "<I", 0, prog_id)
    return _sys_bpf(BPF_PROG_GET_FD_BY_ID, attr, "prog_get_fd_by_id")


def obj_pin(fd: int, path: str) -> None:
    """BPF_OBJ_PIN: pin a program, map or link at `path` on a bpffs mount."""
    attr = _attr()
    p = ctypes.create_string_buffer(os.fsencode(path) + b"\0")
    _put(attr, "<QI", 0, _addr(p), fd)
    _sys_bpf(BPF_OBJ_PIN, attr, "obj_pin")


def obj_get(path: str, flags: int = 0) -> int:
    """BPF_OBJ_GET: an fd on what is pinned at `path`."""
    attr = _attr()
    p = ctypes.create_string_buffer(os.fsencode(path) + b"\0")
    _put(attr, "<QII", 0, _addr(p), 0, flags)
    return _sys_bpf(BPF_OBJ_GET, attr, "obj_get")


def fd_object_kind(fd: int) -> str:
    """"prog", "map", "link" or "" for an fd, from /proc/self/fdinfo (works for any BPF object)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            text = f.read()
    except OSError:
        return ""
    for key, kind in (("link_type:", "link"), ("prog_type:", "prog"), ("map_type:", "map")):
        if f"\n{key}" in text or text.startswith(key):
            return kind
    return ""


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


def link_info(link_fd: int) -> LinkInfo:
    info = _get_info(link_fd, 64, "link_info")
    ltype, lid, prog_id = struct.unpack_from("<III", info, 0)
    ifindex, attach_type = struct.unpack_from("<II", info, 16)
    return LinkInfo(type=ltype, id=lid, prog_id=prog_id, ifindex=ifindex, attach_type=attach_type)


def link_get_fd_by_id(link_id: int) -> int:
    attr = _attr()
    _put(attr, "<I", 0, link_id)
    return _sys_bpf(BPF_LINK_GET_FD_BY_ID, attr, "link_get_fd_by_id")


def link_ids() -> list[int]:
    """The ids of every BPF link that exists now, system-wide (BPF_LINK_GET_NEXT_ID, as `bpftool link`
    lists them): attached, detached or severed links that something (an fd, a pin) still holds."""
    ids: list[int] = []
    start = 0
    while True:
        attr = _attr()
        _put(attr, "<I", 0, start)
        try:
            _sys_bpf(BPF_LINK_GET_NEXT_ID, attr, "link_get_next_id")
        except BpfError as exc:
            if exc.errno == _errno.ENOENT:
                return ids
            raise
        (start,) = struct.unpack_from("<I", attr, 4)
        ids.append(start)


def link_create_tcx(
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
    attr = _attr()
    _put(attr, "<IIIIIIQ", 0, prog_fd, ifindex, attach_type, flags, relative, 0, expected_revision)
    return _sys_bpf(BPF_LINK_CREATE, attr, "link_create")


def link_update(link_fd: int, new_prog_fd: int, *, old_prog_fd: int | None = None) -> None:
    """BPF_LINK_UPDATE; with old_prog_fd it is a compare-and-swap (EPERM when another program is there)."""
    attr = _attr()
    if old_prog_fd is None:
        _put(attr, "<III", 0, link_fd, new_prog_fd, 0)
        _sys_bpf(BPF_LINK_UPDATE, attr, "link_update")
    else:
        _put(attr, "<IIII", 0, link_fd, new_prog_fd, BPF_F_REPLACE, old_prog_fd)
        _sys_bpf(BPF_LINK_UPDATE, attr, "link_update_cas")


def link_detach(link_fd: int) -> None:
    """BPF_LINK_DETACH: detach now; the fd stays open (close it afterwards)."""
    attr = _attr()
    _put(attr, "<I", 0, link_fd)
    _sys_bpf(BPF_LINK_DETACH, attr, "link_detach")


def prog_attach(
    prog_fd: int,
    ifindex: int,
    attach_type: int,
    *,
    flags: int = 0,
    relative: int = 0,
    expected_revision: int = 0,
) -> None:
    """BPF_PROG_ATTACH (a tcx attachment without a link: it stays until detached explicitly)."""
    attr = _attr()
    _put(attr, "<IIIIIIQ", 0, ifindex, prog_fd, attach_type, flags, 0, relative, expected_revision)
    _sys_bpf(BPF_PROG_ATTACH, attr, "prog_attach")


def prog_detach(prog_fd: int, ifindex: int, attach_type: int) -> None:
    """BPF_PROG_DETACH of a program attached with prog_attach."""
    attr = _attr()
    _put(attr, "<IIII", 0, ifindex, prog_fd, attach_type, 0)
    _sys_bpf(BPF_PROG_DETACH, attr, "prog_detach")


@dataclass(frozen=True, slots=True)
class HookQuery:
    """BPF_PROG_QUERY's answer for a tcx hook: ids in run order (link_ids[i] = 0 without a link)."""

    revision: int
    prog_ids: tuple[int, ...]
    link_ids: tuple[int, ...]


def prog_query(ifindex: int, attach_type: int, *, capacity: int = 64) -> HookQuery:
    """BPF_PROG_QUERY of a tcx hook, retrying with a larger array on ENOSPC."""
    while True:
        prog_ids = (ctypes.c_uint32 * capacity)()
        link_ids = (ctypes.c_uint32 * capacity)()
        attr = _attr()
        _put(attr, "<IIII", 0, ifindex, attach_type, 0, 0)
        _put(attr, "<QI", 16, _addr(prog_ids), capacity)
        _put(attr, "<Q", 40, _addr(link_ids))
        try:
            _sys_bpf(BPF_PROG_QUERY, attr, "prog_query")
        except BpfError as exc:
            if exc.errno == _errno.ENOSPC:
                (count,) = struct.unpack_from("<I", attr, 24)
                capacity = max(count, capacity * 2)
                continue
            raise
        (count,) = struct.unpack_from("<I", attr, 24)
        (revision,) = struct.unpack_from("<Q", attr, 56)
        return HookQuery(
            revision=revision,
            prog_ids=tuple(prog_ids[:count]),
            link_ids=tuple(link_ids[:count]),
        )


def probe_tcx() -> tuple[bool, str]:
    """Whether this kernel has tcx: create a link on ifindex 0xffffffff; ENODEV means tcx exists.

    Returns (available, reason). Needs CAP_BPF to load the probe program; without it the answer says so.
    """
    try:
        fd = prog_load(BPF_PROG_TYPE_SCHED_CLS, asm.mov64_imm(0, 0) + asm.exit(), name="asynctc_probe")
    except BpfError as exc:
        if exc.errno in (_errno.EPERM, _errno.EACCES):
            return False, "cannot load BPF programs here (needs CAP_BPF and CAP_NET_ADMIN: run as root)"
        return False, f"cannot load a SCHED_CLS program: {exc.strerror}"
    try:
        try:
            lfd = link_create_tcx(fd, 0xFFFFFFFF, BPF_TCX_INGRESS)
        except BpfError as exc:
            if exc.errno == _errno.ENODEV:
                return True, "tcx links are supported (Linux >= 6.6)"
            if exc.errno == _errno.EPERM:
                return False, "creating tcx links needs CAP_NET_ADMIN (run as root)"
            return False, f"tcx links are not supported by this kernel (probe answered {exc.strerror})"
        os.close(lfd)  # pragma: no cover - no device has that ifindex
        return True, "tcx links are supported"
    finally:
        os.close(fd)

