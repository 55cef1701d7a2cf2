"""The error hierarchy, and the one place where kernel errnos become asynctc exceptions.

Every backend translates a failed kernel call with `from_errno(errno, op=..., ...)`: the exception class is
chosen by errno (refined by the operation where the kernel reuses an errno), and the message says what was
attempted (operation, device, direction, program, backend), what the kernel said, and what to do about it.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = [
    "AlreadyAttached",
    "AnchorNotFound",
    "BackendUnavailable",
    "CleanupError",
    "Conflict",
    "DeviceNotFound",
    "HookFull",
    "NotOwned",
    "OffloadError",
    "PermissionDenied",
    "PinError",
    "ProgramError",
    "Severed",
    "StaleRevision",
    "TCError",
    "from_errno",
    "Op",
    "translated",
]


class Op(enum.StrEnum):
    """The kernel operations asynctc reports errors of. `from_errno` chooses the exception by errno, refined
    by the operation where the kernel gives an errno a meaning of its own (EPERM from a compare-and-swap
    link update is a `Conflict`); the value is the name messages use. Low-level code names the operation it
    ran (`asynctc.lowlevel.bpf.BpfError.op`), a backend the one it attempted."""

    CLSACT_ADD = "clsact_add"
    DEV_ADD = "dev_add"
    DEV_GET = "dev_get"
    DUMP = "dump"
    ENABLE_STATS = "enable_stats"
    FILTER_ADD = "filter_add"
    FILTER_ADD_HW = "filter_add_hw"
    FILTER_DELETE = "filter_delete"
    FILTER_DUMP = "filter_dump"
    FILTER_GET = "filter_get"
    FILTER_REPLACE = "filter_replace"
    FILTER_REPLACE_HW = "filter_replace_hw"
    LINK_CREATE = "link_create"
    LINK_DETACH = "link_detach"
    LINK_DUMP = "link_dump"
    LINK_GET = "link_get"
    LINK_GET_FD_BY_ID = "link_get_fd_by_id"
    LINK_GET_NEXT_ID = "link_get_next_id"
    LINK_INFO = "link_info"
    LINK_UPDATE = "link_update"
    LINK_UPDATE_CAS = "link_update_cas"
    MAP_CREATE = "map_create"
    MAP_DELETE = "map_delete"
    MAP_GET_FD_BY_ID = "map_get_fd_by_id"
    MAP_GET_NEXT_ID = "map_get_next_id"
    MAP_GET_NEXT_KEY = "map_get_next_key"
    MAP_INFO = "map_info"
    MAP_LOOKUP = "map_lookup"
    MAP_UPDATE = "map_update"
    NETLINK = "netlink"
    OBJ_GET = "obj_get"
    OBJ_PIN = "obj_pin"
    OBJ_UNPIN = "obj_unpin"
    OBJECT_LOAD = "object_load"
    PROG_ATTACH = "prog_attach"
    PROG_DETACH = "prog_detach"
    PROG_GET = "prog_get"
    PROG_GET_FD_BY_ID = "prog_get_fd_by_id"
    PROG_GET_NEXT_ID = "prog_get_next_id"
    PROG_INFO = "prog_info"
    PROG_LOAD = "prog_load"
    PROG_QUERY = "prog_query"
    PROG_TEST_RUN = "prog_test_run"
    QDISC_ADD = "qdisc_add"
    QDISC_DELETE = "qdisc_delete"
    QDISC_DUMP = "qdisc_dump"
    QDISC_GET = "qdisc_get"


class TCError(Exception):
    """Base of every asynctc error. `errno` is the kernel's errno where the kernel gave one, else None."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class DeviceNotFound(TCError, LookupError):
    """The device does not exist in the session's network namespace (ENODEV / unknown name or ifindex)."""


class ProgramError(TCError):
    """The program cannot be used: not a SCHED_CLS program, closed, not found, or refused by the verifier.

    `verifier_log` is the verifier's whole log where the kernel refused to load the program ("" otherwise);
    the message itself carries only its tail, where the verifier says what it refused.
    """

    def __init__(self, message: str, *, errno: int | None = None, verifier_log: str = "") -> None:
        super().__init__(message, errno=errno)
        self.verifier_log = verifier_log


class PermissionDenied(TCError, PermissionError):
    """The kernel refused for lack of privilege (EPERM/EACCES); the message names the missing capability."""


class AlreadyAttached(TCError):
    """The program is already on this hook (EEXIST), or the filter slot is taken."""


class StaleRevision(TCError):
    """expected_revision did not match the hook's current revision (ESTALE)."""


class HookFull(TCError):
    """The hook already holds the most programs it can (ERANGE: 63 tcx programs)."""


class AnchorNotFound(TCError, LookupError):
    """A Before/After anchor is not on the hook (ENOENT)."""


class Conflict(TCError):
    """A compare-and-swap lost: the program on the hook is not the one `expected` named. Nothing changed."""


class Severed(TCError):
    """The attachment was severed by the kernel (ENOLINK: its device, qdisc or filter is gone)."""


class NotOwned(TCError):
    """The object belongs to someone else (a foreign link, filter or qdisc); asynctc never touches those."""


class BackendUnavailable(TCError):
    """The requested backend cannot work here; the message says why."""


class OffloadError(TCError):
    """Hardware offload was required but refused, or an offloaded update was refused by the hardware."""


class PinError(TCError):
    """Pinning failed: bpffs not mounted, path outside bpffs, path taken or not found."""


class CleanupError(TCError):
    """One or more cleanups failed. `errors` holds each failure; nothing is swallowed silently."""

    def __init__(self, message: str, errors: Sequence[BaseException]) -> None:
        super().__init__(message)
        self.errors = tuple(errors)


CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
_CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_PERFMON: "CAP_PERFMON",
              CAP_BPF: "CAP_BPF"}

# What each kind of operation needs: every group must be held, a group is held by any one of its
# capabilities (CAP_SYS_ADMIN stands in for CAP_BPF and CAP_NET_ADMIN for BPF, as the kernel allows).
_CAP_NEEDS: dict[str, tuple[tuple[int, ...], ...]] = {
    "bpf": ((CAP_BPF, CAP_SYS_ADMIN),),
    "prog": ((CAP_BPF, CAP_SYS_ADMIN), (CAP_NET_ADMIN, CAP_SYS_ADMIN)),
    "net": ((CAP_NET_ADMIN,),),
    "sysadmin": ((CAP_SYS_ADMIN,),),
}


def effective_capabilities() -> int | None:
    """The calling thread's effective capability set (CapEff of /proc/thread-self/status), None if unknown."""
    for path in ("/proc/thread-self/status", "/proc/self/status"):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("CapEff:"):
                        return int(line.split()[1], 16)
        except (OSError, ValueError):
            continue
    return None


def _cap_hint(kind: str) -> str:
    """Which capability the operation needs and which of them this process lacks (from CapEff)."""
    caps = effective_capabilities()
    if caps is None:
        return _CAP_HINT[kind]

    def spell(group: tuple[int, ...]) -> str:
        return " or ".join(_CAP_NAMES[c] for c in group)

    missing = [g for g in _CAP_NEEDS[kind] if not any(caps >> c & 1 for c in g)]
    held = [n for c, n in sorted(_CAP_NAMES.items()) if caps >> c & 1]
    has = f"it has {', '.join(held)}" if held else "it has none of CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"
    why = " (getting a BPF object by id is privileged)" if kind == "sysadmin" else ""
    if missing:
        need = " and ".join(f"({spell(g)})" if len(g) > 1 and len(missing) > 1 else spell(g) for g in missing)
        return f"needs {need}{why}, which this process lacks ({has}): run as root or grant the capability"
    return (f"this process holds the capabilities this needs ({has}), yet the kernel refused: a security "
            "module (SELinux, AppArmor, lockdown), a seccomp filter, or a user namespace without them in the "
            "initial namespace is denying it")


_CAP_HINT = {
    "bpf": "needs CAP_BPF (or CAP_SYS_ADMIN): run as root or grant the capability",
    "prog": "needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN): run as root or grant the capabilities",
    "net": "needs CAP_NET_ADMIN (and CAP_BPF for BPF objects): run as root or grant the capabilities",
    "sysadmin": "needs CAP_SYS_ADMIN: getting another process's BPF object by id is privileged",
}

# Operations whose EPERM is a privilege problem of a specific capability.
_OP_CAPABILITY: dict[Op, str] = {
    Op.PROG_LOAD: "prog",
    Op.MAP_CREATE: "bpf",
    Op.MAP_LOOKUP: "bpf",
    Op.MAP_UPDATE: "bpf",
    Op.MAP_DELETE: "bpf",
    Op.MAP_GET_NEXT_KEY: "bpf",
    Op.MAP_INFO: "bpf",
    Op.MAP_GET_FD_BY_ID: "sysadmin",
    Op.OBJECT_LOAD: "net",
    Op.OBJ_PIN: "bpf",
    Op.OBJ_GET: "bpf",
    Op.PROG_GET_FD_BY_ID: "sysadmin",
    Op.LINK_GET_FD_BY_ID: "sysadmin",
    Op.PROG_QUERY: "net",
    Op.LINK_CREATE: "net",
    Op.LINK_UPDATE: "net",
    Op.LINK_DETACH: "net",
    Op.NETLINK: "net",
}

_BY_ERRNO: dict[int, tuple[type[TCError], str]] = {
    _errno.ENODEV: (DeviceNotFound, "check the device name or ifindex in the session's namespace"),
    _errno.ENXIO: (DeviceNotFound, "check the device name or ifindex in the session's namespace"),
    _errno.EEXIST: (AlreadyAttached, "the program is already on this hook; detach it first or use update()"),
    _errno.ESTALE: (StaleRevision, "the hook changed since you read its revision; query() again and retry"),
    _errno.ERANGE: (HookFull, "the hook holds 63 tcx programs already; detach one first"),
    _errno.ENOLINK: (Severed, "the device or hook is gone; the attachment was severed by the kernel"),
    _errno.EBADF: (ProgramError, "the program fd is closed or not a BPF program"),
    _errno.EACCES: (PermissionDenied, "the kernel denied access"),
    _errno.EPERM: (PermissionDenied, "the kernel refused for lack of privilege"),
}

# Where one operation gives an errno a different meaning, the (op, errno) pair decides.
_BY_OP: dict[tuple[Op, int], tuple[type[TCError], str]] = {
    (Op.LINK_UPDATE_CAS, _errno.EPERM): (
        Conflict,
        "another program is on the hook now; nothing was changed. query() and retry with the current one",
    ),
    (Op.LINK_CREATE, _errno.EINVAL): (
        ProgramError,
        "the kernel refused the program for this hook: it must be a BPF_PROG_TYPE_SCHED_CLS program",
    ),
    (Op.LINK_CREATE, _errno.ENOENT): (
        AnchorNotFound,
        "the Before/After anchor is not on this hook; query() the hook and anchor to a program on it",
    ),
    (Op.LINK_UPDATE, _errno.EINVAL): (
        ProgramError,
        "the kernel refused the new program for this link: it must be a SCHED_CLS program",
    ),
    (Op.PROG_GET_FD_BY_ID, _errno.ENOENT): (ProgramError, "no BPF program has this id (it was unloaded?)"),
    (Op.MAP_GET_FD_BY_ID, _errno.ENOENT): (TCError, "no BPF map has this id (it was freed?)"),
    (Op.MAP_UPDATE, _errno.E2BIG): (
        TCError,
        "the map is full (or the key is past the end of an array): delete entries, or declare more max_entries",
    ),
    (Op.MAP_UPDATE, _errno.ENOMEM): (TCError, "the kernel could not allocate the element"),
    (Op.MAP_DELETE, _errno.EINVAL): (
        TCError,
        "this kind of map cannot delete elements (arrays keep every key): update the value instead",
    ),
    (Op.LINK_GET_FD_BY_ID, _errno.ENOENT): (Severed, "no BPF link has this id any more"),
    (Op.PROG_LOAD, _errno.EINVAL): (ProgramError, "the verifier or the loader refused the program"),
    (Op.PROG_LOAD, _errno.EACCES): (ProgramError, "the verifier refused the program"),
    (Op.OBJ_GET, _errno.ENOENT): (PinError, "nothing is pinned at this path"),
    (Op.OBJ_GET, _errno.EACCES): (
        PinError,
        "not a bpffs object: BPF_OBJ_GET opens only pins on a bpffs mount (or the pin's mode does not let "
        "this user open it)",
    ),
    (Op.OBJ_GET, _errno.EPERM): (
        PinError,
        "the path is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` and pin under it",
    ),
    (Op.OBJ_GET, _errno.EINVAL): (
        PinError,
        "the path is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` and pin under it",
    ),
    (Op.OBJ_PIN, _errno.EEXIST): (PinError, "something is already pinned at this path; unpin it or pick another"),
    (Op.OBJ_PIN, _errno.ENOENT): (PinError, "the directory of the pin path does not exist on bpffs"),
    (Op.OBJ_PIN, _errno.EPERM): (
        PinError,
        "the path is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` and pin under it",
    ),
    (Op.OBJ_PIN, _errno.EINVAL): (
        PinError,
        "the path is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` and pin under it",
    ),
    (Op.FILTER_ADD, _errno.ENOENT): (
        DeviceNotFound,
        "the clsact qdisc or the device is gone; attach again to recreate it",
    ),
    (Op.FILTER_REPLACE, _errno.ENOENT): (Severed, "the filter is gone: someone deleted it or its qdisc"),
    (Op.FILTER_DELETE, _errno.ENOENT): (Severed, "the filter is gone: someone deleted it or its qdisc"),
    (Op.FILTER_GET, _errno.ENOENT): (Severed, "the filter is gone: someone deleted it or its qdisc"),
    (Op.FILTER_ADD_HW, _errno.EINVAL): (
        OffloadError,
        "the device refused hardware offload (skip_sw); use offload='prefer' or 'never' to run in software",
    ),
    (Op.FILTER_ADD_HW, _errno.EOPNOTSUPP): (
        OffloadError,
        "the device does not support hardware offload; use offload='prefer' or 'never'",
    ),
    (Op.FILTER_REPLACE_HW, _errno.EINVAL): (
        OffloadError,
        "the hardware refused the new program; the update was aborted and the old program keeps running",
    ),
    (Op.FILTER_REPLACE_HW, _errno.EOPNOTSUPP): (
        OffloadError,
        "the hardware refused the new program; the update was aborted and the old program keeps running",
    ),
    (Op.CLSACT_ADD, _errno.EEXIST): (
        AlreadyAttached,
        "an ingress qdisc is in the way (clsact cannot share a device with it): delete it "
        "(tc qdisc del dev DEV ingress) or use the bpf_link backend (tcx works beside it)",
    ),
    (Op.QDISC_ADD, _errno.EEXIST): (
        AlreadyAttached,
        "another root/ingress qdisc is in the way; delete it or use the bpf_link backend",
    ),
}


def _describe(
    op: str,
    *,
    backend: str | None,
    dev: str | int | None,
    direction: object | None,
    program: object | None,
) -> str:
    parts = [op.replace("_", " ")]
    if dev is not None:
        parts.append(f"on {dev!s}" + (f" {direction!s}" if direction is not None else ""))
    if program is not None:
        parts.append(f"with {program!s}")
    if backend is not None:
        parts.append(f"[{backend} backend]")
    return " ".join(parts)


def from_errno(
    err: int,
    *,
    op: Op | str,
    backend: str | None = None,
    dev: str | int | None = None,
    direction: object | None = None,
    program: object | None = None,
    detail: str | None = None,
) -> TCError:
    """Build the exception for a failed kernel call.

    Args:
        err: the positive errno the kernel returned.
        op: the operation attempted, an `Op` (e.g. `Op.LINK_CREATE`) or its value ("link_create"; an
            unknown name is a ValueError, so a misspelt operation never silently loses its meaning); some
            operations give an errno a meaning of their own (EPERM from a compare-and-swap link update is a
            `Conflict`).
        backend, dev, direction, program: what the operation was about, for the message.
        detail: the kernel's own words where it gave some (netlink extended ACK, verifier log).
    """
    op = Op(op)
    cls, hint = _BY_OP.get((op, err)) or _BY_ERRNO.get(err) or (TCError, "")
    if cls is PermissionDenied:
        cap = _OP_CAPABILITY.get(Op(op.removesuffix("_cas")), "net")
        hint = _cap_hint(cap)
    what = _describe(op, backend=backend, dev=dev, direction=direction, program=program)
    name = _errno.errorcode.get(err, str(err))
    msg = f"{what} failed: {name} ({os.strerror(err)})"
    if detail:
        msg += f": {detail}"
    if hint:
        msg += f"; {hint}"
    return cls(msg, errno=err)


@contextmanager
def translated(
    op: Op | str | None = None,
    *,
    backend: str | None = None,
    dev: str | int | None = None,
    direction: object | None = None,
    program: object | None = None,
) -> Iterator[None]:
    """Turn a raw kernel error raised in the block into asynctc's exception, once, at a backend's edge.

    Low-level code (`asynctc.lowlevel`: bpf(2), the netlink transport) raises the kernel's errno raw, as an
    OSError (`BpfError`, `NetlinkError`) whose `detail` holds the kernel's own words where it gave some;
    the code that attempted the operation knows what it was about and wraps the call:

        with translated(Op.FILTER_ADD, backend=self.name, dev=dev, direction=direction, program=prog):
            await nl.request(build)

    `op` None: the operation the raw error names (its `op`: a block that runs several). asynctc's own
    exceptions pass through unchanged; an OSError without an errno too."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        detail = getattr(exc, "detail", None)
        if op is None:
            op = getattr(exc, "op", None) or Op.NETLINK
        raise from_errno(exc.errno, op=op, backend=backend, dev=dev, direction=direction, program=program,
                         detail=detail if isinstance(detail, str) and detail else None) from None
