"""Frozen value types of the public API: directions, positions, hook contents, results."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias, Union

if TYPE_CHECKING:
    from ._attachment import Attachment
    from ._program import Program


class Direction(enum.StrEnum):
    """The traffic-control hook a program runs in: packets arriving on, or leaving, a device."""

    INGRESS = "ingress"
    EGRESS = "egress"

    @classmethod
    def coerce(cls, value: Direction | str) -> Direction:
        """Accept a Direction or its name ("ingress"/"egress", any case); raise ValueError otherwise."""
        if isinstance(value, Direction):
            return value
        if isinstance(value, str):
            try:
                return cls(value.lower())
            except ValueError:
                pass
        raise ValueError(f"direction must be 'ingress' or 'egress' (or asynctc.Direction), got {value!r}")


class State(enum.Enum):
    """Where an Attachment is in its lifecycle."""

    ATTACHED = "attached"
    DETACHED = "detached"
    SEVERED = "severed"

    def __str__(self) -> str:
        return self.value


Offload: TypeAlias = Literal["never", "prefer", "require"]
OFFLOAD_MODES: tuple[str, ...] = ("never", "prefer", "require")

UpdateMethod: TypeAlias = Literal["link_update", "netlink_replace", "make_before_break"]

# What a relative position can be anchored to: a Program, an Attachment, or a program id.
Anchor: TypeAlias = Union["Program", "Attachment", int]


@dataclass(frozen=True, slots=True)
class First:
    """Run before every program present on the hook."""


@dataclass(frozen=True, slots=True)
class Last:
    """Run after every program present on the hook (the default)."""


@dataclass(frozen=True, slots=True)
class Before:
    """Run immediately before `anchor` (a Program, an Attachment or a program id) on the same hook."""

    anchor: Anchor


@dataclass(frozen=True, slots=True)
class After:
    """Run immediately after `anchor` (a Program, an Attachment or a program id) on the same hook."""

    anchor: Anchor


Position: TypeAlias = First | Last | Before | After


@dataclass(frozen=True, slots=True)
class AttachmentInfo:
    """What and where an attachment is.

    `link_id` is set for tcx links (bpf_link backend); `handle` and `priority` for cls_bpf filters
    (netlink backend). `netns` is the namespace name or path the session works in (None: the caller's).
    """

    backend: str
    netns: str | None
    dev: str
    ifindex: int
    direction: Direction
    prog_id: int
    link_id: int | None
    handle: int | None
    priority: int | None
    offloaded: bool
    pinned: str | None


@dataclass(frozen=True, slots=True)
class HookEntry:
    """One entry of a hook, as the kernel reports it: a tcx program or a legacy filter.

    `kind` is "tcx" for a tcx program (link or not), "cls_bpf" for a cls_bpf filter, and the classifier's
    tc kind ("u32", "flower", "matchall", ...) for any other legacy filter. Such a filter runs no BPF
    program: its `prog_id` is 0 and its `prog_name` and `prog_tag` are "" (as for a cls_bpf filter running
    a classic BPF program); `has_program` tells. Every legacy filter has its `priority` and `handle`;
    `link_id` is set only for tcx links. `owned` is True only for what the querying session created or
    adopted (never for an entry without a program).
    """

    prog_id: int
    prog_name: str
    prog_tag: str
    kind: str
    link_id: int | None
    handle: int | None
    priority: int | None
    owned: bool

    @property
    def has_program(self) -> bool:
        """Whether the entry runs a BPF program (prog_id is set): False for u32 and other classifiers."""
        return self.prog_id != 0


@dataclass(frozen=True, slots=True)
class Hook:
    """The entries of one device and direction in the order the kernel runs them: tcx programs first (in
    their array order), then the legacy filters by priority, the newest first within one priority.

    `revision` is the tcx revision of the hook (None where the hook has no revision, as legacy tc without
    tcx support).
    """

    revision: int | None
    entries: tuple[HookEntry, ...]

    @property
    def prog_ids(self) -> tuple[int, ...]:
        """The program ids in run order, of the entries that run one (u32 and other classifiers without a
        program are left out)."""
        return tuple(e.prog_id for e in self.entries if e.prog_id)


@dataclass(frozen=True, slots=True)
class UpdateResult:
    """How an Attachment.update was carried out and the hook's revision afterwards (None if it has none)."""

    method: UpdateMethod
    revision: int | None


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether a backend can work here, and why (or why not)."""

    available: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Placement:
    """Where to put a program, resolved by the core from a Position.

    `where` is "first", "last", "before" or "after". For "before"/"after", `prog_id` is the anchor's program
    and `link_id` its tcx link where the anchor was a link-based Attachment; `priority` and `handle` are the
    anchor's legacy filter where it was a cls_bpf Attachment.
    """

    where: Literal["first", "last", "before", "after"]
    prog_id: int | None = None
    link_id: int | None = None
    priority: int | None = None
    handle: int | None = None
