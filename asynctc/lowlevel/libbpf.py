"""The system's libbpf (libbpf.so.1) through ctypes: open, configure and load compiled BPF objects.

A thin binding of the few calls asynctc needs to turn a clang-compiled ELF object into loaded programs
and maps: `bpf_object__open_file` (with `bpf_object_open_opts`, its `sz` set), the walk of its programs
and maps, `bpf_program__set_type` (libbpf 1.1 does not know the `tcx/...` sections), a verifier log
buffer per program (`bpf_program__set_log_buf`), `bpf_object__load` and `bpf_object__close`. Attaching
stays asynctc's own (bpf(2) and rtnetlink): nothing here attaches anything.

Plain synchronous functions with no trio in them: opening parses the ELF file and loading runs the
verifier (milliseconds to seconds), so asynctc calls them from worker threads (`asynctc.open_object`).
The library itself is loaded on first use (`library()`), which also belongs in a worker thread.

libbpf reports through a process-wide print callback; this module installs its own on load: libbpf's
warnings during a call are kept (per thread) and put into the error that call raises, and everything
libbpf says goes to the `asynctc.libbpf` logger at DEBUG level, never to stderr. Another user of libbpf
in the same process that installs its own callback replaces this one (then the errors lose libbpf's words).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LIBBPF_PACKAGE",
    "Libbpf",
    "LibbpfError",
    "LibbpfUnavailable",
    "MapSpec",
    "ObjectHandle",
    "ProgramSpec",
    "capture_warnings",
    "library",
]

LIBBPF_SONAME = "libbpf.so.1"
LIBBPF_PACKAGE = "libbpf1 (Debian, Ubuntu; `apt-get install libbpf1`), libbpf (Fedora, Arch, Alpine)"

# enum libbpf_print_level
LIBBPF_WARN = 0
LIBBPF_INFO = 1
LIBBPF_DEBUG = 2

# The first libbpf release that has each symbol this binding uses (its libbpf.map version node).
# libbpf.so.1 is libbpf >= 1.0, which has them all; the table makes a stripped or odd build fail with a
# message that names what is missing instead of an AttributeError.
MIN_VERSION: dict[str, tuple[int, int]] = {
    "libbpf_major_version": (0, 6),
    "libbpf_minor_version": (0, 6),
    "libbpf_version_string": (0, 6),
    "libbpf_set_print": (0, 0),
    "libbpf_strerror": (0, 0),
    "bpf_object__open_file": (0, 0),
    "bpf_object__load": (0, 0),
    "bpf_object__close": (0, 0),
    "bpf_object__next_program": (0, 7),
    "bpf_object__next_map": (0, 7),
    "bpf_program__name": (0, 0),
    "bpf_program__section_name": (0, 2),
    "bpf_program__type": (0, 0),
    "bpf_program__set_type": (0, 0),
    "bpf_program__autoload": (0, 1),
    "bpf_program__fd": (0, 0),
    "bpf_program__set_log_buf": (0, 8),
    "bpf_map__name": (0, 0),
    "bpf_map__type": (0, 0),
    "bpf_map__key_size": (0, 0),
    "bpf_map__value_size": (0, 0),
    "bpf_map__max_entries": (0, 0),
    "bpf_map__fd": (0, 0),
    "bpf_map__pin_path": (0, 0),
    "bpf_map__is_pinned": (0, 0),
    "bpf_map__is_internal": (0, 0),
}

# Verifier log buffer per program, used only when a load fails (libbpf then retries with log level 1).
# The kernel keeps the END of the log when it does not fit (Linux >= 6.4), which is the part that matters.
VERIFIER_LOG_SIZE = 1 << 20

_log = logging.getLogger("asynctc.libbpf")
_LOAD_FAILED = re.compile(r"prog '([^']+)': (?:BPF program load failed|failed to load)")


class LibbpfUnavailable(OSError):
    """libbpf.so.1 cannot be loaded here, or it lacks a call asynctc needs. The message names the package."""


class LibbpfError(OSError):
    """A failed libbpf call. `op` names it ("open", "load"); `messages` holds libbpf's own warnings;
    after a refused load, `program` names the program the kernel refused and `verifier_log` is its log."""

    def __init__(
        self,
        err: int,
        op: str,
        detail: str,
        messages: tuple[str, ...] = (),
        *,
        program: str | None = None,
        verifier_log: str = "",
    ) -> None:
        super().__init__(err, detail)
        self.op = op
        self.messages = messages
        self.program = program
        self.verifier_log = verifier_log

    def __str__(self) -> str:
        return f"libbpf {self.op}: [Errno {self.errno}] {self.strerror}"


class _OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts as libbpf 1.1 declares it (`sz` says how much of it we know)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_removed_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_char_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
_libc.vsnprintf.restype = ctypes.c_int

_captured = threading.local()


def _on_print(level: int, fmt: bytes | None, args: int | None) -> int:
    """libbpf's print callback: format the message, keep warnings for the current call, log everything."""
    try:
        capture: list[str] | None = getattr(_captured, "messages", None)
        wanted = capture is not None and level == LIBBPF_WARN
        if not wanted and not _log.isEnabledFor(logging.DEBUG):
            return 0
        buf = ctypes.create_string_buffer(4096)
        # va_list is an array type on x86_64 and aarch64: it reaches us (and goes on) as a pointer.
        _libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip("\n")
        if wanted and capture is not None:
            capture.append(text)
        _log.debug("%s", text)
    except Exception:  # pragma: no cover - nothing may escape into C
        return 0
    return 0


_print_callback = _PRINT_FN(_on_print)  # kept alive for the life of the process


@contextmanager
def capture_warnings() -> Iterator[list[str]]:
    """Collect libbpf's warnings printed by this thread inside the block (nested blocks share one list)."""
    outer: list[str] | None = getattr(_captured, "messages", None)
    messages: list[str] = outer if outer is not None else []
    _captured.messages = messages
    try:
        yield messages
    finally:
        _captured.messages = outer


class Libbpf:
    """The loaded libbpf.so.1: its version and its calls, each bound with argument and result types."""

    def __init__(self, cdll: ctypes.CDLL, path: str) -> None:
        self._cdll = cdll
        self.path = path
        try:
            major = int(self._fn("libbpf_major_version", ctypes.c_uint32, [])())
            minor = int(self._fn("libbpf_minor_version", ctypes.c_uint32, [])())
        except LibbpfUnavailable:
            raise LibbpfUnavailable(
                f"{path} is older than libbpf 0.6 (it has no version call); asynctc needs libbpf >= 1.0: "
                f"install {LIBBPF_PACKAGE}"
            ) from None
        self.version: tuple[int, int] = (major, minor)
        if self.version < (1, 0):
            raise LibbpfUnavailable(
                f"{path} is libbpf {major}.{minor}; asynctc needs libbpf >= 1.0: install {LIBBPF_PACKAGE}"
            )
        vp, c_int, c_bool, c_u32, c_char_p = (
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_bool,
            ctypes.c_uint32,
            ctypes.c_char_p,
        )
        self.set_print = self._fn("libbpf_set_print", vp, [_PRINT_FN])
        self.strerror_ = self._fn("libbpf_strerror", c_int, [c_int, c_char_p, ctypes.c_size_t])
        self.object_open_file = self._fn("bpf_object__open_file", vp, [c_char_p, ctypes.POINTER(_OpenOpts)])
        self.object_load = self._fn("bpf_object__load", c_int, [vp])
        self.object_close = self._fn("bpf_object__close", None, [vp])
        self.next_program = self._fn("bpf_object__next_program", vp, [vp, vp])
        self.next_map = self._fn("bpf_object__next_map", vp, [vp, vp])
        self.program_name = self._fn("bpf_program__name", c_char_p, [vp])
        self.program_section = self._fn("bpf_program__section_name", c_char_p, [vp])
        self.program_type = self._fn("bpf_program__type", c_int, [vp])
        self.program_set_type = self._fn("bpf_program__set_type", c_int, [vp, c_int])
        self.program_autoload = self._fn("bpf_program__autoload", c_bool, [vp])
        self.program_fd = self._fn("bpf_program__fd", c_int, [vp])
        self.program_set_log_buf = self._fn("bpf_program__set_log_buf", c_int, [vp, vp, ctypes.c_size_t])
        self.map_name = self._fn("bpf_map__name", c_char_p, [vp])
        self.map_type = self._fn("bpf_map__type", c_int, [vp])
        self.map_key_size = self._fn("bpf_map__key_size", c_u32, [vp])
        self.map_value_size = self._fn("bpf_map__value_size", c_u32, [vp])
        self.map_max_entries = self._fn("bpf_map__max_entries", c_u32, [vp])
        self.map_fd = self._fn("bpf_map__fd", c_int, [vp])
        self.map_pin_path = self._fn("bpf_map__pin_path", c_char_p, [vp])
        self.map_is_pinned = self._fn("bpf_map__is_pinned", c_bool, [vp])
        self.map_is_internal = self._fn("bpf_map__is_internal", c_bool, [vp])
        self.set_print(_print_callback)

    def _fn(self, name: str, restype: Any, argtypes: list[Any]) -> Callable[..., Any]:
        try:
            fn = getattr(self._cdll, name)
        except AttributeError:
            need = MIN_VERSION.get(name, (1, 0))
            have = getattr(self, "version", None)
            have_s = f"libbpf {have[0]}.{have[1]}" if have else "this libbpf"
            raise LibbpfUnavailable(
                f"{have_s} ({self.path}) has no {name}, which asynctc needs (libbpf >= {need[0]}.{need[1]}); "
                f"install a newer {LIBBPF_PACKAGE}"
            ) from None
        fn.restype = restype
        fn.argtypes = argtypes
        return fn  # type: ignore[no-any-return]

    @property
    def version_string(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    def strerror(self, err: int) -> str:
        """libbpf's words for an errno, including its own codes (4000 and up: bad ELF, relocation...)."""
        buf = ctypes.create_string_buffer(256)
        self.strerror_(err, buf, len(buf))
        return buf.value.decode(errors="replace") or os.strerror(err)


_lib: Libbpf | None = None
_lib_lock = threading.Lock()


def library() -> Libbpf:
    """The system's libbpf.so.1, loaded on first use (a dlopen: call it from a worker thread).

    Raises:
        LibbpfUnavailable: no libbpf.so.1 on this machine, or one too old; the message names the package.
    """
    global _lib
    with _lib_lock:
        if _lib is None:
            try:
                cdll = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
            except OSError as exc:
                raise LibbpfUnavailable(
                    f"cannot load {LIBBPF_SONAME} ({exc}): loading compiled BPF objects needs libbpf >= 1.0; "
                    f"install {LIBBPF_PACKAGE}"
                ) from None
            _lib = Libbpf(cdll, LIBBPF_SONAME)
        return _lib


# ---------------------------------------------------------------------------------------------------------
# Objects


@dataclass(frozen=True, slots=True)
class ProgramSpec:
    """A program of an opened object as libbpf describes it: name, ELF section, type (0 = unknown)."""

    name: str
    section: str
    type: int
    autoload: bool


@dataclass(frozen=True, slots=True)
class MapSpec:
    """A map of an opened object as libbpf describes it (sizes as declared; pin_path where pinned by name)."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    pin_path: str | None
    internal: bool


class ObjectHandle:
    """An owned `struct bpf_object *`: open it, adjust its programs, load it, walk it, close it (once).

    Not thread-safe: one thread at a time (asynctc hands it from worker thread to worker thread).
    """

    def __init__(self, lib: Libbpf, ptr: int, path: str) -> None:
        self._lib = lib
        self._ptr: int | None = ptr
        self.path = path

    @classmethod
    def open(cls, path: str, *, pin_root: str | None = None, lib: Libbpf | None = None) -> ObjectHandle:
        """bpf_object__open_file: parse the ELF object (no privileges needed; nothing reaches the kernel).

        Raises:
            LibbpfError: with errno (ENOENT for a missing file, libbpf's own codes >= 4000 for a bad ELF)
                and libbpf's warnings.
        """
        lib = lib or library()
        opts = _OpenOpts()
        opts.sz = ctypes.sizeof(_OpenOpts)
        root = os.fsencode(pin_root) if pin_root is not None else None
        opts.pin_root_path = root
        with capture_warnings() as messages:
            ctypes.set_errno(0)
            ptr = lib.object_open_file(os.fsencode(path), ctypes.byref(opts))
            err = ctypes.get_errno()
        if not ptr:
            err = err or _errno.EINVAL
            raise LibbpfError(err, "open", lib.strerror(err), tuple(messages))
        return cls(lib, int(ptr), path)

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError(f"the BPF object {self.path} is closed")
        return self._ptr

    def _walk(self, step: Callable[[int, int | None], int | None]) -> Iterator[int]:
        obj = self.ptr
        cur = step(obj, None)
        while cur:
            yield int(cur)
            cur = step(obj, cur)

    def program_pointers(self) -> dict[str, int]:
        """name -> `struct bpf_program *`, in ELF order."""
        lib = self._lib
        return {_text(lib.program_name(p)): p for p in self._walk(lib.next_program)}

    def map_pointers(self) -> dict[str, int]:
        """name -> `struct bpf_map *`, in ELF order (libbpf's own .data/.bss/.rodata maps included)."""
        lib = self._lib
        return {_text(lib.map_name(m)): m for m in self._walk(lib.next_map)}

    def programs(self) -> list[ProgramSpec]:
        lib = self._lib
        return [
            ProgramSpec(
                name=name,
                section=_text(lib.program_section(p)),
                type=int(lib.program_type(p)),
                autoload=bool(lib.program_autoload(p)),
            )
            for name, p in self.program_pointers().items()
        ]

    def maps(self) -> list[MapSpec]:
        lib = self._lib
        out = []
        for name, m in self.map_pointers().items():
            pin = lib.map_pin_path(m)
            out.append(
                MapSpec(
                    name=name,
                    type=int(lib.map_type(m)),
                    key_size=int(lib.map_key_size(m)),
                    value_size=int(lib.map_value_size(m)),
                    max_entries=int(lib.map_max_entries(m)),
                    pin_path=os.fsdecode(pin) if pin else None,
                    internal=bool(lib.map_is_internal(m)),
                )
            )
        return out

    def set_program_type(self, name: str, prog_type: int) -> None:
        """bpf_program__set_type (before load): for sections this libbpf cannot guess a type from."""
        ptr = self.program_pointers()[name]
        ret = int(self._lib.program_set_type(ptr, prog_type))
        if ret < 0:
            raise LibbpfError(-ret, "set_type", self._lib.strerror(-ret))

    def load(self) -> None:
        """bpf_object__load: create the maps (pinning or reusing those pinned by name), relocate, run the
        verifier on every program. Needs CAP_BPF (and CAP_NET_ADMIN for tc programs).

        Raises:
            LibbpfError: with the errno and libbpf's warnings; where the kernel refused a program, its
                name (`program`) and the verifier's log (`verifier_log`). libbpf undoes what it did: the
                maps it pinned for this load are unpinned again.
        """
        lib = self._lib
        # One buffer serves every program: libbpf asks for a log only when retrying a refused load, and
        # stops at the first program refused, so the buffer ends up holding that program's log.
        log = ctypes.create_string_buffer(VERIFIER_LOG_SIZE)
        progs = self.program_pointers()
        for p in progs.values():
            ret = int(lib.program_set_log_buf(p, log, VERIFIER_LOG_SIZE))
            if ret < 0:
                raise LibbpfError(-ret, "set_log_buf", lib.strerror(-ret))
        with capture_warnings() as messages:
            # An object loads once (libbpf refuses a second load), so the buffer is not used after this.
            ret = int(lib.object_load(self.ptr))
        if ret < 0:
            refused = None
            for line in messages:
                match = _LOAD_FAILED.search(line)
                if match:
                    refused = match.group(1)
            raise LibbpfError(
                -ret,
                "load",
                lib.strerror(-ret),
                tuple(messages),
                program=refused,
                verifier_log=log.value.decode(errors="replace") if refused else "",
            )

    def program_fd(self, name: str) -> int:
        """The loaded program's fd (libbpf's: closed with the object; dup it to keep it)."""
        fd = int(self._lib.program_fd(self.program_pointers()[name]))
        if fd < 0:
            raise LibbpfError(-fd, "program_fd", f"program {name!r} is not loaded")
        return fd

    def map_fd(self, name: str) -> int:
        """The created map's fd (libbpf's: closed with the object; dup it to keep it)."""
        fd = int(self._lib.map_fd(self.map_pointers()[name]))
        if fd < 0:
            raise LibbpfError(-fd if fd < -1 else _errno.EBADF, "map_fd", f"map {name!r} is not created")
        return fd

    def close(self) -> None:
        """bpf_object__close: closes libbpf's fds of the programs and maps (pins stay). Idempotent."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._lib.object_close(ptr)

    @property
    def closed(self) -> bool:
        return self._ptr is None


def _text(value: bytes | None) -> str:
    return value.decode(errors="replace") if value else ""
