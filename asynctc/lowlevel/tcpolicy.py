"""Legacy-tc policy shared by every backend that places cls_bpf filters (pure: no trio, no kernel calls):
priority choice for positions and the owner tag recorded in a filter's TCA_BPF_NAME. The netlink backend
and the mock backend's legacy mode both use these, so that they place and name filters identically.

Priorities (cls_bpf runs filters of one hook in ascending priority, 1..65535). A position becomes a free
priority relative to the priorities in use on the hook, whoever's filters they are (u32 filters count
too): First() goes below the lowest, Last() above the highest, Before/After(anchor) strictly between the
anchor and its neighbour. Room is left on both sides (PRIO_BASE for an empty hook, PRIO_STEP past an end)
so that later First()/Last() attaches find a gap; between two neighbours the midpoint is taken. When no
integer lies strictly between, there is no gap: other owners' filters are never moved to make one, the
caller is told to pass `priority=` explicitly.

`place_filter` applies that rule to a backend's Placement and raises the errors every backend raises for it:
AnchorNotFound (ENOENT) when a Before/After anchor is not a cls_bpf filter on the hook (a tcx program
always runs before filters), HookFull (ERANGE) when there is no gap.

Owner tag (TCA_BPF_NAME), so that ownership can be proven from the kernel alone after a restart:

    asynctc:OWNER:PID.START.SERIAL:PROGNAME            an attachment of a live or dead session
    asynctc:OWNER:PID.START.SERIAL:PROGNAME:pinned     the same, pinned (never reaped as an orphan)

OWNER is the session's owner (no ':'), PID.START.SERIAL its process id, the process's start time in
clock ticks (field 22 of /proc/PID/stat) and the session's serial; PROGNAME the BPF program's name
(BPF names hold only [A-Za-z0-9_.], never ':').
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from .._errors import AnchorNotFound, HookFull
from .._types import Direction, Placement

__all__ = [
    "AUTO_PRIORITY_ATTEMPTS",
    "DEFAULT_HANDLE",
    "PINNED_MARK",
    "PRIO_BASE",
    "PRIO_END",
    "PRIO_STEP",
    "TAG_PREFIX",
    "FilterTag",
    "between",
    "choose_priority",
    "filter_slot_options",
    "format_session_tag",
    "format_tag",
    "parse_session_tag",
    "parse_tag",
    "place_filter",
    "process_alive",
    "process_start_time",
]

PRIO_BASE: Final = 0x8000
"""The priority of the first filter on an empty hook (room on both sides)."""
PRIO_STEP: Final = 0x100
"""The gap left past the lowest/highest priority for First()/Last()."""
PRIO_END: Final = 0x10000
"""One past the highest priority (priorities are 16-bit; 0 means "let the kernel choose")."""
DEFAULT_HANDLE: Final = 1
"""The filter handle used when none is given (the kernel turns a cls_bpf handle 0 into 1 anyway)."""
AUTO_PRIORITY_ATTEMPTS: Final = 3
"""How often an automatically chosen priority is chosen again when another process took it (EEXIST)."""

TAG_PREFIX: Final = "asynctc"
"""The first field of every owner tag."""
PINNED_MARK: Final = "pinned"
"""The last field of a pinned filter's owner tag."""


def between(lo: int, hi: int) -> int | None:
    """A priority strictly between lo and hi (0 and PRIO_END stand for the open ends), leaving room:
    PRIO_STEP away from the one real neighbour at an end, the midpoint between two; None if no gap."""
    if hi - lo <= 1:
        return None
    if lo == 0 and hi - PRIO_STEP > 0:
        return hi - PRIO_STEP
    if hi == PRIO_END and lo + PRIO_STEP < PRIO_END:
        return lo + PRIO_STEP
    return (lo + hi) // 2


def choose_priority(
    where: Literal["first", "last", "before", "after"],
    priorities: set[int] | frozenset[int] | list[int],
    anchor: int | None = None,
) -> int | None:
    """The priority for a new filter placed `where` among the hook's `priorities` (of every filter on it).

    For "before"/"after", `anchor` is the anchor filter's priority (it must be among `priorities`).
    Returns None when there is no free priority there.
    """
    prios = sorted(set(priorities))
    if any(not 1 <= p < PRIO_END for p in prios):
        raise ValueError(f"priorities must be in 1..{PRIO_END - 1}, got {prios}")
    if where == "first":
        return between(0, prios[0]) if prios else PRIO_BASE
    if where == "last":
        return between(prios[-1], PRIO_END) if prios else PRIO_BASE
    if anchor is None or anchor not in prios:
        raise ValueError(f"a {where!r} placement needs the anchor's priority among {prios}, got {anchor!r}")
    i = prios.index(anchor)
    if where == "before":
        return between(prios[i - 1] if i > 0 else 0, anchor)
    if where == "after":
        return between(anchor, prios[i + 1] if i + 1 < len(prios) else PRIO_END)
    raise ValueError(f"where must be 'first', 'last', 'before' or 'after', got {where!r}")


def filter_slot_options(options: Mapping[str, object]) -> tuple[int | None, int]:
    """(priority or None, handle) from the `priority=` (1..65535; None: the position chooses) and `handle=`
    (1..0xffffffff, default DEFAULT_HANDLE) attach options; ValueError naming the accepted values. Other
    options are the backend's to check."""
    priority = options.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)
                                 or not 1 <= priority <= 0xFFFF):
        raise ValueError(f"priority must be an int in 1..65535 (a cls_bpf filter priority), got {priority!r}")
    handle = options.get("handle", DEFAULT_HANDLE)
    if isinstance(handle, bool) or not isinstance(handle, int) or not 1 <= handle <= 0xFFFFFFFF:
        raise ValueError(f"handle must be an int in 1..0xffffffff, got {handle!r}")
    return priority, handle


def place_filter(
    placement: Placement,
    filters: Iterable[tuple[int, int, str | None, int | None]],
    *,
    dev: str,
    direction: Direction,
    backend: str,
) -> int:
    """The priority for a new filter at `placement` among the hook's `filters`, given as (priority, handle,
    kind, prog_id) of every filter on it (any classifier). A Before/After anchor is the cls_bpf filter in
    the placement's (priority, handle) slot where it names one, else the one running its program.

    Raises AnchorNotFound (ENOENT) when the anchor is not a cls_bpf filter on the hook and HookFull
    (ERANGE) when no free priority is left there; `dev`, `direction` and `backend` go into the messages.
    """
    slots = list(filters)
    anchor_prio: int | None = None
    if placement.where in ("before", "after"):
        if placement.priority is not None and placement.handle is not None:
            key: tuple[int | None, ...] = (placement.priority, placement.handle)
            anchor = next((f for f in slots if f[2] == "bpf" and (f[0], f[1]) == key), None)
        else:
            anchor = next((f for f in slots if f[2] == "bpf" and f[3] == placement.prog_id), None)
        if anchor is None:
            raise AnchorNotFound(
                f"the anchor (program {placement.prog_id}) is not a cls_bpf filter on {dev} {direction} "
                f"[{backend} backend]; tcx programs always run before filters, so a filter cannot be placed "
                "relative to one. query() the hook and anchor to a filter", errno=_errno.ENOENT)
        anchor_prio = anchor[0]
    got = choose_priority(placement.where, {f[0] for f in slots}, anchor_prio)
    if got is None:
        where = placement.where if anchor_prio is None else f"{placement.where} priority {anchor_prio}"
        raise HookFull(
            f"no free filter priority {where} on {dev} {direction} [{backend} backend]: the neighbouring "
            "priorities are taken and other owners' filters are never moved; pass priority= explicitly "
            "(1..65535)", errno=_errno.ERANGE)
    return got


@dataclass(frozen=True, slots=True)
class FilterTag:
    """A parsed owner tag (see the module docstring)."""

    owner: str
    pid: int
    start: str
    serial: int
    prog_name: str
    pinned: bool

    @property
    def session_tag(self) -> str:
        """"owner:pid.start.serial", as `BackendContext.session_tag` spells it."""
        return format_session_tag(self.owner, self.pid, self.start, self.serial)


def format_session_tag(owner: str, pid: int, start: str, serial: int) -> str:
    """The session tag "owner:pid.start.serial" (`BackendContext.session_tag`): the session's owner, its
    process id and that process's start time (`process_start_time`; "0" when unknown), and the session's
    serial in the process. `parse_session_tag` reads it back; nothing else spells or splits it."""
    return f"{owner}:{pid}.{start or '0'}.{serial}"


def format_tag(session_tag: str, prog_name: str, *, pinned: bool = False) -> str:
    """The TCA_BPF_NAME of a filter made by the session `session_tag` ("owner:pid.start.serial")."""
    name = f"{TAG_PREFIX}:{session_tag}:{prog_name}"
    return f"{name}:{PINNED_MARK}" if pinned else name


def parse_tag(name: str | None) -> FilterTag | None:
    """The owner tag in a filter's TCA_BPF_NAME, or None if it is not one of asynctc's."""
    if not name:
        return None
    parts = name.split(":")
    if len(parts) not in (4, 5) or parts[0] != TAG_PREFIX:
        return None
    pinned = len(parts) == 5
    if pinned and parts[4] != PINNED_MARK:
        return None
    session = parse_session_tag(f"{parts[1]}:{parts[2]}")
    if session is None:
        return None
    owner, pid, start, serial = session
    return FilterTag(owner=owner, pid=pid, start=start, serial=serial, prog_name=parts[3], pinned=pinned)


def parse_session_tag(tag: str) -> tuple[str, int, str, int] | None:
    """Split a session tag "owner:pid.start.serial" (`BackendContext.session_tag`) into (owner, pid,
    start, serial); None if `tag` is not one. Owners hold no ':', '/', white space or NUL."""
    owner, sep, ident = tag.partition(":")
    if not sep or not owner or any(c in owner for c in "/\0") or any(c.isspace() for c in owner):
        return None
    parts = ident.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return owner, int(parts[0]), parts[1], int(parts[2])


_STARTTIME: Final = 22 - 3  # field 22 of /proc/PID/stat, indexed among the fields after "pid (comm)"


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (field 22 of /proc/PID/stat): with the
    pid it names a process uniquely, even after the pid is reused. None if there is no such process; ""
    if its stat line cannot be read as expected."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # from field 3 on: "pid (comm)" may hold spaces
    return fields[_STARTTIME] if len(fields) > _STARTTIME else ""


def process_alive(pid: int, start: str) -> bool:
    """Whether process `pid` exists and started at `start`: a reused pid of another process does not
    count. A stat line that cannot be read counts as alive (when in doubt, nothing is an orphan)."""
    now = process_start_time(pid)
    return now is not None and now in (start, "")
