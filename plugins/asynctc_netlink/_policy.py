"""Pure rules of the netlink backend, kept apart from any kernel call so that they can be unit-tested:
priority choice for positions, the owner tag recorded in TCA_BPF_NAME, and the pin record's layout.

Priorities (cls_bpf runs filters of one hook in ascending priority, 1..65535). A position becomes a free
priority relative to the priorities in use on the hook, whoever's filters they are (u32 filters count
too): First() goes below the lowest, Last() above the highest, Before/After(anchor) strictly between the
anchor and its neighbour. Room is left on both sides (PRIO_BASE for an empty hook, PRIO_STEP past an end)
so that later First()/Last() attaches find a gap; between two neighbours the midpoint is taken. When no
integer lies strictly between, there is no gap: other owners' filters are never moved to make one, the
caller is told to pass `priority=` explicitly. These are the same rules as the mock backend's legacy mode.

Owner tag (TCA_BPF_NAME), so that ownership can be proven from the kernel alone after a restart:

    asynctc:OWNER:PID.START.SERIAL:PROGNAME            an attachment of a live or dead session
    asynctc:OWNER:PID.START.SERIAL:PROGNAME:pinned     the same, pinned (never reaped as an orphan)

OWNER is the session's owner (no ':'), PID.START.SERIAL its process id, the process's start time in
clock ticks (field 22 of /proc/PID/stat) and the session's serial; PROGNAME the BPF program's name
(BPF names hold only [A-Za-z0-9_.], never ':').
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Literal

from asynctc import Direction

__all__ = [
    "PRIO_BASE",
    "PRIO_END",
    "PRIO_STEP",
    "RECORD_SIZE",
    "FilterTag",
    "PinRecord",
    "between",
    "choose_priority",
    "format_tag",
    "parse_tag",
]

PRIO_BASE: Final = 0x8000
"""The priority of the first filter on an empty hook (room on both sides)."""
PRIO_STEP: Final = 0x100
"""The gap left past the lowest/highest priority for First()/Last()."""
PRIO_END: Final = 0x10000
"""One past the highest priority (priorities are 16-bit; 0 means "let the kernel choose")."""

TAG_PREFIX: Final = "asynctc"
PINNED_MARK: Final = "pinned"


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
        return f"{self.owner}:{self.pid}.{self.start}.{self.serial}"


def format_tag(session_tag: str, prog_name: str, *, pinned: bool = False) -> str:
    """The TCA_BPF_NAME of a filter made by the session `session_tag` ("owner:pid.start.serial")."""
    name = f"{TAG_PREFIX}:{session_tag}:{prog_name}"
    return f"{name}:{PINNED_MARK}" if pinned else name


def parse_tag(name: str | None) -> FilterTag | None:
    """The owner tag in a filter's TCA_BPF_NAME, or None if it is not one of asynctc's."""
    if not name:
        return None
    parts = name.split(":")
    if len(parts) not in (4, 5) or parts[0] != TAG_PREFIX or not parts[1]:
        return None
    pinned = len(parts) == 5
    if pinned and parts[4] != PINNED_MARK:
        return None
    ident = parts[2].split(".")
    if len(ident) != 3 or not all(x.isdigit() for x in ident):
        return None
    return FilterTag(owner=parts[1], pid=int(ident[0]), start=ident[1], serial=int(ident[2]),
                     prog_name=parts[3], pinned=pinned)


# --- the pin record -------------------------------------------------------------------------------------

RECORD_MAGIC: Final = b"ATCNL\x00\x01\x00"
_RECORD_HEAD: Final = struct.Struct("<8sIIIIIQ")  # magic, ifindex, direction, priority, handle, prog_id, netns
RECORD_SIZE: Final = 256
_NAME_ROOM: Final = RECORD_SIZE - _RECORD_HEAD.size
_DIRECTIONS: Final = (Direction.INGRESS, Direction.EGRESS)


@dataclass(frozen=True, slots=True)
class PinRecord:
    """What a pinned netlink attachment records beside its program: the 256-byte value of a one-entry
    BPF array map (bpffs holds only BPF objects). `netns` is the inode of the namespace the filter is in;
    `name` the filter's TCA_BPF_NAME when it was pinned."""

    ifindex: int
    direction: Direction
    priority: int
    handle: int
    prog_id: int
    netns: int
    name: str

    def encode(self) -> bytes:
        name = self.name.encode()
        if len(name) > _NAME_ROOM:
            raise ValueError(f"filter name too long for a pin record ({len(name)} > {_NAME_ROOM} bytes)")
        head = _RECORD_HEAD.pack(RECORD_MAGIC, self.ifindex, _DIRECTIONS.index(self.direction), self.priority,
                                 self.handle, self.prog_id, self.netns)
        return head + name.ljust(_NAME_ROOM, b"\0")

    @classmethod
    def decode(cls, data: bytes) -> PinRecord | None:
        """The record in a map value, or None if it is not one (another map pinned there)."""
        if len(data) != RECORD_SIZE:
            return None
        magic, ifindex, direction, priority, handle, prog_id, netns = _RECORD_HEAD.unpack_from(data)
        if magic != RECORD_MAGIC or direction > 1:
            return None
        name = data[_RECORD_HEAD.size:].split(b"\0", 1)[0].decode(errors="replace")
        return cls(ifindex=ifindex, direction=_DIRECTIONS[direction], priority=priority, handle=handle,
                   prog_id=prog_id, netns=netns, name=name)
