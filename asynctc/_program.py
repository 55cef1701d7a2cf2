"""Program: an owned handle on a loaded BPF program."""

from __future__ import annotations

import builtins
import os
from types import TracebackType

import trio

from ._errors import Op, ProgramError, from_errno
from .lowlevel import bpf, pins
from .lowlevel.pins import check_path

__all__ = ["PROG_TYPE_NAMES", "Program", "adopt_program_fd"]

PROG_TYPE_NAMES = {
    bpf.BPF_PROG_TYPE_SOCKET_FILTER: "SOCKET_FILTER",
    bpf.BPF_PROG_TYPE_SCHED_CLS: "SCHED_CLS",
    4: "SCHED_ACT",
    bpf.BPF_PROG_TYPE_XDP: "XDP",
}


class Program:
    """An owned handle on a loaded BPF program: it holds its own fd, closed by `close()`.

    Build one with `from_fd` (duplicates the fd: the caller keeps theirs), `from_pinned` or `from_id`, or
    with `asynctc.programs`. The identity (`id`, `name`, `tag`, `type`) is read once from the kernel; it
    never changes for a loaded program. Usable as a context manager that closes it.

    Simulated programs of the mock backend (`MockKernel.program`) are Programs without an fd.
    """

    __slots__ = ("__weakref__", "_fd", "_id", "_name", "_section", "_tag", "_type")

    def __init__(
        self, fd: int | None, *, id: int, name: str, tag: str, type: int, section: str | None = None
    ) -> None:
        self._fd = fd
        self._id = id
        self._name = name
        self._tag = tag
        self._type = type
        self._section = section

    @classmethod
    def from_fd(cls, fd: int) -> Program:
        """A Program on a duplicate of `fd` (the caller keeps ownership of `fd`)."""
        bpf.check_field("Program.from_fd: fd", fd, bpf.FD_MAX)
        try:
            dup = os.dup(fd)
        except OSError as exc:
            raise ProgramError(f"fd {fd} is not open: {exc.strerror}; pass the fd of a loaded BPF program",
                               errno=exc.errno) from None
        return adopt_program_fd(dup)

    @classmethod
    def from_pinned(cls, path: str | os.PathLike[str]) -> Program:
        """The program pinned at `path` on bpffs (an absolute path without NUL or '..': ValueError), read as
        asynctc reads its own pins (`asynctc.lowlevel.pins`): no path component is followed through a
        symlink, and a pin in a directory others may write is refused (PinError saying why)."""
        spath = check_path(path, "program's pin path")
        try:
            fd = pins.get_object(spath)
        except bpf.BpfError as exc:
            raise from_errno(exc.errno or 0, op=Op.OBJ_GET, program=spath) from None
        return adopt_program_fd(fd)

    @classmethod
    def from_id(cls, prog_id: int) -> Program:
        """The loaded program with this id (needs CAP_SYS_ADMIN). TypeError/ValueError for an id that is not
        an int in 1..2**32-1 (a program id is a u32, never 0)."""
        bpf.check_field("Program.from_id: prog_id", prog_id, bpf.U32_MAX, lo=1)
        try:
            fd = bpf.prog_get_fd_by_id(prog_id)
        except bpf.BpfError as exc:
            raise from_errno(exc.errno or 0, op=Op.PROG_GET_FD_BY_ID, program=f"program id {prog_id}") from None
        return adopt_program_fd(fd)

    # -- the same, off the trio thread -----------------------------------------------------------------
    # Each bpf(2) call above takes microseconds on an idle machine, but the kernel may make one wait (BTF,
    # a program id lookup under load): from a trio task, these keep the event loop free.

    @classmethod
    async def open_fd(cls, fd: int) -> Program:
        """`from_fd` in a worker thread (for trio tasks: the sync `from_fd` blocks its caller)."""
        return await trio.to_thread.run_sync(cls.from_fd, fd)

    @classmethod
    async def open_pinned(cls, path: str | os.PathLike[str]) -> Program:
        """`from_pinned` in a worker thread (for trio tasks: the sync `from_pinned` blocks its caller)."""
        return await trio.to_thread.run_sync(cls.from_pinned, path)

    @classmethod
    async def open_id(cls, prog_id: int) -> Program:
        """`from_id` in a worker thread (for trio tasks: the sync `from_id` blocks its caller)."""
        return await trio.to_thread.run_sync(cls.from_id, prog_id)

    @property
    def fd(self) -> int:
        """The program's fd; ProgramError if it is closed or simulated (mock only)."""
        if self._fd is None:
            raise ProgramError(f"{self} is simulated: it exists only in a MockKernel, use the mock backend")
        if self._fd < 0:
            raise ProgramError(f"{self} is closed; load or open the program again")
        return self._fd

    @property
    def id(self) -> int:
        return self._id

    @property
    def name(self) -> str:
        return self._name

    @property
    def tag(self) -> str:
        return self._tag

    @property
    def section(self) -> str | None:
        """The ELF section the program came from (`tc`, `classifier`, `tcx/ingress`, `tcx/egress`...) for
        a program of a compiled object (`asynctc.open_object`); None for any other program."""
        return self._section

    @property
    def type(self) -> int:
        """The BPF program type (3 = BPF_PROG_TYPE_SCHED_CLS, the one tc hooks run)."""
        return self._type

    @property
    def type_name(self) -> str:
        return PROG_TYPE_NAMES.get(self._type, f"type {self._type}")

    @property
    def closed(self) -> bool:
        return self._fd is not None and self._fd < 0

    @property
    def simulated(self) -> bool:
        return self._fd is None

    def check_usable(self) -> None:
        """Raise ProgramError unless this program can be attached to a tc hook."""
        if self.closed:
            raise ProgramError(f"{self} is closed; load or open the program again")
        if self._type != bpf.BPF_PROG_TYPE_SCHED_CLS:
            raise ProgramError(
                f"{self} is a {self.type_name} program; tc hooks run only SCHED_CLS "
                "(BPF_PROG_TYPE_SCHED_CLS) programs: load it with that type"
            )

    def close(self) -> None:
        """Close the program's fd. Idempotent. Attachments keep their own references."""
        if self._fd is not None and self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Program:
        return self

    def __exit__(
        self,
        exc_type: builtins.type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else (" simulated" if self.simulated else "")
        return f"<Program id={self._id} name={self._name!r} type={self.type_name}{state}>"

    def __str__(self) -> str:
        return f"program {self._id}" + (f" ({self._name})" if self._name else "")


def adopt_program_fd(fd: int, *, name: str | None = None, section: str | None = None) -> Program:
    """A Program owning `fd` (already the caller's to give away); `fd` is closed if it is not a program.
    `name` overrides the kernel's (truncated to 15 bytes) name; `section` is its ELF section, if any."""
    if bpf.fd_object_kind(fd) != "prog":
        os.close(fd)
        raise ProgramError("the fd does not refer to a BPF program (is it a map or a link?)")
    try:
        info = bpf.prog_info(fd)
    except bpf.BpfError as exc:
        os.close(fd)
        raise from_errno(exc.errno or 0, op=Op.PROG_INFO) from None
    return Program(fd, id=info.id, name=name or info.name, tag=info.tag, type=info.type, section=section)
