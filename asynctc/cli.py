"""The `asynctc` command: look at and change tc hooks from a shell.

    asynctc show [DEV [DIRECTION]]           every hook that has something on it, in run order
    asynctc attach DEV DIRECTION PROGRAM     attach (and pin, so it outlives the command)
    asynctc detach DEV DIRECTION PROGRAM     detach what asynctc attached for PROGRAM there
    asynctc update DEV DIRECTION OLD NEW     swap OLD for NEW atomically (a compare-and-swap)
    asynctc pin DEV DIRECTION PROGRAM PATH   move an attachment's pin to PATH
    asynctc unpin PATH / adopt PATH / reap / backends / monitor / demo / stress / completion

Every command takes `--netns NAME` and `--json`. Errors are one line on stderr, never a traceback; the exit
status is 0 on success, 1 when an operation failed, 2 on bad usage (docs/cli.md).

The parser is built from `SUBCOMMANDS`, one `Subcommand` (an argument adder and an async runner) per
command: a new command is one function pair and one row there.

Ctrl-C (SIGINT) and SIGTERM become a cancellation of the running job, which runs in a child task, so its
shielded cleanup always completes.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import enum
import errno as _errno
import json
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, TextIO

import trio

import asynctc
from asynctc import Op
from asynctc import events as ev

__all__ = ["SUBCOMMANDS", "Subcommand", "UsageError", "format_event", "main", "reported_error"]

DEFAULT_PIN_ROOT = "/sys/fs/bpf/asynctc"
PIN_ROOT_ENV = "ASYNCTC_PIN_DIR"
BPF_FS_MAGIC = 0xCAFE4A11
DIRECTIONS = ("ingress", "egress")

Job = Callable[[argparse.Namespace, TextIO], Awaitable[int]]


class UsageError(Exception):
    """Bad usage of the command line (exit status 2): a malformed argument or an unknown backend."""


def _say(out: TextIO, text: str = "") -> None:
    out.write(text + "\n")
    out.flush()


def _emit_json(out: TextIO, obj: object) -> None:
    _say(out, json.dumps(obj))


# ---------------------------------------------------------------------------------------------------------
# errors: one line on stderr


def reported_error(exc: BaseException) -> BaseException:
    """The error to report for `exc`: trio nurseries wrap errors in (nested) ExceptionGroups; this returns
    the first leaf that is not a cancellation (the cancellations are consequences of it)."""
    while isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (leaves or list(exc.exceptions))[0]
    return exc


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _report(command: str, exc: BaseException) -> int:
    """Write `exc` as one line on stderr; return the exit status it stands for."""
    if isinstance(exc, UsageError):
        sys.stderr.write(f"asynctc {command}: {_one_line(str(exc))}\n")
        return 2
    if isinstance(exc, asynctc.TCError):
        sys.stderr.write(f"asynctc {command}: {type(exc).__name__}: {_one_line(str(exc))}\n")
        return 1
    if isinstance(exc, ValueError | TypeError):
        sys.stderr.write(f"asynctc {command}: {_one_line(str(exc))}\n")
        return 2
    if isinstance(exc, OSError):
        sys.stderr.write(f"asynctc {command}: {_one_line(str(exc))}\n")
        return 1
    sys.stderr.write(f"asynctc {command}: unexpected error {type(exc).__name__}: {_one_line(str(exc))} "
                     "(please report it)\n")
    return 1


async def _run_cancellable(job: Callable[[], Awaitable[int]]) -> int:
    """Run `job` in a child task; SIGINT/SIGTERM cancel it (its cleanup still runs to completion, further
    signals are absorbed) and the exit code is 128 + the signal."""
    try:
        return await asynctc.run_until_interrupted(job)
    except asynctc.Interrupted as exc:
        return exc.exit_code


# ---------------------------------------------------------------------------------------------------------
# arguments shared by commands


def _installed_backends() -> dict[str, str]:
    """name -> kernel kind ("linux" or "mock") of every installed backend."""
    from asynctc import _plugins

    registry = _plugins.collect_backends(_plugins.get_plugin_manager())
    return {name: registry.get(name).kernel_kind for name in registry.names()}


def _check_backend(name: str) -> str:
    if name == "auto":
        return name
    installed = _installed_backends()
    if name not in installed:
        raise UsageError(f"no backend named {name!r} is installed (installed: {', '.join(sorted(installed))}); "
                         "`asynctc backends` lists them")
    return name


def _direction(text: str) -> str:
    if text.lower() not in DIRECTIONS:
        raise UsageError(f"DIRECTION must be 'ingress' or 'egress', got {text!r}")
    return text.lower()


def _position(text: str) -> asynctc.Position:
    """first | last | before:ID | after:ID (ID: a program id on the same hook)."""
    if text == "first":
        return asynctc.First()
    if text == "last":
        return asynctc.Last()
    where, sep, ident = text.partition(":")
    if sep and where in ("before", "after") and ident.isdigit() and int(ident) > 0:
        return asynctc.Before(int(ident)) if where == "before" else asynctc.After(int(ident))
    raise UsageError(f"--position must be first, last, before:ID or after:ID (ID a program id), got {text!r}")


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """A PROGRAM argument: `id:N` (a loaded program's id), the path of a pinned program, or a compiled
    object `OBJECT.o[:NAME]` (loaded anew each time it is opened)."""

    text: str
    prog_id: int | None = None
    path: str | None = None
    obj: str | None = None

    def open(self) -> asynctc.Program:
        """The Program it names (blocking: call it from a worker thread)."""
        if self.prog_id is not None:
            return asynctc.Program.from_id(self.prog_id)
        assert self.path is not None
        return asynctc.Program.from_pinned(self.path)


def parse_program(text: str) -> ProgramSpec:
    """Resolve a PROGRAM argument. One function, so that new spellings (compiled objects) are one branch."""
    if text.startswith("id:"):
        ident = text[3:]
        if not ident.isdigit() or not 0 < int(ident) < 2**32:
            raise UsageError(f"PROGRAM id:N needs a program id N in 1..{2**32 - 1}, got {text!r}")
        return ProgramSpec(text, prog_id=int(ident))
    if text.endswith(".o") or ".o:" in text:
        return ProgramSpec(text, obj=text)
    if not text.startswith("/") and not text.startswith("."):
        raise UsageError(f"PROGRAM must be id:N or the path of a pinned program (on bpffs), got {text!r}")
    return ProgramSpec(text, path=text)


async def _open_program(spec: ProgramSpec) -> asynctc.Program:
    if spec.obj is not None:
        prog, _direction = await asynctc.load_program(spec.obj)
        return prog
    return await trio.to_thread.run_sync(spec.open)


def _existing(spec: ProgramSpec, role: str) -> ProgramSpec:
    """`spec` where it must name a program that is loaded already (an object file would load a new one)."""
    if spec.obj is not None:
        raise UsageError(f"{role} {spec.text!r}: a compiled object loads a new program; name the attached one by "
                         "id:N (see `asynctc show`) or by the path of its pinned program")
    return spec


def _add_common(p: argparse.ArgumentParser, *, backend: bool = True, owner: bool = False,
                pins: bool = False) -> None:
    p.add_argument("--netns", default=None, metavar="NAME",
                   help="work in this network namespace (a name under /run/netns, or a path)")
    p.add_argument("--json", action="store_true", help="print one JSON object (JSON lines for streams)")
    if backend:
        p.add_argument("--backend", default="auto", metavar="NAME",
                       help="auto (default), bpf_link, netlink, mock or a third party's backend")
    if owner:
        p.add_argument("--owner", default="asynctc", metavar="TAG",
                       help="the owner tag of what asynctc attaches (default: asynctc)")
    if pins:
        p.add_argument("--pin-dir", default=None, metavar="DIR",
                       help=f"where default pins live (default: ${PIN_ROOT_ENV} or {DEFAULT_PIN_ROOT})")


def _session(args: argparse.Namespace) -> Any:
    """A session on the real kernel for the hook commands. An in-memory kernel lives and dies with one
    process, so a command that changes or shows hooks has nothing to work on there: that is refused."""
    backend = _check_backend(getattr(args, "backend", "auto"))
    if backend != "auto" and _installed_backends()[backend] == "mock":
        raise UsageError(f"backend {backend!r} is an in-memory kernel that lives inside one process: `asynctc "
                         f"{args.command}` works on the real kernel (try `asynctc demo --backend {backend}`)")
    return asynctc.open_session(backend, netns=args.netns, owner=getattr(args, "owner", "asynctc"))


# ---------------------------------------------------------------------------------------------------------
# tc's spellings


def tc_parent(parent: int) -> str:
    """A qdisc or filter parent as tc writes it: ffff:fff1, ffff:, 1:2, root."""
    if parent == 0xFFFFFFFF:
        return "root"
    major, minor = parent >> 16, parent & 0xFFFF
    return f"{major:x}:" if minor == 0 else f"{major:x}:{minor:x}"


def tc_handle(kind: str | None, handle: int) -> str:
    """A filter handle as tc writes it: 0x1 for cls_bpf (and most classifiers), 800::800 for u32."""
    if kind == "u32":
        htid, bucket, node = handle >> 20, (handle >> 12) & 0xFF, handle & 0xFFF
        text = f"{htid:x}:" if htid else ""
        if bucket:
            text += f"{bucket:x}"
        if node:
            text += f":{node:x}"
        return text or "0"
    return f"{handle:#x}"


HOOK_PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}


# ---------------------------------------------------------------------------------------------------------
# default pins: <root>/<owner>/<netns inode>_<ifindex>_<direction>_<link N | prio P handle H>


def _is_bpffs(path: str) -> bool:
    buf = ctypes.create_string_buffer(256)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return int.from_bytes(buf.raw[:8], sys.byteorder) == BPF_FS_MAGIC


def _check_safe_dir(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise asynctc.PinError(f"refusing pin directory {path}: it is a symbolic link (remove it, or pass "
                               "--pin-dir)", errno=_errno.ELOOP)
    if not stat.S_ISDIR(st.st_mode):
        raise asynctc.PinError(f"refusing pin directory {path}: it is not a directory", errno=_errno.ENOTDIR)
    if st.st_uid not in (0, os.geteuid()):
        raise asynctc.PinError(f"refusing pin directory {path}: it belongs to uid {st.st_uid}, who could delete "
                               "or replace pins made there; remove it or pass --pin-dir", errno=_errno.EPERM)
    if st.st_mode & 0o022:
        raise asynctc.PinError(f"refusing pin directory {path}: others can write to it (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w it or pass --pin-dir",
                               errno=_errno.EPERM)


def pin_directory(root: str, owner: str, *, create: bool) -> str | None:
    """The directory of `owner`'s default pins under `root` (created 0700 when `create`), after checking
    that no component of it is a symbolic link and that nobody but root or the caller can write to the
    directories asynctc made; None when it does not exist and `create` is False. PinError otherwise."""
    root = os.path.abspath(root)
    parent = os.path.dirname(root)
    here = "/"
    for part in parent.strip("/").split("/"):
        if not part:
            continue
        here = os.path.join(here, part)
        try:
            if stat.S_ISLNK(os.lstat(here).st_mode):
                raise asynctc.PinError(f"refusing pin directory {root}: {here} is a symbolic link",
                                       errno=_errno.ELOOP)
        except FileNotFoundError:
            raise asynctc.PinError(f"cannot use pin directory {root}: {here} does not exist; mount bpffs there "
                                   "(`mount -t bpf bpf /sys/fs/bpf`) or pass --pin-dir", errno=_errno.ENOENT) from None
    if not _is_bpffs(parent):
        raise asynctc.PinError(f"cannot use pin directory {root}: {parent} is not a bpffs mount; mount it "
                               "(`mount -t bpf bpf /sys/fs/bpf`) or pass --pin-dir DIR on bpffs",
                               errno=_errno.ENOTSUP)
    directory = os.path.join(root, owner)
    for d in (root, directory):
        try:
            _check_safe_dir(d)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            os.chmod(d, 0o700, follow_symlinks=False)
            _check_safe_dir(d)
    return directory


def _pin_root(args: argparse.Namespace) -> str:
    return str(getattr(args, "pin_dir", None) or os.environ.get(PIN_ROOT_ENV) or DEFAULT_PIN_ROOT)


def _pin_prefix(ns_inode: int, ifindex: int, direction: str) -> str:
    return f"{ns_inode}_{ifindex}_{direction}_"


def default_pin_name(ns_inode: int, info: asynctc.AttachmentInfo) -> str:
    """The file name of an attachment's default pin (bpffs refuses dots in names)."""
    ident = f"link{info.link_id}" if info.link_id is not None else f"prio{info.priority}_handle{info.handle or 0:x}"
    return _pin_prefix(ns_inode, info.ifindex, info.direction.value) + ident


async def _netns_inode(session: Any) -> int:
    from asynctc.lowlevel.netns import current_netns_inode

    inode: int = await session.runner.run(current_netns_inode)
    return inode


def _list_pins(directory: str | None, prefix: str = "") -> list[str]:
    if directory is None:
        return []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names if n.startswith(prefix) and not n.endswith("_record")]


# ---------------------------------------------------------------------------------------------------------
# show


@dataclasses.dataclass
class Row:
    """One entry of a hook, as `show` prints it."""

    kind: str
    prog_id: int | None
    prog_name: str
    prog_tag: str
    link_id: int | None
    priority: int | None
    handle: int | None
    parent: int | None
    owner: str | None = None
    pid: int | None = None
    pinned: str | None = None
    run_cnt: int | None = None
    run_time_ns: int | None = None

    def as_json(self, owner: str) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["handle_tc"] = None if self.handle is None else tc_handle(_tc_kind(self.kind), self.handle)
        d["parent"] = None if self.parent is None else tc_parent(self.parent)
        d["owned"] = self.owner == owner
        if self.run_cnt is None:
            del d["run_cnt"], d["run_time_ns"]
        return d


def _tc_kind(kind: str) -> str:
    return "bpf" if kind == "cls_bpf" else kind


async def _hook_rows(session: Any, nl: Any, ifindex: int, direction: str) -> tuple[int | None, list[Row]]:
    """The hook in run order, as the session's query lists it (tcx first, then every classifier of
    whichever qdisc holds the hook, by priority and newest first within one), with each filter's parent
    as the kernel spells it and its owner tag, read from a dump of the hook's filters."""
    from asynctc.lowlevel import hook as hooklib
    from asynctc.lowlevel.tcpolicy import parse_tag

    hook = await session.query(ifindex, direction)
    with asynctc.translated(asynctc.Op.FILTER_DUMP, dev=ifindex, direction=direction):
        dumped = await hooklib.dump_filters(nl, ifindex, asynctc.Direction(direction))
    by_slot = {(m.priority, m.handle): m for m in dumped}
    rows: list[Row] = []
    for e in hook.entries:
        parent: int | None = None
        owner: str | None = None
        pid: int | None = None
        if e.kind != "tcx" and e.priority is not None and e.handle is not None:
            m = by_slot.get((e.priority, e.handle))
            parent = m.parent if m is not None else HOOK_PARENTS[direction]
            if m is not None and m.kind == "bpf" and (tag := parse_tag(m.bpf_name)) is not None:
                owner, pid = tag.owner, tag.pid
        rows.append(Row(e.kind, e.prog_id or None, e.prog_name, e.prog_tag, e.link_id, e.priority, e.handle, parent,
                        owner=owner, pid=pid))
    return hook.revision, rows


def _attach_pins(rows: list[Row], pins: list[str], ns_inode: int, ifindex: int, direction: str,
                 owner: str) -> None:
    """Mark the rows that have a default pin (by the ids in the pin's name; exact unless updated since)."""
    prefix = _pin_prefix(ns_inode, ifindex, direction)
    for path in pins:
        name = os.path.basename(path)
        if not name.startswith(prefix):
            continue
        ident = name[len(prefix):]
        for r in rows:
            if (r.kind == "tcx" and r.link_id is not None and ident == f"link{r.link_id}") or (
                r.kind == "cls_bpf" and ident == f"prio{r.priority}_handle{r.handle or 0:x}"
            ):
                r.pinned = path
                if r.kind == "tcx":
                    r.owner = owner


async def _add_stats(rows: list[Row], seconds: float) -> None:
    from asynctc.lowlevel import bpf

    ids = sorted({r.prog_id for r in rows if r.prog_id})

    def read() -> dict[int, tuple[int, int]]:
        got = {}
        for pid in ids:
            try:
                fd = bpf.prog_get_fd_by_id(pid)
            except bpf.BpfError:
                continue
            try:
                s = bpf.prog_run_stats(fd)
                got[pid] = (s.run_cnt, s.run_time_ns)
            finally:
                os.close(fd)
        return got

    try:
        stats_fd = await trio.to_thread.run_sync(bpf.enable_stats)
    except bpf.BpfError as exc:
        raise asynctc.from_errno(exc.errno or 0, op=Op.ENABLE_STATS) from None
    try:
        before = await trio.to_thread.run_sync(read)
        await trio.sleep(seconds)
        after = await trio.to_thread.run_sync(read)
    finally:
        os.close(stats_fd)
    for r in rows:
        if r.prog_id in after and r.prog_id in before:
            r.run_cnt = after[r.prog_id][0] - before[r.prog_id][0]
            r.run_time_ns = after[r.prog_id][1] - before[r.prog_id][1]


def _format_hook(dev: str, ifindex: int, direction: str, revision: int | None, rows: list[Row],
                 stats: bool) -> list[str]:
    rev = f" revision {revision}" if revision is not None else ""
    lines = [f"{dev}({ifindex}) {direction}{rev}:"]
    for r in rows:
        if r.kind == "tcx":
            where = f"tcx link {r.link_id}" if r.link_id else "tcx (no link)"
        else:
            where = (f"filter parent {tc_parent(r.parent or 0)} prio {r.priority} {_tc_kind(r.kind)} "
                     f"handle {tc_handle(_tc_kind(r.kind), r.handle or 0)}")
        prog = f" prog_id {r.prog_id} {r.prog_name or '-'} tag {r.prog_tag or '-'}" if r.prog_id else ""
        who = f" owner {r.owner}" + (f" pid {r.pid}" if r.pid else "") if r.owner else " foreign"
        pin = f" pinned {r.pinned}" if r.pinned else ""
        st = ""
        if stats and r.run_cnt is not None:
            avg = r.run_time_ns // r.run_cnt if r.run_cnt and r.run_time_ns is not None else 0
            st = f" run_cnt {r.run_cnt} run_time_ns {r.run_time_ns} avg_ns {avg}"
        lines.append(f"\t{where}{prog}{who}{pin}{st}")
    return lines


async def _cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    import socket

    from asynctc.lowlevel.netlink import open_transport

    directions = [_direction(args.direction)] if args.direction else list(DIRECTIONS)
    if args.stats_interval <= 0:
        raise UsageError(f"--stats-interval must be > 0 seconds, got {args.stats_interval}")
    async with _session(args) as session, open_transport(session.runner) as nl:
        if args.dev is not None:
            devices = [await session.resolve_device(int(args.dev) if args.dev.isdigit() else args.dev)]
        else:
            devices = sorted(await session.runner.run(socket.if_nameindex))
        ns_inode = await _netns_inode(session)
        pins = _list_pins(_known_pin_directory(args, session.owner))
        hooks: list[tuple[str, int, str, int | None, list[Row]]] = []
        for ifindex, name in devices:
            for direction in directions:
                try:
                    revision, rows = await _hook_rows(session, nl, ifindex, direction)
                except asynctc.DeviceNotFound:
                    if args.dev is not None:
                        raise
                    break  # deleted meanwhile
                if rows or args.dev is not None:
                    _attach_pins(rows, pins, ns_inode, ifindex, direction, session.owner)
                    hooks.append((name, ifindex, direction, revision, rows))
        if args.stats:
            await _add_stats([r for h in hooks for r in h[4]], args.stats_interval)
    if args.json:
        _emit_json(out, {"netns": args.netns, "backend": session.backend_name, "hooks": [
            {"dev": name, "ifindex": ifindex, "direction": direction, "revision": revision,
             "entries": [r.as_json(session.owner) for r in rows]}
            for name, ifindex, direction, revision, rows in hooks]})
        return 0
    for name, ifindex, direction, revision, rows in hooks:
        for line in _format_hook(name, ifindex, direction, revision, rows, args.stats):
            _say(out, line)
    return 0


def _known_pin_directory(args: argparse.Namespace, owner: str) -> str | None:
    """The default pin directory for `show`, None when there is none to trust (said once on stderr):
    the hooks are shown all the same, without their pins."""
    if not _pin_dir_usable(args):
        return None
    try:
        return pin_directory(_pin_root(args), owner, create=False)
    except asynctc.PinError as exc:
        _say(sys.stderr, f"asynctc {args.command}: warning: pins not shown: {_one_line(exc.message)}")
        return None


def _pin_dir_usable(args: argparse.Namespace) -> bool:
    """Whether the default pins can be looked at (show works without a bpffs mount)."""
    root = _pin_root(args)
    return _is_bpffs(os.path.dirname(os.path.abspath(root)))


def _add_show(p: argparse.ArgumentParser) -> None:
    p.add_argument("dev", nargs="?", metavar="DEV", help="a device name or ifindex (default: every device)")
    p.add_argument("direction", nargs="?", metavar="DIRECTION", help="ingress or egress (default: both)")
    p.add_argument("--stats", action="store_true",
                   help="switch on the kernel's run statistics and report each program's runs and run time")
    p.add_argument("--stats-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how long --stats counts (default 1 s)")
    _add_common(p, owner=True, pins=True)


# ---------------------------------------------------------------------------------------------------------
# attach / detach / update / pin / unpin / adopt / reap


def _info_json(att: asynctc.Attachment) -> dict[str, object]:
    i = att.info
    d: dict[str, object] = {f.name: getattr(i, f.name) for f in dataclasses.fields(i)}
    d["direction"] = i.direction.value
    d["state"] = att.state.value
    d["handle_tc"] = None if i.handle is None else tc_handle("bpf", i.handle)
    return d


def _describe(att: asynctc.Attachment) -> str:
    i = att.info
    where = (f"link {i.link_id}" if i.link_id is not None
             else f"prio {i.priority} handle {tc_handle('bpf', i.handle or 0)}")
    pin = f", pinned at {i.pinned}" if i.pinned else ""
    return f"prog_id {i.prog_id} on {i.dev} {i.direction.value} as {where} [{i.backend}]{pin}"


async def _cmd_attach(args: argparse.Namespace, out: TextIO) -> int:
    spec = parse_program(args.program)
    given = None if args.direction.lower() == "auto" and spec.obj is not None else _direction(args.direction)
    position = _position(args.position)
    async with _session(args) as session:
        if spec.obj is not None:
            prog, named = await asynctc.load_program(spec.obj)
        else:
            prog, named = await _open_program(spec), None
        with prog:
            if given is None and named is None:
                raise UsageError(f"PROGRAM {spec.text!r}: its section ({prog.section!r}) names no direction; give "
                                 "DIRECTION ingress or egress")
            if given is not None and named is not None and given != named.value:
                raise UsageError(f"PROGRAM {spec.text!r} is a {prog.section} program; attaching it to {given} "
                                 "is most likely a mistake: give DIRECTION auto or " + named.value)
            direction = given if given is not None else named.value  # type: ignore[union-attr]
            att = await session.attach(args.dev, direction, prog, position=position)
            path = args.pin
            if path is None:
                directory = pin_directory(_pin_root(args), session.owner, create=True)
                assert directory is not None
                path = os.path.join(directory, default_pin_name(await _netns_inode(session), att.info))
            await att.pin(path)
            if args.json:
                _emit_json(out, {"attached": _info_json(att)})
            else:
                _say(out, f"attached {_describe(att)}")
    return 0


def _add_attach(p: argparse.ArgumentParser) -> None:
    p.add_argument("dev", metavar="DEV")
    p.add_argument("direction", metavar="DIRECTION",
                   help="ingress or egress (auto: the one a compiled program's section names, tcx/ingress...)")
    p.add_argument("program", metavar="PROGRAM",
                   help="id:N, the path of a pinned program, or a compiled object OBJECT.o[:NAME]")
    p.add_argument("--pin", default=None, metavar="PATH",
                   help="pin the attachment here (default: a pin under the owner's pin directory)")
    p.add_argument("--position", default="last", metavar="WHERE", help="first, last, before:ID or after:ID")
    _add_common(p, owner=True, pins=True)


async def _find(session: Any, args: argparse.Namespace, dev: str, direction: str,
                spec: ProgramSpec, *, remove_orphan: bool = False) -> asynctc.Attachment:
    """What asynctc attached for `spec`'s program on the hook: through `--pin`, through a default pin, or
    (a cls_bpf filter of a dead process with this owner tag) adopted from the kernel."""
    ifindex, name = await session.resolve_device(int(dev) if dev.isdigit() else dev)
    if spec.prog_id is not None:
        prog_id = spec.prog_id
    else:
        with await _open_program(spec) as p:
            prog_id = p.id
    where = f"{name} {direction}"
    if getattr(args, "pin", None):
        att: asynctc.Attachment = await session.adopt_pinned(args.pin)
        i = att.info
        if i.ifindex != ifindex or i.direction.value != direction or i.prog_id != prog_id:
            raise asynctc.NotOwned(f"the attachment pinned at {args.pin} is {_describe(att)}, not program "
                                   f"{prog_id} on {where}")
        return att
    directory = pin_directory(_pin_root(args), session.owner, create=False) if _pin_dir_usable(args) else None
    prefix = _pin_prefix(await _netns_inode(session), ifindex, direction)
    for path in _list_pins(directory, prefix):
        try:
            att = await session.adopt_pinned(path)
        except asynctc.TCError:
            continue  # stale, or not adoptable by this owner: not the one
        if att.info.prog_id == prog_id and att.info.direction.value == direction:
            return att
    return await _find_by_tag(session, args, ifindex, name, direction, prog_id, remove_orphan=remove_orphan)


async def _find_by_tag(session: Any, args: argparse.Namespace, ifindex: int, name: str, direction: str,
                       prog_id: int, *, remove_orphan: bool) -> asynctc.Attachment:
    """No pin names it: look for a cls_bpf filter running `prog_id` with this owner's tag. One whose process
    is dead (an orphan, as `reap` would remove) is deleted here and reported by raising `_Removed`; one of a
    live process, or pinned elsewhere, is refused with the reason."""
    from asynctc.lowlevel import codec
    from asynctc.lowlevel import hook as hooklib
    from asynctc.lowlevel.devlock import DeviceLocks
    from asynctc.lowlevel.netlink import open_transport
    from asynctc.lowlevel.tcpolicy import parse_tag, process_alive

    where = f"{name} {direction}"
    removed: list[Row] = []
    async with open_transport(session.runner) as nl:
        with asynctc.translated(asynctc.Op.FILTER_DUMP, dev=name, direction=direction):
            filters = await hooklib.dump_filters(nl, ifindex, asynctc.Direction(direction))
        for f in filters:
            tag = parse_tag(f.bpf_name) if f.kind == "bpf" and f.bpf_id == prog_id else None
            if tag is None or tag.owner != session.owner:
                continue
            slot = f"prio {f.priority} handle {f.handle:#x}"
            if tag.pinned:
                raise asynctc.PinError(f"program {prog_id} on {where} ({slot}) is pinned outside "
                                       f"{_pin_root(args)}/{session.owner}; pass --pin PATH")
            if await session.runner.run(process_alive, tag.pid, tag.start):
                raise asynctc.NotOwned(f"program {prog_id} on {where} ({slot}) belongs to the live process "
                                       f"{tag.pid} (owner {session.owner}); it detaches it itself")
            if not remove_orphan:  # only `detach` removes an orphan; other commands leave the hook as it is
                raise asynctc.TCError(f"program {prog_id} on {where} ({slot}) is an orphaned filter of the dead "
                                      f"process {tag.pid} (not pinned, so it cannot be taken over): `asynctc "
                                      "detach` or `asynctc reap` removes it; attach the program again")

            def build(seq: int, f: codec.FilterMsg = f) -> bytes:
                return codec.encode_filter(seq, codec.RTM_DELTFILTER, codec.NLM_F_REQUEST | codec.NLM_F_ACK,
                                           f.ifindex, f.parent, f.priority, f.handle)

            with trio.CancelScope(shield=True):
                # Under the device lock every asynctc process honours, and only if the slot still holds that
                # filter (its process's liveness check took a while: a foreign filter may have taken it).
                locks = DeviceLocks(await _netns_inode(session))
                await locks.acquire(ifindex)
                try:
                    try:
                        with asynctc.translated(asynctc.Op.FILTER_GET, dev=name, direction=direction):
                            now = await nl.request(
                                codec.encode_filter_get(0, f.ifindex, f.parent, f.priority, f.handle),
                                op=asynctc.Op.FILTER_GET)
                    except (asynctc.Severed, asynctc.DeviceNotFound):
                        now = []
                    if not any(isinstance(m, codec.FilterMsg) and m.bpf_name == f.bpf_name and m.bpf_id == f.bpf_id
                               for m in now):
                        continue  # gone meanwhile, or someone else's now: left alone
                    with asynctc.translated(asynctc.Op.FILTER_DELETE, dev=name, direction=direction):
                        await nl.request(build, op=asynctc.Op.FILTER_DELETE)
                finally:
                    locks.release(ifindex)
                    locks.close()
            removed.append(Row("cls_bpf", prog_id, tag.prog_name, f.bpf_tag or "", None, f.priority, f.handle,
                               f.parent, owner=tag.owner, pid=tag.pid))
    if removed:
        raise _Removed(removed)
    hook = await session.query(ifindex, direction)
    if any(e.prog_id == prog_id for e in hook.entries):
        raise asynctc.NotOwned(
            f"program {prog_id} on {where} was not attached by asynctc with owner {session.owner!r} (no pin under "
            f"{_pin_root(args)}/{session.owner}, no owner tag): it is foreign and left alone; pass --pin PATH if "
            "asynctc pinned it elsewhere")
    raise asynctc.TCError(f"program {prog_id} is not on {where}; `asynctc show {name} {direction}` lists the hook",
                          errno=_errno.ENOENT)


class _Removed(Exception):
    """Internal: `_find` found only orphaned filters of the program (their process is dead) and removed them."""

    def __init__(self, rows: list[Row]) -> None:
        super().__init__(rows)
        self.rows = rows


async def _cmd_detach(args: argparse.Namespace, out: TextIO) -> int:
    direction = _direction(args.direction)
    spec = _existing(parse_program(args.program), "PROGRAM")
    async with _session(args) as session:
        try:
            att = await _find(session, args, args.dev, direction, spec, remove_orphan=True)
        except _Removed as orphans:
            for r in orphans.rows:
                if args.json:
                    _emit_json(out, {"detached": r.as_json(session.owner) | {"orphan": True}})
                else:
                    _say(out, f"detached orphaned filter {r.prog_name} prog_id {r.prog_id} on {args.dev} {direction} "
                              f"prio {r.priority} handle {tc_handle('bpf', r.handle or 0)} (process {r.pid} is gone)")
            return 0
        described, info = _describe(att), _info_json(att)
        if att.info.pinned is not None:
            await att.unpin()
        await att.detach()
    info["state"], info["pinned"] = "detached", None
    if args.json:
        _emit_json(out, {"detached": info})
    else:
        _say(out, f"detached {described}")
    return 0


def _add_detach(p: argparse.ArgumentParser) -> None:
    p.add_argument("dev", metavar="DEV")
    p.add_argument("direction", metavar="DIRECTION",
                   help="ingress or egress (auto: the one a compiled program's section names, tcx/ingress...)")
    p.add_argument("program", metavar="PROGRAM",
                   help="id:N, the path of a pinned program, or a compiled object OBJECT.o[:NAME]")
    p.add_argument("--pin", default=None, metavar="PATH", help="the attachment's pin, if not a default pin")
    _add_common(p, owner=True, pins=True)


async def _cmd_update(args: argparse.Namespace, out: TextIO) -> int:
    direction = _direction(args.direction)
    old_spec, new_spec = _existing(parse_program(args.old), "OLD"), parse_program(args.new)
    async with _session(args) as session:
        att = await _find(session, args, args.dev, direction, old_spec)
        with await _open_program(new_spec) as new, await trio.to_thread.run_sync(
                asynctc.Program.from_id, att.info.prog_id) as old:
            result = await att.update(new, expected=old)
        if args.json:
            _emit_json(out, {"updated": _info_json(att), "method": result.method, "revision": result.revision,
                             "old_prog_id": old.id})
        else:
            rev = f", revision {result.revision}" if result.revision is not None else ""
            _say(out, f"updated {_describe(att)} (was prog_id {old.id}) by {result.method}{rev}")
    return 0


def _add_update(p: argparse.ArgumentParser) -> None:
    p.add_argument("dev", metavar="DEV")
    p.add_argument("direction", metavar="DIRECTION", help="ingress or egress")
    p.add_argument("old", metavar="OLD", help="the program there now: id:N or a pinned program's path")
    p.add_argument("new", metavar="NEW", help="the program to run instead: id:N or a pinned program's path")
    p.add_argument("--pin", default=None, metavar="PATH", help="the attachment's pin, if not a default pin")
    _add_common(p, owner=True, pins=True)


async def _cmd_pin(args: argparse.Namespace, out: TextIO) -> int:
    direction = _direction(args.direction)
    spec = _existing(parse_program(args.program), "PROGRAM")
    async with _session(args) as session:
        att = await _find(session, args, args.dev, direction, spec)
        old = att.info.pinned
        if old == args.path:
            pass
        else:
            if old is not None:
                await att.unpin()
            try:
                await att.pin(args.path)
            except BaseException:
                if old is not None:
                    with trio.CancelScope(shield=True):
                        await att.pin(old)
                raise
        if args.json:
            _emit_json(out, {"pinned": _info_json(att), "previous_pin": old})
        else:
            _say(out, f"pinned {_describe(att)}" + (f" (was {old})" if old and old != args.path else ""))
    return 0


def _add_pin(p: argparse.ArgumentParser) -> None:
    p.add_argument("dev", metavar="DEV")
    p.add_argument("direction", metavar="DIRECTION", help="ingress or egress")
    p.add_argument("program", metavar="PROGRAM", help="id:N or the path of a pinned program")
    p.add_argument("path", metavar="PATH", help="the new pin (on bpffs)")
    p.add_argument("--pin", default=None, metavar="PATH", help="the attachment's current pin, if not a default pin")
    _add_common(p, owner=True, pins=True)


async def _cmd_unpin(args: argparse.Namespace, out: TextIO) -> int:
    async with _session(args) as session:
        att = await session.adopt_pinned(args.path)
        described, info = _describe(att), _info_json(att)
        await att.unpin()
        await att.detach()
    info["state"], info["pinned"] = "detached", None
    if args.json:
        _emit_json(out, {"unpinned": args.path, "detached": info})
    else:
        _say(out, f"unpinned {args.path}; nothing holds it any more, so it was detached: {described}")
    return 0


def _add_unpin(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="the pin to remove")
    _add_common(p, owner=True)


async def _cmd_adopt(args: argparse.Namespace, out: TextIO) -> int:
    async with _session(args) as session:
        att = await session.adopt_pinned(args.path)
        if args.json:
            _emit_json(out, {"adopted": _info_json(att)})
        else:
            _say(out, f"adoptable by owner {session.owner}: {_describe(att)} (left pinned)")
    return 0


def _add_adopt(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help="the pin of an attachment")
    _add_common(p, owner=True)


async def _cmd_reap(args: argparse.Namespace, out: TextIO) -> int:
    async with _session(args) as session:
        removed = await session.reap_orphans()
    if args.json:
        _emit_json(out, {"reaped": [dataclasses.asdict(e) for e in removed]})
        return 0
    for e in removed:
        _say(out, f"reaped {e.kind} prio {e.priority} handle {tc_handle('bpf', e.handle or 0)} prog_id {e.prog_id} "
                  f"{e.prog_name}")
    _say(out, f"{len(removed)} orphaned attachment(s) removed")
    return 0


def _add_reap(p: argparse.ArgumentParser) -> None:
    _add_common(p, owner=True)


# ---------------------------------------------------------------------------------------------------------
# demo


def _real_kernel_possible() -> str | None:
    """None if the demo can use the real kernel here, else why not."""
    if sys.platform != "linux":
        return "not Linux"
    from asynctc.testing import kernel_test_skip_reason

    return kernel_test_skip_reason()


async def _demo_real(out: TextIO, backend: str, hold: bool = False) -> int:
    from asynctc import programs
    from asynctc.testing import create_netns, delete_netns, send_frames, unique_name, veth_pair

    created: list[str] = []
    try:
        with trio.CancelScope(shield=True):
            for prefix in ("atcdemo", "atcpeer"):
                created.append(await trio.to_thread.run_sync(create_netns, unique_name(prefix)))
            ns_a, ns_b = created
            pair = await trio.to_thread.run_sync(veth_pair, ns_a, "demo0", ns_b, "demo1")
        _say(out, f"created namespaces {ns_a} and {ns_b}, joined by veth demo0 <-> demo1")

        async def frames(n: int) -> None:
            await trio.to_thread.run_sync(lambda: send_frames(pair.b, n, netns=pair.netns_b))

        async with asynctc.open_session(backend, netns=ns_a, owner="asynctc-demo") as session:
            _say(out, f"backend: {session.backend_name} (real kernel)")
            counter = programs.counting("pass", name="demo_v1")
            async with session.open_attachment("demo0", "ingress", counter) as att:
                i = att.info
                ident = f"link {i.link_id}" if i.link_id else f"prio {i.priority} handle {i.handle:#x}"
                _say(out, f"attached program {i.prog_id} ({counter.name}) to demo0 ingress as {ident}")
                await frames(10)
                _say(out, f"sent 10 frames from demo1: {counter.name} counted {counter.count()}")
                hook = await session.query("demo0", "ingress")
                _say(out, f"hook demo0/ingress revision={hook.revision}:")
                for e in hook.entries:
                    _say(out, f"  {e.kind:8} prog {e.prog_id:<6} {e.prog_name:16} tag {e.prog_tag} "
                              f"owned={e.owned}")
                v2 = programs.counting("pass", name="demo_v2")
                result = await att.update(v2, expected=counter)
                _say(out, f"updated to program {v2.id} ({v2.name}) by {result.method}, "
                          f"revision {result.revision}")
                await frames(5)
                _say(out, f"sent 5 more frames: {counter.name} {counter.count()}, {v2.name} {v2.count()}")
                if hold:
                    _say(out, f"holding: {v2.name} stays attached in namespace {ns_a} until Ctrl-C "
                              f"(try: asynctc show --netns {ns_a})")
                    await trio.sleep_forever()
            hook = await session.query("demo0", "ingress")
            _say(out, f"detached; hook demo0/ingress now holds {len(hook.entries)} program(s)")
        return 0
    finally:
        with trio.CancelScope(shield=True):
            for name in reversed(created):
                await trio.to_thread.run_sync(delete_netns, name)
            if created:
                _say(out, f"removed namespaces {', '.join(created)}")


async def _demo_mock(out: TextIO, why: str | None) -> int:
    if why:
        _say(sys.stderr, f"no real kernel for the demo here ({why}); using the in-memory mock kernel")
    async with asynctc.open_session("mock", owner="asynctc-demo") as session:
        kernel = session.kernel  # the fresh in-memory kernel the mock backend made for this session
        _say(out, f"backend: {session.backend_name} (in-memory kernel model, no privileges needed)")
        counter = kernel.program("pass", name="demo_v1")
        async with session.open_attachment("eth0", "ingress", counter) as att:
            _say(out, f"attached program {att.info.prog_id} ({counter.name}) to eth0 ingress "
                      f"as link {att.info.link_id}")
            await trio.to_thread.run_sync(kernel.send, "eth0", "ingress", 10)
            _say(out, f"sent 10 simulated packets: {counter.name} counted {counter.count()}")
            hook = await session.query("eth0", "ingress")
            _say(out, f"hook eth0/ingress revision={hook.revision}: "
                      + ", ".join(f"{e.kind} prog {e.prog_id} owned={e.owned}" for e in hook.entries))
            v2 = kernel.program("pass", name="demo_v2")
            result = await att.update(v2, expected=counter)
            _say(out, f"updated to program {v2.id} ({v2.name}) by {result.method}, revision {result.revision}")
            await trio.to_thread.run_sync(kernel.send, "eth0", "ingress", 5)
            _say(out, f"sent 5 more packets: {counter.name} {counter.count()}, {v2.name} {v2.count()}")
        hook = await session.query("eth0", "ingress")
        _say(out, f"detached; hook eth0/ingress now holds {len(hook.entries)} program(s)")
    return 0


async def _cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    backend = _check_backend(args.backend)
    if backend == "mock":
        return await _demo_mock(out, None)
    why = _real_kernel_possible()
    if why is None:
        return await _demo_real(out, backend, args.hold)
    if backend != "auto":
        raise asynctc.BackendUnavailable(f"backend {backend!r} needs the real kernel, which is not usable here: "
                                         f"{why}; try --backend mock")
    return await _demo_mock(out, why)


def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto",
                   help="auto (real kernel where possible, else mock), bpf_link, netlink or mock")
    p.add_argument("--hold", action="store_true",
                   help="on a real kernel, keep the updated program attached until Ctrl-C, then clean up")


# ---------------------------------------------------------------------------------------------------------
# backends


async def _cmd_backends(args: argparse.Namespace, out: TextIO) -> int:
    from asynctc import _plugins
    from asynctc._backends import BackendSet
    from asynctc.backend import BackendContext
    from asynctc.lowlevel.netns import NetnsRunner

    registry = _plugins.collect_backends(_plugins.get_plugin_manager())
    runner = NetnsRunner(args.netns, trio.CapacityLimiter(4))
    ctx = BackendContext(runner=runner, netns=args.netns, owner="asynctc", session_tag="asynctc:probe")
    rows = []
    try:
        for name in registry.names():
            cls = registry.get(name)
            try:
                kernel = BackendSet.default_kernel(registry, name, None)
                probe = await cls.probe(dataclasses.replace(ctx, kernel=kernel))
            except Exception as exc:
                probe = asynctc.Probe(False, f"probe raised {exc!r}")
            rows.append((name, cls.__module__, cls.kernel_kind, probe))
    finally:
        runner.close()
    # The in-memory kernel always works; the question is whether the real kernel can be driven here.
    works = any(p.available for _, _, kind, p in rows if kind != "mock")
    if args.json:
        _emit_json(out, {"netns": args.netns, "real_kernel_usable": works, "backends": [
            {"backend": name, "module": module, "kernel": kind, "available": probe.available,
             "reason": probe.reason} for name, module, kind, probe in rows]})
    else:
        width = max((len(r[0]) for r in rows), default=7)
        for name, module, kind, probe in rows:
            mark = "yes" if probe.available else "no "
            _say(out, f"{name:<{width}}  available: {mark}  {probe.reason}  [{module}, {kind}]")
    if not works:
        sys.stderr.write("asynctc backends: no backend can drive the real kernel here (see the reasons above)\n")
        return 1
    return 0


def _add_backends(p: argparse.ArgumentParser) -> None:
    _add_common(p, backend=False)


# ---------------------------------------------------------------------------------------------------------
# monitor


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, asynctc.Attachment):
        return dataclasses.asdict(value.info) | {"state": value.state.value}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def _event_words(event: ev.Event, names: dict[int, str]) -> list[str]:
    """The event in tc's words: device names, parents like ffff:fff2, handles like 0x1."""
    if isinstance(event, ev.DeviceAdded | ev.DeviceRemoved):
        return [f"dev {event.name} ifindex {event.ifindex}"]
    if isinstance(event, ev.QdiscAdded | ev.QdiscRemoved):
        return [f"dev {names.get(event.ifindex, '?')} ifindex {event.ifindex}", f"qdisc {event.kind}",
                f"handle {tc_parent(event.handle)}", f"parent {tc_parent(event.parent)}"]
    if isinstance(event, ev.FilterAdded | ev.FilterRemoved):
        words = [f"dev {names.get(event.ifindex, '?')} ifindex {event.ifindex}"]
        if event.direction is not None:
            words.append(f"{event.direction.value} parent {tc_parent(HOOK_PARENTS[event.direction.value])}")
        words.append(f"prio {event.priority} {event.kind} handle {tc_handle(event.kind, event.handle)}")
        if event.prog_id:
            words.append(f"prog_id {event.prog_id}")
        words.append("owned" if event.owned else "foreign")
        return words
    if isinstance(event, ev.AttachmentSevered):
        return [repr(event.attachment), f"reason {event.reason}"]
    if isinstance(event, ev.Resynced):
        return [f"reason {event.reason}"]
    return [f"count {event.count}"]


def format_event(event: ev.Event, *, as_json: bool, now: float | None = None,
                 names: dict[int, str] | None = None) -> str:
    """One line for an event: tc's words for people, or one JSON object for programs. `names` maps ifindexes
    to device names (for events that carry only an ifindex)."""
    now = time.time() if now is None else now
    names = names or {}
    name = type(event).__name__
    if as_json:
        fields = {f.name: _jsonable(getattr(event, f.name)) for f in dataclasses.fields(event)}
        extra: dict[str, object] = {}
        if isinstance(event, ev.QdiscAdded | ev.QdiscRemoved | ev.FilterAdded | ev.FilterRemoved):
            extra["dev"] = names.get(event.ifindex)
        if isinstance(event, ev.QdiscAdded | ev.QdiscRemoved):
            extra["handle_tc"], extra["parent_tc"] = tc_parent(event.handle), tc_parent(event.parent)
        if isinstance(event, ev.FilterAdded | ev.FilterRemoved):
            extra["handle_tc"] = tc_handle(event.kind, event.handle)
            extra["parent_tc"] = None if event.direction is None else tc_parent(HOOK_PARENTS[event.direction.value])
        return json.dumps({"time": round(now, 6), "event": name} | fields | extra)
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    return f"{stamp}  {name:<16} {' '.join(_event_words(event, names))}"


async def _cmd_monitor(args: argparse.Namespace, out: TextIO) -> int:
    backend = _check_backend(args.backend)
    where = f"namespace {args.netns}" if args.netns else "this namespace"
    if backend != "auto" and _installed_backends()[backend] == "mock":
        async with asynctc.open_session(backend, netns=args.netns) as session, session.open_monitor() as mon:
            _say(sys.stderr, f"watching the {backend} backend's in-memory kernel; Ctrl-C to stop")
            async for event in mon:
                _say(out, format_event(event, as_json=args.json))
        return 0
    # rtnetlink multicast needs no privilege (as `ip monitor`): read the namespace's events directly, so
    # the monitor also works where no backend could attach anything.
    from asynctc.lowlevel.events import open_netlink_event_source
    from asynctc.lowlevel.netns import NetnsRunner

    runner = NetnsRunner(args.netns, trio.CapacityLimiter(2))
    try:
        # (without CAP_NET_ADMIN its receive buffer is capped at net.core.rmem_max: a storm may then cost a
        # resync, which the source recovers from)
        async with open_netlink_event_source(runner) as source:
            names = dict(source.links)
            _say(sys.stderr, f"watching {where} (rtnetlink link and tc events); Ctrl-C to stop")
            while True:
                for event in await source.receive():
                    if isinstance(event, ev.DeviceAdded):
                        names[event.ifindex] = event.name
                    _say(out, format_event(event, as_json=args.json, names=names))
                    if isinstance(event, ev.DeviceRemoved):
                        names.pop(event.ifindex, None)
    finally:
        runner.close()


def _add_monitor(p: argparse.ArgumentParser) -> None:
    _add_common(p)


# ---------------------------------------------------------------------------------------------------------
# stress


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _rate_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value:g}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


async def _stress(args: argparse.Namespace, out: TextIO) -> int:
    import logging

    from asynctc import testing

    if not args.verbose:  # failed cleanups under injected faults are counted in the report instead
        logging.getLogger("asynctc").setLevel(logging.CRITICAL)
    try:
        report = await testing.stress(
            lifecycles=args.lifecycles, devices=args.devices, duration=args.duration, namespaces=args.namespaces,
            backend=args.backend, cancel_rate=args.cancel_rate, fault_rate=args.fault_rate,
            delete_rate=args.delete_rate, pin_rate=args.pin_rate, seed=args.seed,
            progress=sys.stderr if sys.stderr.isatty() else None,
        )
    except ValueError as exc:
        sys.stderr.write(f"asynctc stress: {exc}\n")
        return 2
    except asynctc.TCError as exc:
        sys.stderr.write(f"asynctc stress: {type(exc).__name__}: {exc}\n")
        return 1
    _say(out, json.dumps(report.to_json()) if args.json else report.summary())
    return 1 if report.leaks else 0


def _add_stress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lifecycles", type=_count_arg, default=16, help="concurrent lifecycles (default 16)")
    p.add_argument("--devices", type=_count_arg, default=4, help="devices they share (default 4)")
    p.add_argument("--duration", type=_seconds_arg, default=5.0, help="seconds of workload (default 5)")
    p.add_argument("--namespaces", type=_count_arg, default=1,
                    help="network namespaces (mock: kernels) the devices are spread over (default 1)")
    p.add_argument("--backend", default="auto",
                    help="auto, bpf_link or netlink (real kernel, in namespaces it creates; needs root), or mock")
    p.add_argument("--cancel-rate", type=_rate_arg, default=0.2,
                    help="share of lifecycles cancelled at a random instant (default 0.2)")
    p.add_argument("--fault-rate", type=_rate_arg, default=0.0,
                    help="chance of an injected kernel fault before each operation (mock only; default 0)")
    p.add_argument("--delete-rate", type=float, default=1.0,
                    help="device deletions (re-created at once) per second (default 1)")
    p.add_argument("--pin-rate", type=_rate_arg, default=0.1,
                    help="share of lifecycles that pin and unpin their attachment (default 0.1)")
    p.add_argument("--seed", type=int, default=None, help="repeat a run's random choices")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")
    p.add_argument("--verbose", action="store_true", help="also show asynctc's log (failed cleanups...)")


# ---------------------------------------------------------------------------------------------------------
# completion

def _completion_words(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """subcommand -> its options, from the parser itself."""
    # argparse offers no public way to list a parser's actions; its private ones are stable since 3.2.
    words: dict[str, list[str]] = {}
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                words[name] = sorted(o for a in sub._actions  # noqa: SLF001
                                     for o in a.option_strings if o.startswith("--"))
    return words


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """A bash or zsh completion script for `asynctc`: subcommands, their options, devices, directions,
    namespaces and backends."""
    words = _completion_words(parser)
    commands = " ".join(words)
    cases = "\n".join(f"        {name}) opts=\"{' '.join(opts)}\" ;;" for name, opts in words.items())
    body = f"""_asynctc() {{
    local cur prev cmd opts i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    cmd=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in -*) ;; *) cmd="${{COMP_WORDS[i]}}"; break ;; esac
    done
    if [[ -z "$cmd" ]]; then
        COMPREPLY=($(compgen -W "{commands} --help --version" -- "$cur")); return
    fi
    case "$prev" in
        --netns) COMPREPLY=($(compgen -W "$(ls /run/netns 2>/dev/null)" -- "$cur")); return ;;
        --backend) COMPREPLY=($(compgen -W "auto bpf_link netlink mock" -- "$cur")); return ;;
        --position) COMPREPLY=($(compgen -W "first last before: after:" -- "$cur")); return ;;
        --pin|--pin-dir) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")); return ;;
    esac
    case "$cmd" in
{cases}
        *) opts="" ;;
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts --help" -- "$cur")); return
    fi
    case "$prev" in
        ingress|egress) COMPREPLY=($(compgen -f -W "id:" -- "$cur")) ;;
        show|attach|detach|update|pin) COMPREPLY=($(compgen -W "$(ls /sys/class/net 2>/dev/null)" -- "$cur")) ;;
        *) if [[ -e /sys/class/net/$prev ]]; then COMPREPLY=($(compgen -W "ingress egress" -- "$cur"));
           else COMPREPLY=($(compgen -f -- "$cur")); fi ;;
    esac
}}
"""
    if shell == "bash":
        return body + "complete -F _asynctc asynctc\n"
    # zsh runs bash completion functions through bashcompinit.
    return ("#compdef asynctc\n"
            "(( $+functions[compdef] )) || { autoload -U +X compinit && compinit }\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + body + "complete -F _asynctc asynctc\n")


async def _cmd_completion(args: argparse.Namespace, out: TextIO) -> int:
    out.write(completion_script(args.shell, build_parser()))
    out.flush()
    return 0


def _add_completion(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete for")


# ---------------------------------------------------------------------------------------------------------
# the parser


class Subcommand(NamedTuple):
    """One command: its name, one line of help, what adds its arguments, and the job that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Job


SUBCOMMANDS: list[Subcommand] = [
    Subcommand("show", "what is on each hook, in run order (tcx, then every classifier)", _add_show, _cmd_show),
    Subcommand("attach", "attach a program to a hook and pin it so it outlives the command", _add_attach,
               _cmd_attach),
    Subcommand("detach", "detach what asynctc attached for a program on a hook", _add_detach, _cmd_detach),
    Subcommand("update", "swap the program of an attachment atomically (compare-and-swap)", _add_update,
               _cmd_update),
    Subcommand("pin", "move an attachment's pin to another path", _add_pin, _cmd_pin),
    Subcommand("unpin", "remove a pin; the attachment it held is detached", _add_unpin, _cmd_unpin),
    Subcommand("adopt", "check that a pinned attachment can be taken over, and describe it", _add_adopt,
               _cmd_adopt),
    Subcommand("reap", "remove filters that dead processes with this owner tag left behind", _add_reap, _cmd_reap),
    Subcommand("backends", "installed backends and whether each works here", _add_backends, _cmd_backends),
    Subcommand("monitor", "a live stream of device, qdisc and filter events", _add_monitor, _cmd_monitor),
    Subcommand("demo", "attach a counting program, send packets, update it, detach it", _add_demo, _cmd_demo),
    Subcommand("stress", "many concurrent lifecycles with cancellations, then a leak audit (exit 1 on a leak)",
               _add_stress, _stress),
    Subcommand("completion", "print a completion script: asynctc completion bash|zsh", _add_completion,
               _cmd_completion),
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit status 2
        self.exit(2, f"{self.prog}: {_one_line(message)} (try --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="asynctc", description="Attach eBPF programs to Linux traffic control.")
    p.add_argument("--version", action="version", version=f"asynctc {asynctc.__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for cmd in SUBCOMMANDS:
        cmd.add_arguments(sub.add_parser(cmd.name, help=cmd.help, description=cmd.help))
    return p


def _quiet_stdout() -> None:
    """The reader of stdout went away (`asynctc monitor | head -1`): send what is left nowhere, so that
    nothing complains at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


class _OneLineFormatter(logging.Formatter):
    """The library's warnings, one line each (never a traceback), named after the command."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        return f"asynctc {self.command}: {record.levelname.lower()}: {_one_line(record.getMessage())}"


def _log_to_stderr(command: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(command))
    log = logging.getLogger("asynctc")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr(args.command)
    out = sys.stdout
    job = {c.name: c.run for c in SUBCOMMANDS}[args.command]

    async def run() -> int:
        return await job(args, out)

    try:
        return trio.run(_run_cancellable, run)
    except BaseException as exc:  # every error is reported as one line
        err = reported_error(exc)
        if isinstance(err, BrokenPipeError):
            _quiet_stdout()
            return 0
        if isinstance(err, KeyboardInterrupt):
            return 128 + signal.SIGINT
        if isinstance(err, SystemExit):
            raise err from None
        return _report(args.command, err)


if __name__ == "__main__":
    sys.exit(main())
