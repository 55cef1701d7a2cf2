"""The registry of a session's live attachments: one record per attachment, indexed by device, and the
ownership marks that `query()` and the monitor put on what the kernel reports.

A record is the mutable state behind one public `Attachment` handle. Only the lifecycle
(`asynctc._lifecycle`) changes records; everyone else reads them through the registry or the handle.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio

from ._types import AttachmentInfo, Direction, HookEntry, State
from .backend import Backend, BackendAttachment
from .lowlevel.devlock import Claim

if TYPE_CHECKING:
    from ._attachment import Attachment

__all__ = ["AttachmentRecord", "Registry"]

DEPARTED_MAX = 4096

_serials = itertools.count(1)
_serial_lock = threading.Lock()


def next_serial() -> int:
    """A process-wide serial number (attachments of every session are numbered in one sequence)."""
    with _serial_lock:
        return next(_serials)


class AttachmentRecord:
    """The state of one attachment: which backend holds it, the backend's own handle, where it is (`info`),
    its lifecycle state and the lock that serialises the operations on it."""

    __slots__ = ("__weakref__", "backend", "claim", "ended", "handle", "lock", "public", "released", "serial",
                 "sever_reason", "state")

    def __init__(self, backend: Backend[Any], handle: BackendAttachment,
                 public: Callable[[AttachmentRecord], Attachment]) -> None:
        self.serial = next_serial()
        self.backend = backend
        self.handle = handle
        self.state = State.ATTACHED
        self.lock = trio.Lock()
        self.ended = trio.Event()  # set when the state leaves ATTACHED
        self.released = False  # the session let go of it (pinned, at session close)
        self.sever_reason: str | None = None
        self.claim: Claim | None = None  # held while the session holds it pinned
        self.public: Attachment = public(self)  # the handle users hold, made over this record

    def drop_claim(self) -> None:
        claim, self.claim = self.claim, None
        if claim is not None:
            claim.release()

    @property
    def info(self) -> AttachmentInfo:
        return self.handle.info

    def change(self, **changes: object) -> None:
        """Apply changes to `info` (the core's record of where the attachment is; backends only read it)."""
        self.handle.info = dataclasses.replace(self.handle.info, **changes)  # type: ignore[arg-type]

    @property
    def live(self) -> bool:
        """Attached and still held by its session."""
        return self.state is State.ATTACHED and not self.released

    def end(self, state: State, reason: str | None = None) -> None:
        """Leave ATTACHED for good (DETACHED or SEVERED)."""
        self.state = state
        self.sever_reason = reason
        self.ended.set()


def entry_key(e: HookEntry) -> tuple[object, ...]:
    """What identifies a hook entry across queries: its tcx link, or its filter's priority and handle."""
    if e.kind == "tcx":
        return ("tcx", e.link_id)
    return (e.kind, e.priority, e.handle)


def _record_keys(info: AttachmentInfo) -> Iterator[tuple[object, ...]]:
    if info.link_id is not None:
        yield ("tcx", info.link_id)
    if info.priority is not None and info.handle is not None:
        yield ("cls_bpf", info.priority, info.handle)


class Registry:
    """A session's live attachments (attached, not severed, not detached), oldest first, with an index by
    device: the event watcher asks for one device's attachments on every kernel event."""

    def __init__(self) -> None:
        self._records: dict[int, AttachmentRecord] = {}
        self._by_device: dict[int, dict[int, AttachmentRecord]] = {}
        self._attaching: dict[int, int] = {}  # ifindex -> attaches in flight
        self._attach_done: trio.Event | None = None  # made by the first waiter, set by the next attach's end
        # Keys of filters that left the registry, until the kernel's removal event for them is seen (bounded:
        # a removal that is never reported must not grow it forever). tcx links have no removal event.
        self._departed: OrderedDict[tuple[object, ...], Direction] = OrderedDict()

    def add(self, record: AttachmentRecord) -> None:
        self._records[record.serial] = record
        self._by_device.setdefault(record.info.ifindex, {})[record.serial] = record

    # -- attaches in flight --------------------------------------------------------------------------
    def begin_attach(self, ifindex: int) -> None:
        """Mark an attach to `ifindex` in flight (until `end_attach`): the kernel may report its filter
        before the attachment is registered, and the event's `owned` flag must wait for it (`settled`)."""
        self._attaching[ifindex] = self._attaching.get(ifindex, 0) + 1

    def end_attach(self, ifindex: int) -> None:
        left = self._attaching[ifindex] - 1
        if left:
            self._attaching[ifindex] = left
        else:
            del self._attaching[ifindex]
        done, self._attach_done = self._attach_done, None
        if done is not None:
            done.set()

    async def _attach_ended(self) -> None:
        if self._attach_done is None:
            self._attach_done = trio.Event()
        await self._attach_done.wait()

    async def settled(self, ifindex: int) -> None:
        """Wait until no attach to `ifindex` is in flight (callers bound the wait)."""
        while self._attaching.get(ifindex):
            await self._attach_ended()

    async def all_settled(self) -> None:
        """Wait until no attach is in flight on any device (callers bound the wait)."""
        while self._attaching:
            await self._attach_ended()

    def remove(self, record: AttachmentRecord) -> None:
        info = record.info
        if info.priority is not None and info.handle is not None:  # a filter: its removal event may follow
            self._departed[(info.ifindex, "cls_bpf", info.priority, info.handle)] = info.direction
            if len(self._departed) > DEPARTED_MAX:
                self._departed.popitem(last=False)
        self._records.pop(record.serial, None)
        on_device = self._by_device.get(record.info.ifindex)
        if on_device is not None:
            on_device.pop(record.serial, None)
            if not on_device:
                del self._by_device[record.info.ifindex]

    def clear(self) -> None:
        self._records.clear()
        self._by_device.clear()
        self._departed.clear()

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[AttachmentRecord]:
        """Every live record, oldest first (a copy: safe to iterate while records come and go)."""
        return list(self._records.values())

    def on_device(self, ifindex: int) -> list[AttachmentRecord]:
        on_device = self._by_device.get(ifindex)
        return list(on_device.values()) if on_device else []

    def pinned_at(self, path: str) -> AttachmentRecord | None:
        for rec in self._records.values():
            if rec.info.pinned == path:
                return rec
        return None

    # -- ownership marks -----------------------------------------------------------------------------
    def owned_keys(self, ifindex: int, direction: Direction) -> set[tuple[object, ...]]:
        return {key for rec in self.on_device(ifindex) if rec.info.direction is direction
                for key in _record_keys(rec.info)}

    def mark_owned(self, entries: tuple[HookEntry, ...], ifindex: int, direction: Direction) -> tuple[HookEntry, ...]:
        """The entries with `owned` set for exactly those this session holds. An entry without a program
        (u32 and other classifiers) is never the session's: it only attaches programs."""
        keys = self.owned_keys(ifindex, direction)
        out = []
        for e in entries:
            owned = e.has_program and entry_key(e) in keys
            out.append(e if owned == e.owned else HookEntry(e.prog_id, e.prog_name, e.prog_tag, e.kind, e.link_id,
                                                            e.handle, e.priority, owned))
        return tuple(out)

    def owns_filter(self, ifindex: int, direction: Direction | None, priority: int, handle: int) -> bool:
        """Whether a cls_bpf filter is one of this session's attachments."""
        if direction is None:
            return False
        return ("cls_bpf", priority, handle) in self.owned_keys(ifindex, direction)

    def owned_removal(self, ifindex: int, direction: Direction | None, priority: int, handle: int) -> bool:
        """Whether a removed cls_bpf filter was this session's: one it holds (severed by someone else), or
        one it detached whose removal the kernel reports now (the record left the registry first)."""
        if self.owns_filter(ifindex, direction, priority, handle):
            return True
        key = (ifindex, "cls_bpf", priority, handle)
        if direction is not None and self._departed.get(key) is direction:
            del self._departed[key]
            return True
        return False
