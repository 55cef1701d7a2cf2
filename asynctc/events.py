"""Events: what a monitor (`Session.open_monitor`) delivers, and what the attachment-event hook observes.

All events are frozen. Kernel events (devices, qdiscs, filters) come from the backend's event source
(netlink multicast on a real kernel, the MockKernel on the mock); `AttachmentSevered` and `Resynced` come
from the session's own bookkeeping.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

from ._types import AttachmentInfo, Direction

if TYPE_CHECKING:
    from ._attachment import Attachment

__all__ = [
    "AttachmentEvent",
    "AttachmentSevered",
    "DeviceAdded",
    "DeviceRemoved",
    "Event",
    "EventSource",
    "EventsDropped",
    "FilterAdded",
    "FilterRemoved",
    "KernelEvent",
    "QdiscAdded",
    "QdiscRemoved",
    "Resynced",
]


@dataclass(frozen=True, slots=True)
class DeviceAdded:
    """A network device appeared in the namespace."""

    ifindex: int
    name: str


@dataclass(frozen=True, slots=True)
class DeviceRemoved:
    """A network device was deleted (or left the namespace). Its tcx links are severed by the kernel."""

    ifindex: int
    name: str


@dataclass(frozen=True, slots=True)
class QdiscAdded:
    """A qdisc was created. `kind` is e.g. "clsact", "ingress", "noqueue"."""

    ifindex: int
    kind: str
    handle: int
    parent: int


@dataclass(frozen=True, slots=True)
class QdiscRemoved:
    """A qdisc was deleted; deleting clsact deletes every filter on it."""

    ifindex: int
    kind: str
    handle: int
    parent: int


@dataclass(frozen=True, slots=True)
class FilterAdded:
    """A tc filter was added (or replaced). `direction` is the hook it runs on: ffff:fff2/ffff:fff3 on a
    clsact qdisc, and INGRESS for every filter of a legacy `ingress` qdisc whatever parent spelling the
    kernel reports; None for filters outside the hooks (on other qdiscs). A u32 filter is reported by its
    key (800::800), never by its hash table.

    `prog_id` is the BPF program of a cls_bpf filter (None for other classifiers); `owned` says whether
    the monitoring session owns it.
    """

    ifindex: int
    direction: Direction | None
    priority: int
    handle: int
    kind: str
    prog_id: int | None
    owned: bool


@dataclass(frozen=True, slots=True)
class FilterRemoved:
    """A tc filter was deleted (one by one, or a whole chain flushed: then priority/handle may be 0)."""

    ifindex: int
    direction: Direction | None
    priority: int
    handle: int
    kind: str
    prog_id: int | None
    owned: bool


@dataclass(frozen=True, slots=True)
class AttachmentSevered:
    """The kernel severed one of the session's attachments; `reason` says how (device deleted, ...)."""

    attachment: Attachment
    reason: str


@dataclass(frozen=True, slots=True)
class Resynced:
    """Events were lost (the kernel's buffer overflowed); the monitor re-read the kernel's state and
    delivered the differences as ordinary events just before this one. State is again the kernel's."""

    reason: str


@dataclass(frozen=True, slots=True)
class EventsDropped:
    """This monitor's consumer fell behind and `count` events were dropped for it alone (the bounded
    buffer was full). Other monitors and the session were not affected. Re-query what you need."""

    count: int


KernelEvent: TypeAlias = DeviceAdded | DeviceRemoved | QdiscAdded | QdiscRemoved | FilterAdded | FilterRemoved
Event: TypeAlias = KernelEvent | AttachmentSevered | Resynced | EventsDropped


@dataclass(frozen=True, slots=True)
class AttachmentEvent:
    """What `asynctc_attachment_event` observes: an attachment was attached, updated, detached or severed.

    `info` is the attachment's info after the event; `method` is the update method (for "update").
    """

    kind: Literal["attach", "update", "detach", "sever"]
    info: AttachmentInfo
    attachment: Attachment
    method: str | None = None
    reason: str | None = None


class EventSource(abc.ABC):
    """A stream of kernel events for one namespace. `receive()` returns the next batch (never empty).

    When events were lost, the source re-reads the kernel's state, returns the differences as ordinary
    events and then a `Resynced` (in the same batch or the next). A backend's `open_event_source()`
    returns an async context manager of one; `asynctc.lowlevel.events.open_netlink_event_source` is the
    rtnetlink one the built-in backends share, for any backend on the real kernel.
    """

    @abc.abstractmethod
    async def receive(self) -> list[KernelEvent | Resynced]: ...
