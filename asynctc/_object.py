"""Compiled BPF objects: clang-built ELF files loaded through the system's libbpf, their programs and maps.

    async with asynctc.open_object("counter.o") as obj:
        async with session.open_attachment("eth0", "ingress", obj.program("count")):
            print(obj.map("hits").lookup(0))

libbpf does what only it does well (ELF parsing, relocations, BTF and CO-RE, map creation and pinning by
name, the verifier's log); attaching stays asynctc's own, so every backend and every session feature works
with an object's programs exactly as with any other `Program`.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType

import trio

from ._errors import BackendUnavailable, PermissionDenied, PinError, ProgramError, TCError
from ._map import Map, adopt_map_fd
from ._program import Program, adopt_program_fd
from ._types import Direction
from .lowlevel import bpf, libbpf
from .lowlevel.libbpf import MapSpec, ProgramSpec

__all__ = [
    "SCHED_CLS_SECTIONS",
    "BpfObject",
    "MapSpec",
    "ProgramSpec",
    "load_program",
    "open_object",
    "section_direction",
    "split_object_spec",
]

# Sections whose programs run on tc hooks. libbpf 1.1 knows only "tc" and "classifier"; the tcx (and
# netkit) names came with libbpf 1.3, so asynctc sets their type itself where libbpf left it unknown.
SCHED_CLS_SECTIONS = frozenset(
    {"tc", "classifier", "tcx/ingress", "tcx/egress", "tc/ingress", "tc/egress", "netkit/primary", "netkit/peer"}
)
_SECTION_DIRECTION = {
    "tcx/ingress": Direction.INGRESS,
    "tc/ingress": Direction.INGRESS,
    "tcx/egress": Direction.EGRESS,
    "tc/egress": Direction.EGRESS,
}
_VERIFIER_TAIL_LINES = 8
# how libbpf says it could not tell a program's type from its section (1.1; newer releases)
_UNTYPED_CLUES = ("missing BPF prog type", "guess program type")
_BPF_PROG_TYPE_UNSPEC = 0


def section_direction(section: str | None) -> Direction | None:
    """The hook direction an ELF section names (`tcx/ingress` -> INGRESS, `tcx/egress` -> EGRESS, and
    libbpf's newer `tc/ingress`, `tc/egress`), or None for a section that names none (`tc`, `classifier`)."""
    return _SECTION_DIRECTION.get(section) if section else None


class BpfObject:
    """A compiled BPF object opened (and normally loaded) by `open_object`; not built by callers.

    - `programs`: name -> `Program` (each with `.section`), the programs libbpf loaded; `program(name)`.
    - `maps`: name -> `Map`, every map of the object, libbpf's own `.bss`/`.data`/`.rodata` maps included;
      `map(name)`.
    - `program_specs`, `map_specs`: what the ELF file declares (names, sections, types, sizes, pin paths),
      read without privileges, loaded or not.

    The Programs and Maps hold fds of their own, closed when the object's block ends. Attachments made
    with its programs keep running (their links and filters hold the programs, and the programs their
    maps). To keep a program or map past the block, take your own handle inside it:
    `Program.from_fd(prog.fd)`, `Map.from_fd(m.fd)`, or pin it.
    """

    def __init__(
        self,
        path: str,
        *,
        pin_root: str | None,
        libbpf_version: str,
        program_specs: Mapping[str, ProgramSpec],
        map_specs: Mapping[str, MapSpec],
        programs: Mapping[str, Program],
        maps: Mapping[str, Map],
        loaded: bool,
    ) -> None:
        self._path = path
        self._pin_root = pin_root
        self._libbpf_version = libbpf_version
        self._program_specs = MappingProxyType(dict(program_specs))
        self._map_specs = MappingProxyType(dict(map_specs))
        self._programs = MappingProxyType(dict(programs))
        self._maps = MappingProxyType(dict(maps))
        self._loaded = loaded
        self._closed = False

    @property
    def path(self) -> str:
        return self._path

    @property
    def pin_root(self) -> str | None:
        """The bpffs directory of the maps declared LIBBPF_PIN_BY_NAME (None: libbpf's /sys/fs/bpf)."""
        return self._pin_root

    @property
    def libbpf_version(self) -> str:
        """The version of the libbpf that opened the object, e.g. "1.1"."""
        return self._libbpf_version

    @property
    def loaded(self) -> bool:
        """False for an object opened with `load=False` (descriptions only, no kernel objects)."""
        return self._loaded

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def program_specs(self) -> Mapping[str, ProgramSpec]:
        return self._program_specs

    @property
    def map_specs(self) -> Mapping[str, MapSpec]:
        return self._map_specs

    @property
    def programs(self) -> Mapping[str, Program]:
        """name -> Program of every loaded program (ProgramError if the object was not loaded, or closed)."""
        self._check_usable("programs")
        return self._programs

    @property
    def maps(self) -> Mapping[str, Map]:
        """name -> Map of every map (ProgramError if the object was not loaded, or is closed)."""
        self._check_usable("maps")
        return self._maps

    def program(self, name: str) -> Program:
        """The program called `name` (its C function name); ProgramError listing the names otherwise."""
        programs = self.programs
        try:
            return programs[name]
        except KeyError:
            raise ProgramError(
                f"{self._path} has no program {name!r}; its programs: {', '.join(programs) or 'none'}"
            ) from None

    def map(self, name: str) -> Map:
        """The map called `name` (as declared in C); KeyError listing the names otherwise."""
        maps = self.maps
        try:
            return maps[name]
        except KeyError:
            raise KeyError(f"{self._path} has no map {name!r}; its maps: {', '.join(maps) or 'none'}") from None

    def _check_usable(self, what: str) -> None:
        if self._closed:
            raise ProgramError(f"the BPF object {self._path} is closed: its {what} are gone with it")
        if not self._loaded:
            raise ProgramError(
                f"the BPF object {self._path} was opened with load=False: its {what} exist only as "
                f"descriptions (program_specs, map_specs). Open it with load=True to use them: loading needs "
                "CAP_BPF and CAP_NET_ADMIN (root); without privileges the mock backend attaches only the "
                "programs it simulates (MockKernel.program)"
            )

    def close(self) -> None:
        """Close the object's Programs and Maps (idempotent). Attachments and pins stay."""
        if self._closed:
            return
        self._closed = True
        for prog in self._programs.values():
            prog.close()
        for m in self._maps.values():
            m.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ("" if self._loaded else " not loaded")
        return (
            f"<BpfObject {self._path!r} programs={list(self._program_specs)} maps={list(self._map_specs)}{state}>"
        )


@asynccontextmanager
async def open_object(
    path: str | os.PathLike[str],
    *,
    pin_root: str | os.PathLike[str] | None = None,
    load: bool = True,
) -> AsyncIterator[BpfObject]:
    """Open and load a compiled BPF object (`clang -O2 -g -target bpf -c prog.c -o prog.o`).

    The system's libbpf (libbpf.so.1) parses it, applies its relocations (BTF and CO-RE included), creates
    its maps and runs the verifier on its programs, all in a worker thread: the trio thread is never
    blocked, however long the verifier takes. Programs in `tcx/ingress`/`tcx/egress` sections are loaded
    as SCHED_CLS programs even by a libbpf that predates those names. The Programs and Maps are closed
    when the block ends, however it ends; attachments made with them stay (see `BpfObject`).

    Args:
        path: the ELF object file.
        pin_root: the bpffs directory for maps declared with `__uint(pinning, LIBBPF_PIN_BY_NAME)`: each
            is pinned there under its name, and a map already pinned there is reused (when its type,
            sizes and flags match) instead of created, so its contents survive reloads and restarts.
            None: libbpf's default, /sys/fs/bpf.
        load: False to only parse the file (no privileges needed): `program_specs` and `map_specs` tell
            names, sections, types and sizes, and `programs`/`maps` are not available.

    Raises:
        ProgramError: no such file, not a BPF object, a program of a section libbpf cannot type, or the
            verifier refused a program (its whole log in `.verifier_log`, the relevant end in the message).
        PermissionDenied: loading needs CAP_BPF and CAP_NET_ADMIN.
        PinError: `pin_root` is not a directory on bpffs, or a map pinned there does not match.
        BackendUnavailable: no libbpf.so.1 here (the message names the package to install).
    """
    fspath = os.fspath(path)
    root = os.fspath(pin_root) if pin_root is not None else None
    if not isinstance(fspath, str) or not fspath:
        raise ValueError(f"path must be a non-empty str or path of an ELF object file, got {path!r}")
    if root is not None and (not isinstance(root, str) or not root):
        raise ValueError(f"pin_root must be a non-empty str or path of a bpffs directory, got {pin_root!r}")
    obj = await trio.to_thread.run_sync(_open_sync, fspath, root, bool(load))
    try:
        yield obj
    finally:
        obj.close()


def _open_sync(path: str, pin_root: str | None, load: bool) -> BpfObject:
    """Open, type, load and wrap an object (in a worker thread); nothing is left behind on failure."""
    if not os.path.isfile(path):
        exists = os.path.exists(path)
        what = "is not a regular file" if exists else "does not exist"
        raise ProgramError(
            f"cannot open BPF object {path}: it {what}; compile one with `clang -O2 -g -target bpf -c prog.c`",
            errno=_errno.EISDIR if os.path.isdir(path) else (_errno.EINVAL if exists else _errno.ENOENT),
        )
    if pin_root is not None and not os.path.isdir(pin_root):
        raise PinError(
            f"pin_root {pin_root} is not a directory: pass a directory on a bpffs mount "
            "(`mount -t bpf bpf /sys/fs/bpf`), where maps pinned by name are kept",
            errno=_errno.ENOTDIR,
        )
    try:
        lib = libbpf.library()
    except libbpf.LibbpfUnavailable as exc:
        raise BackendUnavailable(str(exc)) from None
    try:
        handle = libbpf.ObjectHandle.open(path, pin_root=pin_root, lib=lib)
    except libbpf.LibbpfError as exc:
        raise ProgramError(
            f"cannot open BPF object {path}: {exc.strerror}{_said(exc.messages)}; is it an object built with "
            "`clang -O2 -g -target bpf -c`?",
            errno=exc.errno,
        ) from None
    programs: dict[str, Program] = {}
    maps: dict[str, Map] = {}
    try:
        for spec in handle.programs():
            if spec.type == _BPF_PROG_TYPE_UNSPEC and spec.section in SCHED_CLS_SECTIONS:
                handle.set_program_type(spec.name, bpf.BPF_PROG_TYPE_SCHED_CLS)
        program_specs = {s.name: s for s in handle.programs()}
        map_specs = {s.name: s for s in handle.maps()}
        if load:
            try:
                handle.load()
            except libbpf.LibbpfError as exc:
                raise _load_error(path, exc, program_specs) from None
            for spec in program_specs.values():
                if spec.autoload:
                    fd = os.dup(handle.program_fd(spec.name))
                    programs[spec.name] = adopt_program_fd(fd, name=spec.name, section=spec.section)
            for mspec in map_specs.values():
                maps[mspec.name] = adopt_map_fd(os.dup(handle.map_fd(mspec.name)), name=mspec.name)
        return BpfObject(
            path,
            pin_root=pin_root,
            libbpf_version=lib.version_string,
            program_specs=program_specs,
            map_specs=map_specs,
            programs=programs,
            maps=maps,
            loaded=load,
        )
    except BaseException:
        for prog in programs.values():
            prog.close()
        for m in maps.values():
            m.close()
        raise
    finally:
        handle.close()  # our Programs and Maps hold fds of their own


def _said(messages: tuple[str, ...]) -> str:
    lines = [m.removeprefix("libbpf: ") for m in messages]
    return (" (libbpf: " + "; ".join(lines) + ")") if lines else ""


def _load_error(path: str, exc: libbpf.LibbpfError, specs: Mapping[str, ProgramSpec]) -> TCError:
    err = exc.errno or _errno.EINVAL
    strerror = f"{_errno.errorcode.get(err, err)} ({exc.strerror or os.strerror(err)})"
    if err == _errno.EPERM:
        return PermissionDenied(
            f"loading BPF object {path} failed: {strerror}: loading needs CAP_BPF and CAP_NET_ADMIN "
            "(run as root or grant both). To read its programs, sections and maps without privileges, open it "
            "with load=False; without privileges the mock backend attaches only the programs it simulates "
            f"(MockKernel.program){_said(exc.messages)}",
            errno=err,
        )
    if any(clue in m for m in exc.messages for clue in _UNTYPED_CLUES):
        spec = specs.get(exc.program or "")
        which = f"program {exc.program!r} (section {spec.section!r})" if spec is not None else "a program"
        return ProgramError(
            f"loading BPF object {path} failed: the ELF section of {which} names no program type libbpf "
            f"{libbpf.library().version_string} knows{_said(exc.messages)}; put tc programs in SEC(\"tc\"), "
            "SEC(\"tcx/ingress\") or SEC(\"tcx/egress\")",
            errno=err,
        )
    if exc.program is not None:
        spec = specs.get(exc.program)
        section = f" (section {spec.section!r})" if spec is not None else ""
        log = exc.verifier_log.rstrip()
        if log:
            tail = "\n".join(log.splitlines()[-_VERIFIER_TAIL_LINES:])
            return ProgramError(
                f"the verifier refused program {exc.program!r}{section} of {path}: {strerror}. The end of its "
                f"log (all of it is on .verifier_log):\n{tail}",
                errno=err,
                verifier_log=log,
            )
        return ProgramError(
            f"loading program {exc.program!r}{section} of {path} failed: {strerror}{_said(exc.messages)}",
            errno=err,
        )
    if any("pin" in m for m in exc.messages):
        return PinError(
            f"loading BPF object {path} failed on a map pinned by name: {strerror}{_said(exc.messages)}; "
            "pin_root must be a directory on bpffs, and a map already pinned there must have the same type, "
            "sizes and flags (remove the old pin to start afresh)",
            errno=err,
        )
    return ProgramError(f"loading BPF object {path} failed: {strerror}{_said(exc.messages)}", errno=err)


# ---------------------------------------------------------------------------------------------------------
# One program out of an object (for the command line, and for code that wants just one program)


def split_object_spec(spec: str | os.PathLike[str]) -> tuple[str, str | None]:
    """Split "OBJECT.o[:NAME]" into the path and the program name (None when there is none).

    The name is what follows the last ':' when that is a C identifier, so paths with colons elsewhere
    keep working. No filesystem access.
    """
    text = os.fspath(spec)
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected OBJECT.o[:PROGRAM], got {spec!r}")
    head, sep, tail = text.rpartition(":")
    if sep and head and tail.isidentifier():
        return head, tail
    if sep and not tail:
        raise ValueError(f"{text!r} ends with ':' but names no program: write OBJECT.o:PROGRAM or OBJECT.o")
    return text, None


async def load_program(
    spec: str | os.PathLike[str], *, pin_root: str | os.PathLike[str] | None = None
) -> tuple[Program, Direction | None]:
    """Load one tc program out of a compiled object named "OBJECT.o[:NAME]".

    Without NAME the object must hold exactly one SCHED_CLS program. The object is opened and loaded
    (`open_object`), the program taken on an fd of its own, and the object closed: its maps live on as
    long as the program does.

    Returns:
        (the Program, with `.section`; the Direction its section names, or None for `tc`/`classifier`
        sections, which leave the direction to the caller). The caller owns the Program: close it.

    Raises:
        ValueError for a malformed spec; ProgramError when NAME is missing or ambiguous, names no program,
        or names one that tc hooks cannot run (an XDP program...); what `open_object` raises.
    """
    path, name = split_object_spec(spec)
    async with open_object(path, pin_root=pin_root) as obj:
        if name is None:
            tc = [p for p in obj.programs.values() if p.type == bpf.BPF_PROG_TYPE_SCHED_CLS]
            if len(tc) != 1:
                listed = ", ".join(f"{p.name} ({p.section})" for p in obj.programs.values()) or "none"
                raise ProgramError(
                    f"{path} holds {len(tc)} tc programs, so name the one to use: {path}:NAME (its programs: "
                    f"{listed})"
                )
            prog = tc[0]
        else:
            prog = obj.program(name)
        prog.check_usable()
        mine = adopt_program_fd(os.dup(prog.fd), name=prog.name, section=prog.section)
    return mine, section_direction(mine.section)
