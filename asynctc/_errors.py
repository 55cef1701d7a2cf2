"""The error hierarchy, and the one place where kernel errnos become asynctc exceptions.

Every backend translates a failed kernel call with `from_errno(errno, op=..., ...)`: the exception class is
chosen by errno (refined by the operation where the kernel reuses an errno), and the message says what was
attempted (operation, device, direction, program, backend), what the kernel said, and what to do about it.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Sequence

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
]


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
_OP_CAPABILITY = {
    "prog_load": "prog",
    "map_create": "bpf",
    "map_lookup": "bpf",
    "map_update": "bpf",
    "map_delete": "bpf",
    "map_get_next_key": "bpf",
    "map_info": "bpf",
    "map_get_fd_by_id": "sysadmin",
    "object_load": "net",
    "obj_pin": "bpf",
    "obj_get": "bpf",
    "prog_get_fd_by_id": "sysadmin",
    "link_get_fd_by_id": "sysadmin",
    "prog_query": "net",
    "link_create": "net",
    "link_update": "net",
    "link_detach": "net",
    "netlink": "net",
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
_BY_OP: dict[tuple[str, int], tuple[type[TCError], str]] = {
    ("link_update_cas", _errno.EPERM): (
        Conflict,
        "another program is on the hook now; nothing was changed. query() and retry with the current one",
    ),
    ("link_create", _errno.EINVAL): (
        ProgramError,
        "the kernel refused the program for this hook: it must be a BPF_PROG_TYPE_SCHED_CLS program",
    ),
    ("link_create", _errno.ENOENT): (
        AnchorNotFound,
        "the Before/After anchor is not on this hook; query() the hook and anchor to a program on it",
    ),
    ("prog_attach", _errno.ENOENT): (
        AnchorNotFound,
        "the Before/After anchor is not on this hook; query() the hook and anchor to a program on it",
    ),
    ("link_update", _errno.EINVAL): (
        ProgramError,
        "the kernel refused the new program for this link: it must be a SCHED_CLS program",
    ),
    ("prog_get_fd_by_id", _errno.ENOENT): (ProgramError, "no BPF program has this id (it was unloaded?)"),
    ("map_get_fd_by_id", _errno.ENOENT): (TCError, "no BPF map has this id (it was freed?)"),
    ("map_update", _errno.E2BIG): (
        TCError,
        "the map is full (or the key is past the end of an array): delete entries, or declare more max_entries",
    ),
    ("map_update", _errno.ENOMEM): (TCError, "the kernel could not allocate the element"),
    ("map_delete", _errno.EINVAL): (
        TCError,
        "this kind of map cannot delete elements (arrays keep every key): update the value instead",
    ),
    ("link_get_fd_by_id", _errno.ENOENT): (Severed, "no BPF link has this id any more"),
    ("prog_load", _errno.EINVAL): (ProgramError, "the verifier or the loader refused the program"),
    ("prog_load", _errno.EACCES): (ProgramError, "the verifier refused the program"),
    ("obj_get", _errno.ENOENT): (PinError, "nothing is pinned at this path"),
    ("obj_get", _errno.EACCES): (
        PinError,
        "not a bpffs object: BPF_OBJ_GET opens only pins on a bpffs mount (or the pin's mode does not let "
        "this user open it)",
    ),
    ("obj_get", _errno.EPERM): (
        PinError,
        "the path is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` and pin under it",
    ),
    ("obj_get", _errno.EINVAL): (
        PinError,
        "the path is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` and pin under it",
    ),
    ("obj_pin", _errno.EEXIST): (PinError, "something is already pinned at this path; unpin it or pick another"),
    ("obj_pin", _errno.ENOENT): (PinError, "the directory of the pin path does not exist on bpffs"),
    ("obj_pin", _errno.EPERM): (
        PinError,
        "the path is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` and pin under it",
    ),
    ("obj_pin", _errno.EINVAL): (
        PinError,
        "the path is not on a bpffs mount; mount one with `mount -t bpf bpf /sys/fs/bpf` and pin under it",
    ),
    ("filter_add", _errno.ENOENT): (
        DeviceNotFound,
        "the clsact qdisc or the device is gone; attach again to recreate it",
    ),
    ("filter_replace", _errno.ENOENT): (Severed, "the filter is gone: someone deleted it or its qdisc"),
    ("filter_delete", _errno.ENOENT): (Severed, "the filter is gone: someone deleted it or its qdisc"),
    ("filter_get", _errno.ENOENT): (Severed, "the filter is gone: someone deleted it or its qdisc"),
    ("filter_add_hw", _errno.EINVAL): (
        OffloadError,
        "the device refused hardware offload (skip_sw); use offload='prefer' or 'never' to run in software",
    ),
    ("filter_add_hw", _errno.EOPNOTSUPP): (
        OffloadError,
        "the device does not support hardware offload; use offload='prefer' or 'never'",
    ),
    ("filter_replace_hw", _errno.EINVAL): (
        OffloadError,
        "the hardware refused the new program; the update was aborted and the old program keeps running",
    ),
    ("filter_replace_hw", _errno.EOPNOTSUPP): (
        OffloadError,
        "the hardware refused the new program; the update was aborted and the old program keeps running",
    ),
    ("clsact_add", _errno.EEXIST): (
        AlreadyAttached,
        "an ingress qdisc is in the way (clsact cannot share a device with it): delete it "
        "(tc qdisc del dev DEV ingress) or use the bpf_link backend (tcx works beside it)",
    ),
    ("qdisc_add", _errno.EEXIST): (
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
    op: str,
    backend: str | None = None,
    dev: str | int | None = None,
    direction: object | None = None,
    program: object | None = None,
    detail: str | None = None,
) -> TCError:
    """Build the exception for a failed kernel call.

    Args:
        err: the positive errno the kernel returned.
        op: the operation attempted, e.g. "link_create", "filter_add", "obj_pin"; some operations give an
            errno a meaning of their own (EPERM from a compare-and-swap link update is a `Conflict`).
        backend, dev, direction, program: what the operation was about, for the message.
        detail: the kernel's own words where it gave some (netlink extended ACK, verifier log).
    """
    cls, hint = _BY_OP.get((op, err)) or _BY_ERRNO.get(err) or (TCError, "")
    if cls is PermissionDenied:
        cap = _OP_CAPABILITY.get(op.removesuffix("_cas"), "net")
        hint = _cap_hint(cap)
    what = _describe(op, backend=backend, dev=dev, direction=direction, program=program)
    name = _errno.errorcode.get(err, str(err))
    msg = f"{what} failed: {name} ({os.strerror(err)})"
    if detail:
        msg += f": {detail}"
    if hint:
        msg += f"; {hint}"
    return cls(msg, errno=err)
