"""The bpf(2) boundary of MockKernel: `MockSyscalls` answers raw `union bpf_attr` calls, `MockPins` is its bpffs.

`asynctc.lowlevel.bpf.Bpf` packs every call into a 128-byte `union bpf_attr` and hands it to a `Syscalls`;
`MockSyscalls` reads that attr (layouts: KERNEL.md "union bpf_attr layouts"), reads and writes the memory
its u64 fields point to (`ctypes.string_at` / `ctypes.memmove`, as the kernel's copy_from_user and
copy_to_user do) and answers with the kernel's result, or raises `BpfError(errno, op)` with the kernel's
errno, checked in the kernel's order (kernel/bpf/syscall.c, mprog.c, tcx.c, arraymap.c).

Objects are the MockKernel's: programs (simulated ones, and real ones known by id), array maps and tcx
links. Every fd handed out is a real fd number (a memfd of its own), so it never collides with a real fd;
`close` drops it, and the last reference (fds and pins) of an unpinned link detaches it.

Commands: MAP_CREATE (array maps), MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY,
PROG_LOAD (the constant "r0 = imm; exit" SCHED_CLS program, simulated), OBJ_PIN, OBJ_GET, PROG_ATTACH and
PROG_DETACH (tcx), PROG_TEST_RUN, PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY (tcx),
LINK_CREATE (tcx), LINK_UPDATE, LINK_GET_FD_BY_ID, LINK_GET_NEXT_ID, ENABLE_STATS, LINK_DETACH. Others:
EINVAL.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import hashlib
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, ClassVar, Literal, cast

from asynctc import Direction, PinError
from asynctc.lowlevel import bpf
from asynctc.lowlevel.bpf import BpfError
from asynctc.lowlevel.pins import Pins, check_path

if TYPE_CHECKING:
    import threading
    from collections import Counter

    from ._kernel import FileKind, MockKernel, Verdict, _Device, _File, _Hook, _Link, _Map, _Pin, _Prog

__all__ = ["BpfSyscallsMixin", "MockPins", "MockSyscalls"]

Attr = ctypes.Array[ctypes.c_char]

BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4
BPF_F_QUERY_EFFECTIVE = 1
ATTACH_MASK_MPROG = bpf.BPF_F_REPLACE | bpf.BPF_F_BEFORE | bpf.BPF_F_AFTER | bpf.BPF_F_ID | bpf.BPF_F_LINK
ETH_HLEN = 14

# sizes of the info structs the kernel writes (it writes min(info_len, size) and sets info_len to that)
PROG_INFO_SIZE = 232
MAP_INFO_SIZE = 88
LINK_INFO_SIZE = 64

# the verdicts of the simulated constant program, by the value it returns
_CONSTANT_VERDICTS = {0: "pass", 2: "drop", -1: "next"}
_VERDICT_RETVAL = {"pass": 0, "drop": 2, "next": -1}
_NAME_RE = re.compile(rb"[A-Za-z0-9_.]*")


def _err(err: int, op: str) -> BpfError:
    return BpfError(err, op)


def _read(addr: int, size: int, op: str) -> bytes:
    """copy_from_user: EFAULT for a NULL pointer."""
    if size == 0:
        return b""
    if addr == 0:
        raise _err(_errno.EFAULT, op)
    return ctypes.string_at(addr, size)


def _write(addr: int, data: bytes, op: str) -> None:
    """copy_to_user: EFAULT for a NULL pointer."""
    if not data:
        return
    if addr == 0:
        raise _err(_errno.EFAULT, op)
    ctypes.memmove(addr, data, len(data))


def _read_path(addr: int, op: str) -> str:
    if addr == 0:
        raise _err(_errno.EFAULT, op)
    raw = ctypes.string_at(addr)
    if len(raw) >= 4096:
        raise _err(_errno.ENAMETOOLONG, op)
    return raw.decode(errors="surrogateescape")


def _name(raw: bytes, op: str) -> str:
    """bpf_obj_name_cpy: up to 15 characters and a NUL, of [A-Za-z0-9_.]; EINVAL otherwise."""
    name = raw.split(b"\0", 1)[0]
    if len(name) >= bpf.BPF_OBJ_NAME_LEN or _NAME_RE.fullmatch(name) is None or b"\0" not in raw:
        raise _err(_errno.EINVAL, op)
    return name.decode()


class BpfSyscallsMixin:
    """MockKernel's bpf(2) side: the handlers of each command over the kernel's own state, and its bpffs.

    A base of MockKernel (its attributes and the helpers below the TYPE_CHECKING line are MockKernel's);
    reached through `MockSyscalls` and `MockPins`, which every caller uses."""

    if TYPE_CHECKING:
        _lock: threading.RLock
        _devices: dict[int, _Device]
        _progs: dict[int, _Prog]
        _links: dict[int, _Link]
        _maps: dict[int, _Map]
        _pins: dict[str, _Pin]
        _map_ids: Iterator[int]
        _sim_ids: Iterator[int]
        _link_ids: Iterator[int]
        calls: Counter[str]

        def _enter(self, op: str) -> None: ...
        def _delay(self, op: str) -> None: ...
        def _sweep_links(self) -> None: ...
        def _gc_progs(self) -> None: ...
        def _close_fd(self, fd: int) -> None: ...
        def _fdinfo(self, fd: int) -> str: ...
        def _new_fd(self, kind: FileKind, obj_id: int) -> int: ...
        def _file_or_ebadf(self, fd: int, op: str) -> _File | None: ...
        def _file(self, fd: int) -> _File | None: ...
        def _real_prog(self, fd: int, op: str) -> _Prog: ...
        def _prog_by_fd(self, fd: int, op: str, ptype: int = 0) -> _Prog: ...
        def _link_by_fd(self, fd: int, op: str) -> _Link: ...
        def _link_index(self, link: _Link) -> tuple[_Device, int] | None: ...
        def _detach_link_locked(self, link: _Link) -> None: ...
        def _maybe_destroy(self, link: _Link) -> None: ...
        def _maybe_destroy_map(self, m: _Map) -> None: ...
        def _hook_held(self, d: _Device, direction: Direction) -> bool: ...
        def _dev(self, dev: str | int, op: str) -> _Device: ...
        def _pin_table(self) -> dict[str, str]: ...
        def _mprog_attach(self, hook: _Hook, prog: _Prog, link_id: int, flags: int, id_or_fd: int,
                          revision: int, op: str, old_prog_id: int | None = None) -> None: ...
        def _tcx_link_update(self, link: _Link, new: _Prog, old_prog_id: int | None, op: str) -> None: ...
        def _mprog_detach(self, d: _Device, direction: Direction, prog: _Prog | None, flags: int,
                          id_or_fd: int, revision: int, op: str) -> None: ...

    _HANDLERS: ClassVar[dict[int, str]] = {
        bpf.BPF_MAP_CREATE: "_sys_map_create",
        bpf.BPF_MAP_LOOKUP_ELEM: "_sys_map_lookup",
        bpf.BPF_MAP_UPDATE_ELEM: "_sys_map_update",
        bpf.BPF_MAP_DELETE_ELEM: "_sys_map_delete",
        bpf.BPF_MAP_GET_NEXT_KEY: "_sys_map_get_next_key",
        bpf.BPF_PROG_LOAD: "_sys_prog_load",
        bpf.BPF_OBJ_PIN: "_sys_obj_pin",
        bpf.BPF_OBJ_GET: "_sys_obj_get",
        BPF_PROG_ATTACH: "_sys_prog_attach",
        BPF_PROG_DETACH: "_sys_prog_detach",
        bpf.BPF_PROG_TEST_RUN: "_sys_prog_test_run",
        bpf.BPF_PROG_GET_FD_BY_ID: "_sys_prog_get_fd_by_id",
        bpf.BPF_MAP_GET_FD_BY_ID: "_sys_map_get_fd_by_id",
        bpf.BPF_OBJ_GET_INFO_BY_FD: "_sys_obj_get_info_by_fd",
        bpf.BPF_PROG_QUERY: "_sys_prog_query",
        bpf.BPF_LINK_CREATE: "_sys_link_create",
        bpf.BPF_LINK_UPDATE: "_sys_link_update",
        bpf.BPF_LINK_GET_FD_BY_ID: "_sys_link_get_fd_by_id",
        bpf.BPF_LINK_GET_NEXT_ID: "_sys_link_get_next_id",
        bpf.BPF_ENABLE_STATS: "_sys_enable_stats",
        bpf.BPF_LINK_DETACH: "_sys_link_detach",
    }

    # -- the entry points (MockSyscalls calls them) ---------------------------------------------------------
    def syscall_bpf(self, cmd: int, attr: Attr, op: str) -> int:
        """bpf(cmd, attr): read the attr, answer as the kernel does (result, or BpfError(errno, op)). Takes
        the kernel lock; counted, delayed and faulted under `op` (see `MockKernel.inject_fault`)."""
        from ._kernel import KernelError

        if len(attr) < bpf.ATTR_SIZE:
            raise _err(_errno.EINVAL, op)
        with self._lock:
            try:
                self._enter(op)
                self._sweep_links()
                name = self._HANDLERS.get(cmd)
                if name is None:
                    raise _err(_errno.EINVAL, op)
                handler: Callable[[Attr, str], int] = getattr(self, name)
                return handler(attr, op)
            except KernelError as exc:
                raise BpfError(exc.errno or _errno.EIO, op) from None
            finally:
                self._gc_progs()

    def syscall_close(self, fd: int) -> None:
        """close(2) of an fd (see `_close_fd`): counted and delayed under "close" (closing an attached link's
        last fd is what waits on the real kernel), never faulted."""
        with self._lock:
            self._delay("close")
            self._close_fd(fd)

    def syscall_dup(self, fd: int) -> int:
        """dup(2) of an fd: a new fd on the same file (one of this kernel's, counted as one more reference),
        or on whatever else `fd` is (a real program's fd). Counted and delayed under "dup", never faulted."""
        with self._lock:
            self._delay("dup")
            self._file_or_ebadf(fd, "dup")
            new = os.dup(fd)
            self._file(new)  # counted now, not at its first use
            return new

    def syscall_fdinfo(self, fd: int) -> str:
        """/proc/self/fdinfo/FD as this kernel shows it."""
        return self._fdinfo(fd)

    # -- helpers --------------------------------------------------------------------------------------------
    def _sys_map_of(self, fd: int, op: str) -> _Map:
        from ._kernel import KernelError

        f = self._file_or_ebadf(fd, op)
        if f is None or f.kind != "map" or f.obj_id not in self._maps:
            raise KernelError(_errno.EINVAL, op, f"fd {fd} is not a map")
        return self._maps[f.obj_id]

    # -- maps -----------------------------------------------------------------------------------------------
    def _sys_map_create(self, attr: Attr, op: str) -> int:
        from ._kernel import _Map

        mtype, key_size, value_size, max_entries, flags = struct.unpack_from("=IIIII", attr, 0)
        inner_fd, numa = struct.unpack_from("=II", attr, 20)
        name = _name(attr.raw[28:44], op)
        if mtype != bpf.BPF_MAP_TYPE_ARRAY:
            raise _err(_errno.EINVAL, op)  # the mock creates array maps only
        if key_size != 4 or value_size == 0 or max_entries == 0 or flags or inner_fd or numa:
            raise _err(_errno.EINVAL, op)
        if value_size > (1 << 20) or value_size * max_entries > (1 << 28):
            raise _err(_errno.E2BIG, op)
        m = _Map(next(self._map_ids), mtype, key_size, value_size, max_entries, flags, name,
                 bytearray(value_size * max_entries))
        self._maps[m.id] = m
        return self._new_fd("map", m.id)

    @staticmethod
    def _sys_elem(attr: Attr) -> tuple[int, int, int, int]:
        map_fd, _pad, key, value, flags = struct.unpack_from("=IIQQQ", attr, 0)
        return map_fd, key, value, flags

    def _sys_index(self, m: _Map, key_addr: int, op: str) -> int:
        return int(struct.unpack("=I", _read(key_addr, m.key_size, op))[0])

    def _sys_map_lookup(self, attr: Attr, op: str) -> int:
        map_fd, key, value, flags = self._sys_elem(attr)
        m = self._sys_map_of(map_fd, op)
        if flags:
            raise _err(_errno.EINVAL, op)  # BPF_F_LOCK needs a spin lock in the value
        i = self._sys_index(m, key, op)
        if i >= m.max_entries:
            raise _err(_errno.ENOENT, op)
        _write(value, bytes(m.data[i * m.value_size:(i + 1) * m.value_size]), op)
        return 0

    def _sys_map_update(self, attr: Attr, op: str) -> int:
        map_fd, key, value, flags = self._sys_elem(attr)
        m = self._sys_map_of(map_fd, op)
        i = self._sys_index(m, key, op)
        data = _read(value, m.value_size, op)
        if flags & ~4 > bpf.BPF_EXIST:
            raise _err(_errno.EINVAL, op)
        if i >= m.max_entries:
            raise _err(_errno.E2BIG, op)
        if flags & bpf.BPF_NOEXIST:
            raise _err(_errno.EEXIST, op)  # every element of an array exists
        if flags & 4:
            raise _err(_errno.EINVAL, op)  # BPF_F_LOCK without a spin lock
        m.data[i * m.value_size:(i + 1) * m.value_size] = data
        return 0

    def _sys_map_delete(self, attr: Attr, op: str) -> int:
        map_fd, key, _value, _flags = self._sys_elem(attr)
        m = self._sys_map_of(map_fd, op)
        self._sys_index(m, key, op)
        raise _err(_errno.EINVAL, op)  # array elements cannot be deleted

    def _sys_map_get_next_key(self, attr: Attr, op: str) -> int:
        map_fd, key, nxt, _flags = self._sys_elem(attr)
        m = self._sys_map_of(map_fd, op)
        i = self._sys_index(m, key, op) if key else 0xFFFF_FFFF
        if i >= m.max_entries:
            _write(nxt, struct.pack("=I", 0), op)
            return 0
        if i == m.max_entries - 1:
            raise _err(_errno.ENOENT, op)
        _write(nxt, struct.pack("=I", i + 1), op)
        return 0

    def _fd_by_id(self, kind: FileKind, objects: Mapping[int, object], attr: Attr, op: str) -> int:
        """BPF_{MAP,LINK}_GET_FD_BY_ID: a new fd on the object whose id is at attr@0, ENOENT if none."""
        (obj_id,) = struct.unpack_from("=I", attr, 0)
        if obj_id not in objects:
            raise _err(_errno.ENOENT, op)
        return self._new_fd(kind, obj_id)

    def _sys_map_get_fd_by_id(self, attr: Attr, op: str) -> int:
        return self._fd_by_id("map", self._maps, attr, op)

    # -- programs -------------------------------------------------------------------------------------------
    def _sys_prog_load(self, attr: Attr, op: str) -> int:
        from ._kernel import _Prog

        ptype, insn_cnt, insns_addr, _license = struct.unpack_from("=IIQQ", attr, 0)
        log_level, log_size, log_buf = struct.unpack_from("=IIQ", attr, 24)
        name = _name(attr.raw[48:64], op)
        prog_ifindex, _expected = struct.unpack_from("=II", attr, 64)

        def refuse(message: str) -> BpfError:
            if log_level and log_size and log_buf:
                text = (message + "\n").encode()[: log_size - 1] + b"\0"
                _write(log_buf, text, op)
            return BpfError(_errno.EINVAL, op, message)

        if insn_cnt == 0 or insn_cnt > 1_000_000:
            raise _err(_errno.E2BIG if insn_cnt else _errno.EINVAL, op)
        insns = _read(insns_addr, insn_cnt * 8, op)
        if ptype != bpf.BPF_PROG_TYPE_SCHED_CLS:
            raise refuse(f"MockKernel simulates SCHED_CLS programs only (type {bpf.BPF_PROG_TYPE_SCHED_CLS}), "
                         f"not type {ptype}")
        imm = None
        if insn_cnt == 2 and insns[8:] == bpf.asm.exit():
            code, regs, off, value = struct.unpack("=BBhi", insns[:8])
            if code in (0xB7, 0xB4) and regs == 0 and off == 0:  # r0 = imm (64 or 32 bit mov)
                imm = value
        if imm is None:
            raise refuse("MockKernel simulates only the constant program \"r0 = imm; exit\" (2 instructions); "
                         "load other programs on a real kernel")
        verdict = _CONSTANT_VERDICTS.get(imm)
        if verdict is None:
            raise refuse(f"the constant program returns {imm}; MockKernel simulates 0 (pass), 2 (drop) and "
                         "-1 (next) only")
        offloadable = True
        if prog_ifindex:
            d = self._devices.get(prog_ifindex)
            if d is None or not d.offload:
                raise refuse(f"device {prog_ifindex} cannot run device-bound (offloaded) programs")
        pid = next(self._sim_ids)
        # the kernel's tag: the first 8 bytes of the instructions' SHA-256 (Linux 6.18; older kernels used
        # SHA-1); this program has no map fds to blank out
        tag = hashlib.sha256(insns).hexdigest()[:16]
        self._progs[pid] = _Prog(pid, name, tag, ptype, cast("Verdict", verdict), None, offloadable)
        return self._new_fd("prog", pid)

    def _sys_prog_get_fd_by_id(self, attr: Attr, op: str) -> int:
        (prog_id,) = struct.unpack_from("=I", attr, 0)
        rec = self._progs.get(prog_id)
        if rec is None or (rec.verdict is None and rec.real_fd is None):
            raise _err(_errno.ENOENT, op)
        return self._new_fd("prog", prog_id)

    def _sys_prog_test_run(self, attr: Attr, op: str) -> int:
        (prog_fd,) = struct.unpack_from("=I", attr, 0)
        rec = self._prog_by_fd(prog_fd, op)
        if rec.verdict is None:
            assert rec.real_fd is not None  # a registered real program is held while it is used
            real = ctypes.create_string_buffer(attr.raw, bpf.ATTR_SIZE)
            struct.pack_into("=I", real, 0, rec.real_fd)
            bpf.LINUX.syscalls.bpf(bpf.BPF_PROG_TEST_RUN, real, op)
            ctypes.memmove(ctypes.addressof(attr) + 4, ctypes.addressof(real) + 4, bpf.ATTR_SIZE - 4)
            return 0
        size_in, size_out, data_in, data_out, _repeat = struct.unpack_from("=IIQQI", attr, 8)
        if rec.type == bpf.BPF_PROG_TYPE_SCHED_CLS and size_in < ETH_HLEN:
            raise _err(_errno.EINVAL, op)
        data = _read(data_in, size_in, op)
        err = 0
        if data_out:
            n = len(data)
            if size_out and size_out < n:
                n, err = size_out, _errno.ENOSPC
            _write(data_out, data[:n], op)
        struct.pack_into("=iI", attr, 4, _VERDICT_RETVAL[rec.verdict], len(data))
        struct.pack_into("=I", attr, 36, 0)  # duration
        if err:
            raise _err(err, op)
        return 0

    def _sys_enable_stats(self, attr: Attr, op: str) -> int:
        (stats_type,) = struct.unpack_from("=I", attr, 0)
        if stats_type != bpf.BPF_STATS_RUN_TIME:
            raise _err(_errno.EINVAL, op)
        return self._new_fd("stats", 0)

    # -- pins -----------------------------------------------------------------------------------------------
    def _sys_obj_pin(self, attr: Attr, op: str) -> int:
        from ._kernel import _Pin

        path_addr, fd, file_flags = struct.unpack_from("=QII", attr, 0)
        if file_flags:
            raise _err(_errno.EINVAL, op)  # (BPF_F_PATH_FD, a directory fd, is not modelled)
        path = _read_path(path_addr, op)
        f = self._file_or_ebadf(fd, op)
        if f is None:
            kind, obj_id = "prog", self._real_prog(fd, op).id
        elif f.kind == "stats":
            raise _err(_errno.EINVAL, op)
        else:
            kind, obj_id = f.kind, f.obj_id
        self._bpffs_check_new(path, op)
        self._pins[path] = _Pin(cast("Literal['link', 'prog', 'map']", kind), link_id=obj_id)
        if kind == "link":
            self._links[obj_id].pins.add(path)
        elif kind == "map":
            self._maps[obj_id].pins.add(path)
        else:
            self._progs[obj_id].pins.add(path)
        return 0

    def _sys_obj_get(self, attr: Attr, op: str) -> int:
        path_addr, fd, file_flags = struct.unpack_from("=QII", attr, 0)
        if fd or file_flags & ~(BPF_F_RDONLY | BPF_F_WRONLY) or file_flags == BPF_F_RDONLY | BPF_F_WRONLY:
            raise _err(_errno.EINVAL, op)
        path = _read_path(path_addr, op)
        pin = self._bpffs_lookup(path, op)
        if pin.kind == "filter":
            raise _err(_errno.EACCES, op)  # not a bpffs object
        return self._new_fd(pin.kind, pin.link_id)

    # -- info -----------------------------------------------------------------------------------------------
    def _sys_obj_get_info_by_fd(self, attr: Attr, op: str) -> int:
        fd, info_len, info_addr = struct.unpack_from("=IIQ", attr, 0)
        f = self._file_or_ebadf(fd, op)
        if f is None:
            rec = self._real_prog(fd, op)
            assert rec.real_fd is not None
            real = ctypes.create_string_buffer(attr.raw, bpf.ATTR_SIZE)
            struct.pack_into("=I", real, 0, rec.real_fd)
            bpf.LINUX.syscalls.bpf(bpf.BPF_OBJ_GET_INFO_BY_FD, real, op)
            struct.pack_into("=I", attr, 4, struct.unpack_from("=I", real, 4)[0])
            return 0
        if f.kind == "prog":
            p = self._progs[f.obj_id]
            if p.verdict is None and p.real_fd is not None:  # a real program: the real kernel's own answer
                real = ctypes.create_string_buffer(attr.raw, bpf.ATTR_SIZE)
                struct.pack_into("=I", real, 0, p.real_fd)
                bpf.LINUX.syscalls.bpf(bpf.BPF_OBJ_GET_INFO_BY_FD, real, op)
                struct.pack_into("=I", attr, 4, struct.unpack_from("=I", real, 4)[0])
                return 0
            info = bytearray(PROG_INFO_SIZE)
            struct.pack_into("=II", info, 0, p.type, p.id)
            info[8:16] = bytes.fromhex(p.tag)
            info[64:64 + len(p.name)] = p.name.encode()
            struct.pack_into("=I", info, 84, 1)  # gpl_compatible
            struct.pack_into("=QQ", info, 192, 0, p.count)  # run_time_ns, run_cnt
        elif f.kind == "map":
            m = self._sys_map_of(fd, op)
            info = bytearray(MAP_INFO_SIZE)
            struct.pack_into("=IIIIII", info, 0, m.type, m.id, m.key_size, m.value_size, m.max_entries, m.flags)
            info[24:24 + len(m.name)] = m.name.encode()
        elif f.kind == "link":
            link = self._links[f.obj_id]
            info = bytearray(LINK_INFO_SIZE)
            struct.pack_into("=III", info, 0, bpf.BPF_LINK_TYPE_TCX, link.id, link.prog_id)
            struct.pack_into("=II", info, 16, link.ifindex, link.attach_type)
        else:
            raise _err(_errno.EINVAL, op)
        n = min(info_len, len(info))
        if info_len > len(info) and any(_read(info_addr + len(info), info_len - len(info), op)):
            raise _err(_errno.E2BIG, op)  # bpf_check_uarg_tail_zero
        _write(info_addr, bytes(info[:n]), op)
        struct.pack_into("=I", attr, 4, n)
        return 0

    # -- tcx ------------------------------------------------------------------------------------------------
    @staticmethod
    def _sys_direction(attach_type: int, op: str) -> Direction:
        if attach_type == bpf.BPF_TCX_INGRESS:
            return Direction.INGRESS
        if attach_type == bpf.BPF_TCX_EGRESS:
            return Direction.EGRESS
        raise _err(_errno.EINVAL, op)  # the mock models tcx hooks only

    def _sys_prog_query(self, attr: Attr, op: str) -> int:
        from ._kernel import KernelError

        ifindex, attach_type, query_flags, attach_flags, prog_ids, count = struct.unpack_from("=IIIIQI", attr, 0)
        prog_flags_addr, link_ids, link_flags_addr = struct.unpack_from("=QQQ", attr, 32)
        if query_flags & ~BPF_F_QUERY_EFFECTIVE:
            raise _err(_errno.EINVAL, op)
        direction = self._sys_direction(attach_type, op)
        d = self._devices.get(ifindex)
        if d is None:
            raise KernelError(_errno.ENODEV, op, f"no device with ifindex {ifindex}")
        if query_flags or attach_flags:
            raise _err(_errno.EINVAL, op)
        hook = d.hooks[direction]
        total = len(hook.entries)
        struct.pack_into("=I", attr, 12, 0)
        struct.pack_into("=Q", attr, 56, hook.revision)
        struct.pack_into("=I", attr, 24, total)
        if count == 0 or not prog_ids or not total:
            return 0
        n = min(count, total)
        for i, e in enumerate(hook.entries[:n]):
            _write(prog_ids + 4 * i, struct.pack("=I", e.prog_id), op)
            if prog_flags_addr:
                _write(prog_flags_addr + 4 * i, bytes(4), op)
            if link_ids:
                _write(link_ids + 4 * i, struct.pack("=I", e.link_id), op)
            if link_flags_addr:
                _write(link_flags_addr + 4 * i, bytes(4), op)
        if count < total:
            raise _err(_errno.ENOSPC, op)
        return 0

    def _sys_link_create(self, attr: Attr, op: str) -> int:
        from ._kernel import _PROCESS, KernelError, _Link

        prog_fd, ifindex, attach_type, flags, relative, _pad, revision = struct.unpack_from("=IIIIIIQ", attr, 0)
        prog = self._prog_by_fd(prog_fd, op)
        if prog.type != bpf.BPF_PROG_TYPE_SCHED_CLS:
            raise _err(_errno.EINVAL, op)
        direction = self._sys_direction(attach_type, op)
        d = self._devices.get(ifindex)
        if d is None:
            raise KernelError(_errno.ENODEV, op, f"no device with ifindex {ifindex}")
        link_id = next(self._link_ids)  # bpf_link_prime gives the id before the attach is tried
        self._mprog_attach(d.hooks[direction], prog, link_id, flags, relative, revision, op)
        link = _Link(link_id, prog.id, d.ifindex, direction, _PROCESS.get(), holders=0)
        self._links[link_id] = link
        return self._new_fd("link", link_id)

    def _sys_link_update(self, attr: Attr, op: str) -> int:
        link_fd, new_fd, flags, old_fd = struct.unpack_from("=IIII", attr, 0)
        if flags & ~bpf.BPF_F_REPLACE:
            raise _err(_errno.EINVAL, op)
        link = self._link_by_fd(link_fd, op)
        new = self._prog_by_fd(new_fd, op)
        old: _Prog | None = None
        if flags & bpf.BPF_F_REPLACE:
            old = self._prog_by_fd(old_fd, op)
        elif old_fd:
            raise _err(_errno.EINVAL, op)
        self._tcx_link_update(link, new, old.id if old is not None else None, op)
        return 0

    def _sys_link_detach(self, attr: Attr, op: str) -> int:
        (link_fd,) = struct.unpack_from("=I", attr, 0)
        link = self._link_by_fd(link_fd, op)
        self._detach_link_locked(link)
        return 0

    def _sys_link_get_fd_by_id(self, attr: Attr, op: str) -> int:
        return self._fd_by_id("link", self._links, attr, op)

    def _sys_link_get_next_id(self, attr: Attr, op: str) -> int:
        (start,) = struct.unpack_from("=I", attr, 0)
        later = [i for i in self._links if i > start]
        if not later:
            raise _err(_errno.ENOENT, op)
        struct.pack_into("=I", attr, 4, min(later))
        return 0

    def _sys_tcx_attach_args(self, attr: Attr, op: str) -> tuple[int, Direction, int, int, int, int, int]:
        ifindex, prog_fd, attach_type, flags, replace_fd, relative = struct.unpack_from("=IIIIII", attr, 0)
        (revision,) = struct.unpack_from("=Q", attr, 24)
        direction = self._sys_direction(attach_type, op)
        if flags & ~ATTACH_MASK_MPROG:
            raise _err(_errno.EINVAL, op)
        return ifindex, direction, prog_fd, flags, replace_fd, relative, revision

    def _sys_prog_attach(self, attr: Attr, op: str) -> int:
        ifindex, direction, prog_fd, flags, replace_fd, relative, revision = self._sys_tcx_attach_args(attr, op)
        prog = self._prog_by_fd(prog_fd, op, bpf.BPF_PROG_TYPE_SCHED_CLS)
        d = self._dev(ifindex, op)
        old: _Prog | None = None
        if flags & bpf.BPF_F_REPLACE:
            old = self._prog_by_fd(replace_fd, op, prog.type)
        self._mprog_attach(d.hooks[direction], prog, 0, flags, relative, revision, op,
                        old_prog_id=old.id if old is not None else None)
        return 0

    def _sys_prog_detach(self, attr: Attr, op: str) -> int:
        from ._kernel import KernelError

        ifindex, direction, prog_fd, flags, _replace, relative, revision = self._sys_tcx_attach_args(attr, op)
        prog = self._prog_by_fd(prog_fd, op, bpf.BPF_PROG_TYPE_SCHED_CLS) if prog_fd else None
        d = self._dev(ifindex, op)
        if not d.hooks[direction].entries and not self._hook_held(d, direction):
            raise KernelError(_errno.ENOENT, op, "nothing is attached there")
        self._mprog_detach(d, direction, prog, flags, relative, revision, op)
        return 0

    # -- the kernel's side (kernel lock held) ---------------------------------------------------------------
    def _bpffs_parent_is_pin(self, path: str) -> bool:
        parts = path.split("/")
        return any("/".join(parts[:i]) in self._pins for i in range(2, len(parts)))

    def _bpffs_check_new(self, path: str, op: str) -> None:
        """May a pin be made at `path`? (BPF_OBJ_PIN's checks on the name.)"""
        if not path.startswith("/"):
            raise _err(_errno.EPERM, op)  # not on bpffs
        name = path.rsplit("/", 1)[1]
        if not name or "." in name:
            raise _err(_errno.EPERM, op)
        if self._bpffs_parent_is_pin(path):
            raise _err(_errno.ENOTDIR, op)
        if path in self._pins:
            raise _err(_errno.EEXIST, op)

    def _bpffs_lookup(self, path: str, op: str) -> _Pin:
        if self._bpffs_parent_is_pin(path):
            raise _err(_errno.ENOTDIR, op)
        pin = self._pins.get(path)
        if pin is None:
            raise _err(_errno.ENOENT, op)
        return pin

    def _bpffs_remove(self, path: str) -> bool:
        pin = self._pins.pop(path, None)
        if pin is None:
            return False
        if pin.kind == "link":
            link = self._links.get(pin.link_id)
            if link is not None:
                link.pins.discard(path)
                self._maybe_destroy(link)
        elif pin.kind == "map":
            m = self._maps.get(pin.link_id)
            if m is not None:
                m.pins.discard(path)
                self._maybe_destroy_map(m)
        elif pin.kind == "prog":
            rec = self._progs.get(pin.link_id)
            if rec is not None:
                rec.pins.discard(path)
            self._gc_progs()
        return True

    def _bpffs_rename(self, src: str, dst: str) -> None:
        pin = self._pins[src]
        if dst in self._pins:
            self._bpffs_remove(dst)
        del self._pins[src]
        self._pins[dst] = pin
        holder = (self._links.get(pin.link_id) if pin.kind == "link" else
                  self._maps.get(pin.link_id) if pin.kind == "map" else
                  self._progs.get(pin.link_id) if pin.kind == "prog" else None)
        if holder is not None:
            holder.pins.discard(src)
            holder.pins.add(dst)

    # -- the Pins entry points (MockPins calls them) --------------------------------------------------------
    def bpffs_unpin(self, path: str) -> bool:
        """Remove the pin at `path` (checked); False if nothing is there. Faulted under "obj_unpin"."""
        from ._kernel import KernelError

        with self._lock:
            try:
                self._enter("obj_unpin")
            except KernelError as exc:
                raise PinError(f"cannot unpin {path}: {exc.strerror}", errno=exc.errno) from None
            return self._bpffs_remove(path)

    def bpffs_pin_over(self, bpf_calls: bpf.Bpf, obj_fd: int, path: str, tmp: str) -> None:
        """Pin `obj_fd` at `tmp` (BPF_OBJ_PIN through `bpf_calls`, faulted under "obj_pin") and rename it over
        `path`, in one critical section: `path` names the old object or the new one at every instant."""
        with self._lock:
            self._bpffs_remove(tmp)
            bpf_calls.obj_pin(obj_fd, tmp)
            self._bpffs_rename(tmp, path)

    def bpffs_rename_over(self, src: str, dst: str) -> bool:
        """Rename the pin at `src` over `dst`; False if nothing is at `src`."""
        with self._lock:
            if src not in self._pins:
                return False
            self._bpffs_rename(src, dst)
            return True

    def bpffs_table(self) -> dict[str, str]:
        """{path: what} of every pin."""
        return self._pin_table()


class MockSyscalls(bpf.Syscalls):
    """bpf(2), close(2) and fdinfo answered by a MockKernel (see the module docstring and
    `BpfSyscallsMixin.syscall_bpf`)."""

    def __init__(self, kernel: MockKernel) -> None:
        self.kernel = kernel

    def bpf(self, cmd: int, attr: Attr, op: str) -> int:
        return self.kernel.syscall_bpf(cmd, attr, op)

    def close(self, fd: int) -> None:
        self.kernel.syscall_close(fd)

    def fdinfo(self, fd: int) -> str:
        return self.kernel.syscall_fdinfo(fd)

    def dup(self, fd: int) -> int:
        return self.kernel.syscall_dup(fd)


def _checked_pin_path(path: str, suffix: str = "") -> str:
    """check_path's lexical rules, and bpffs's: a name with a dot is refused (PinError EPERM)."""
    path = check_path(path)
    name = path.rsplit("/", 1)[1] + suffix
    if "." in name:
        raise PinError(f"cannot use the pin path {path + suffix!r}: bpffs refuses names with a dot; pick a name "
                       "without one", errno=_errno.EPERM)
    return path


class MockPins(Pins):
    """The bpffs of a MockKernel, in memory: path -> pinned object, at any absolute path (nothing touches the
    real filesystem). The same lexical rules as the real pins (`asynctc.lowlevel.pins.check_path`:
    ValueError or TypeError; a name with a dot: PinError EPERM, as bpffs refuses it) and the kernel's
    errnos (BpfError: EEXIST for a taken name, ENOENT for nothing there, ENOTDIR when a directory of the
    path is a pin). A pin holds a reference on its object: a pinned link survives the close of every fd.

    Calling it (`kernel.pins()`) gives {path: what} of every pin ("link N", "prog N", "map N", "filter ...").
    """

    def __init__(self, kernel: MockKernel) -> None:
        super().__init__(kernel.bpf)
        self.kernel = kernel

    def __call__(self) -> dict[str, str]:
        return self.kernel.bpffs_table()

    def pin_object(self, obj_fd: int, path: str) -> None:
        self.bpf.obj_pin(obj_fd, _checked_pin_path(path))

    def get_object(self, path: str) -> int:
        return self.bpf.obj_get(_checked_pin_path(path))

    def unpin(self, path: str) -> bool:
        return self.kernel.bpffs_unpin(_checked_pin_path(path))

    def pin_over(self, obj_fd: int, path: str, suffix: str) -> None:
        path = _checked_pin_path(path, suffix)
        self.kernel.bpffs_pin_over(self.bpf, obj_fd, path, path + suffix)

    def rename_over(self, path: str, suffix: str) -> bool:
        path = _checked_pin_path(path, suffix)
        return self.kernel.bpffs_rename_over(path + suffix, path)
