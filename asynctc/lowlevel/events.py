"""The event source of the real backends: rtnetlink multicast (RTNLGRP_LINK, RTNLGRP_TC) for one namespace.

It keeps the state it has reported (devices, qdiscs, clsact filters) so that:
- every kernel message becomes at most one event (a RTM_NEWLINK for a flag change is not a new device);
- when the kernel drops events (ENOBUFS), it re-dumps links, qdiscs and clsact filters, diffs them against
  what it knew, emits the missed removals and additions as ordinary events and then `Resynced`: after that
  its state equals the kernel's again.

The socket is opened before the baseline dump, so nothing can happen unseen between the two. Reading runs
on the trio thread (it only copies queued messages); dumps run in the transport's I/O thread
(lowlevel.transport).

Filters are told apart by the hook they are on, never by the parent a message reports. The kernel reports
the parent as it was spelled, by the request (events) or last on the block (dumps): on a legacy `ingress`
qdisc that is any of `ffff:`, `ffff:fff1`, `ffff:fff2`, even `ffff:fff3` (its one block answers every
minor), and a dump at ffff:fff3 returns the `ingress` qdisc's filters. So the source keeps the qdisc in
each device's ingress slot (from its baseline and RTM_NEWQDISC/RTM_DELQDISC): under an `ingress` qdisc
every filter is an ingress filter whatever parent it reports, under clsact ffff:fff2 is ingress and
ffff:fff3 egress. Filters are keyed by (ifindex, direction, chain, priority, handle), so one filter has one
key whatever spelling adds, deletes or dumps it, and a resync reports no spurious removal and addition.
A filter outside the hooks (on another qdisc) is reported with direction None and not kept.

u32 hash tables (handle node id 0: `800:`) are not filters here, as they are not entries of a query
(`lowlevel.hook`): the kernel announces a u32 filter by its key (`800::800`) only, and dumps list the
table too, which would otherwise come back from a resync as a filter nobody added.

tcx links produce no netlink events of their own: the session learns of severed links from DeviceRemoved
and confirms each with the link's info (ifindex 0).
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .._errors import Op, TCError
from .._types import Direction
from ..events import (
    DeviceAdded,
    DeviceRemoved,
    FilterAdded,
    FilterRemoved,
    KernelEvent,
    QdiscAdded,
    QdiscRemoved,
    Resynced,
)
from ..events import EventSource as EventSource
from . import codec
from .hook import is_u32_table
from .kernel import LINUX, Kernel
from .multicast import EventsLost, MulticastSocket, open_multicast_socket
from .netns import NetnsRunner
from .transport import NetlinkTransport, open_transport

__all__ = [
    "DEFAULT_EVENT_RCVBUF",
    "EventSource",
    "NetlinkEventSource",
    "check_rcvbuf",
    "open_netlink_event_source",
]

log = logging.getLogger("asynctc")

# Large enough to absorb a storm of a thousand interfaces while the reader is busy (root can force it
# past rmem_max with SO_RCVBUFFORCE). The kernel doubles the value for its own bookkeeping.
DEFAULT_EVENT_RCVBUF = 8 << 20
RESYNC_ATTEMPTS = 12  # with the pauses, about 3.5 s of a storm interrupting every dump

PARENT_DIRECTION = {codec.INGRESS_PARENT: Direction.INGRESS, codec.EGRESS_PARENT: Direction.EGRESS}
DIRECTION_PARENT = {d: p for p, d in PARENT_DIRECTION.items()}
HOOK_QDISCS = ("clsact", "ingress")
HOOK_SLOT = (codec.CLSACT_PARENT, codec.CLSACT_HANDLE)  # the ingress slot: clsact or `ingress`, ffff: at ffff:fff1
QDISC_MAJOR_MASK = 0xFFFF0000

QdiscKey = tuple[int, int, int]  # ifindex, parent, handle
FilterKey = tuple[int, Direction, int, int, int]  # ifindex, direction (the hook), chain, priority, handle
FilterVal = tuple[str, int | None]  # kind, bpf program id


def hook_direction(slot_kind: str | None, parent: int) -> Direction | None:
    """The hook a filter reported at `parent` is on, given the kind of the qdisc in its device's ingress
    slot (None: none known). Under an `ingress` qdisc every parent of its handle's major (`ffff:`,
    `ffff:fff1`, `ffff:fff2`, `ffff:fff3`) names its one block, the ingress hook; under clsact (or with no
    slot known) ffff:fff2 is ingress and ffff:fff3 egress; anything else is no hook (None)."""
    if slot_kind == "ingress":
        return Direction.INGRESS if parent & QDISC_MAJOR_MASK == codec.CLSACT_HANDLE else None
    return PARENT_DIRECTION.get(parent)


def _filter_dump(seq: int, *, ifindex: int, parent: int) -> bytes:
    return codec.encode_dump_request(seq, codec.RTM_GETTFILTER, ifindex, parent)


class NetlinkEventSource(EventSource):
    """Kernel events of one namespace; see the module docstring. Use `open_netlink_event_source`."""

    def __init__(self, mc: MulticastSocket, nl: NetlinkTransport) -> None:
        self._mc = mc
        self._nl = nl
        self._runner = nl.runner
        self.discarded = 0
        self.links: dict[int, str] = {}
        self.qdiscs: dict[QdiscKey, str] = {}
        self.filters: dict[FilterKey, FilterVal] = {}
        self.resyncs = 0

    # -- reading ---------------------------------------------------------------------------------------
    async def receive(self) -> list[KernelEvent | Resynced]:
        while True:
            try:
                msgs = await self._mc.receive()
            except EventsLost:
                return await self.resync("the kernel dropped events (ENOBUFS)")
            out: list[KernelEvent | Resynced] = []
            for m in msgs:
                out.extend(self._apply(m))
            if out:
                return out

    def slot_kind(self, ifindex: int) -> str | None:
        """The kind of the qdisc in the device's ingress slot as last reported ("clsact", "ingress", ...),
        None when the slot is empty."""
        return self.qdiscs.get((ifindex, *HOOK_SLOT))

    def direction_of(self, ifindex: int, parent: int) -> Direction | None:
        """The hook of a filter of `ifindex` reported at `parent` (`hook_direction`), None for no hook."""
        return hook_direction(self.slot_kind(ifindex), parent)

    def _apply(self, m: codec.Message) -> list[KernelEvent]:
        if isinstance(m, codec.LinkMsg):
            return self._apply_link(m)
        if isinstance(m, codec.QdiscMsg):
            return self._apply_qdisc(m)
        if isinstance(m, codec.FilterMsg):
            return self._apply_filter(m)
        if isinstance(m, codec.ChainMsg) and not m.is_new:
            # A chain message names the qdisc (ffff:), not the block: under clsact it cannot say which
            # hook's chain went, and the kernel reports the filters a chain deletion flushes one by one
            # anyway. Under an `ingress` qdisc (one block) the chain's filters are gone.
            if self.slot_kind(m.ifindex) != "ingress" or m.parent & QDISC_MAJOR_MASK != codec.CLSACT_HANDLE:
                return []
            gone = [k for k in self.filters
                    if k[0] == m.ifindex and k[1] is Direction.INGRESS and k[2] == m.chain]
            return [self._filter_removed(k) for k in gone]
        return []

    def _apply_link(self, m: codec.LinkMsg) -> list[KernelEvent]:
        if m.is_new:
            known = m.ifindex in self.links
            if m.name:
                self.links[m.ifindex] = m.name
            elif not known:
                self.links[m.ifindex] = ""
            return [] if known else [DeviceAdded(m.ifindex, self.links[m.ifindex])]
        if m.ifindex not in self.links:
            return []
        name = self.links.pop(m.ifindex) or (m.name or "")
        # A deleted device takes its qdiscs and filters with it, without messages of their own.
        for k in [k for k in self.filters if k[0] == m.ifindex]:
            del self.filters[k]
        for q in [q for q in self.qdiscs if q[0] == m.ifindex]:
            del self.qdiscs[q]
        return [DeviceRemoved(m.ifindex, name)]

    def _apply_qdisc(self, m: codec.QdiscMsg) -> list[KernelEvent]:
        key = (m.ifindex, m.parent, m.handle)
        kind = m.kind or ""
        if m.is_new:
            known = key in self.qdiscs
            self.qdiscs[key] = kind
            return [] if known else [QdiscAdded(m.ifindex, kind, m.handle, m.parent)]
        if key not in self.qdiscs or (kind and self.qdiscs[key] and self.qdiscs[key] != kind):
            return []  # unknown, or a stale message of a qdisc another one has replaced in that slot
        kind = self.qdiscs.pop(key) or kind
        out: list[KernelEvent] = []
        if kind in HOOK_QDISCS:
            # Deleting clsact deletes every filter on it, including other owners'.
            out.extend(self._filter_removed(k) for k in [k for k in self.filters if k[0] == m.ifindex])
        out.append(QdiscRemoved(m.ifindex, kind, m.handle, m.parent))
        return out

    def _apply_filter(self, m: codec.FilterMsg) -> list[KernelEvent]:
        if m.handle != 0 and is_u32_table(m):
            return []  # a u32 hash table: not a filter of its own (module docstring)
        direction = self.direction_of(m.ifindex, m.parent)
        if m.is_new:
            if m.handle == 0:
                return []  # the classifier instance of a priority, not a filter
            val = (m.kind or "", m.bpf_id)
            if direction is not None:
                key = (m.ifindex, direction, m.chain, m.priority, m.handle)
                if self.filters.get(key) == val:
                    return []
                self.filters[key] = val
            return [FilterAdded(m.ifindex, direction, m.priority, m.handle, val[0], val[1], False)]
        if direction is None:
            if m.handle:
                return [FilterRemoved(m.ifindex, None, m.priority, m.handle, m.kind or "", m.bpf_id, False)]
            return []
        # A deletion names one filter, or (handle 0) every filter of a priority, or (priority 0) the chain.
        gone = [
            k for k in self.filters
            if k[0] == m.ifindex and k[1] is direction and k[2] == m.chain
            and (m.priority == 0 or k[3] == m.priority) and (m.handle == 0 or k[4] == m.handle)
        ]
        return [self._filter_removed(k) for k in gone]

    def _filter_removed(self, key: FilterKey) -> FilterRemoved:
        kind, prog_id = self.filters.pop(key)
        ifindex, direction, _chain, prio, handle = key
        return FilterRemoved(ifindex, direction, prio, handle, kind, prog_id, False)

    # -- dumps -----------------------------------------------------------------------------------------
    async def _dump_state(self) -> tuple[dict[int, str], dict[QdiscKey, str], dict[FilterKey, FilterVal]]:
        links: dict[int, str] = {}
        for m in await self._nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETLINK),
                                     op=Op.LINK_DUMP):
            if isinstance(m, codec.LinkMsg):
                links[m.ifindex] = m.name or ""
        qdiscs: dict[QdiscKey, str] = {}
        for m in await self._nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETQDISC),
                                     op=Op.QDISC_DUMP):
            if isinstance(m, codec.QdiscMsg) and m.ifindex in links:
                qdiscs[(m.ifindex, m.parent, m.handle)] = m.kind or ""
        filters: dict[FilterKey, FilterVal] = {}
        for (ifindex, *slot), kind in sorted(qdiscs.items()):
            if tuple(slot) != HOOK_SLOT or kind not in HOOK_QDISCS:
                continue
            # An `ingress` qdisc has one block (the ingress hook): dumped once, every filter in it is an
            # ingress filter whatever parent it reports; clsact's two blocks are dumped one by one.
            for direction in (Direction.INGRESS,) if kind == "ingress" else (Direction.INGRESS, Direction.EGRESS):
                parent = DIRECTION_PARENT[direction]
                try:
                    msgs = await self._nl.dump(
                        functools.partial(_filter_dump, ifindex=ifindex, parent=parent), op=Op.FILTER_DUMP)
                except Exception as exc:  # the device went away meanwhile: its events will say so
                    log.debug("asynctc: filter dump of ifindex %d failed during resync: %r", ifindex, exc)
                    continue
                for m in msgs:
                    if (isinstance(m, codec.FilterMsg) and m.handle != 0 and m.ifindex == ifindex
                            and not is_u32_table(m)):
                        filters[(ifindex, direction, m.chain, m.priority, m.handle)] = (m.kind or "", m.bpf_id)
        return links, qdiscs, filters

    async def baseline(self) -> None:
        """Read the kernel's current state, without events (what already exists is not news)."""
        self.links, self.qdiscs, self.filters = await self._dump_state_retrying()

    async def _dump_state_retrying(
        self,
    ) -> tuple[dict[int, str], dict[QdiscKey, str], dict[FilterKey, FilterVal]]:
        """`_dump_state`, tried again (with a growing pause) while a storm keeps interrupting the dumps
        (NLM_F_DUMP_INTR, errno EINTR): giving up would leave the monitor blind."""
        for attempt in range(RESYNC_ATTEMPTS):
            try:
                return await self._dump_state()
            except TCError as exc:
                if exc.errno != errno.EINTR or attempt + 1 == RESYNC_ATTEMPTS:
                    raise
            await trio.sleep(min(0.005 * 2**attempt, 0.5))
        raise AssertionError("unreachable")  # pragma: no cover

    async def resync(self, reason: str) -> list[KernelEvent | Resynced]:
        """Empty the socket's queue, re-dump, emit the differences (removals first, then additions), then
        Resynced.

        The queue is emptied first: the dump supersedes what is in it, and the kernel reports a later loss
        only once the queue has been empty (see MulticastSocket.drain)."""
        self.resyncs += 1
        self.discarded += await self._runner.run(self._mc.drain)
        links, qdiscs, filters = await self._dump_state_retrying()
        out: list[KernelEvent | Resynced] = []
        for fk in [k for k in self.filters if filters.get(k) != self.filters[k]]:
            out.append(self._filter_removed(fk))
        for qk in [k for k in self.qdiscs if qdiscs.get(k) != self.qdiscs[k]]:
            kind = self.qdiscs.pop(qk)
            out.append(QdiscRemoved(qk[0], kind, qk[2], qk[1]))
        for ifindex in [i for i in self.links if links.get(i) is None]:
            out.append(DeviceRemoved(ifindex, self.links.pop(ifindex)))
        for ifindex, name in links.items():
            if ifindex not in self.links:
                out.append(DeviceAdded(ifindex, name))
        for qk, kind in qdiscs.items():
            if qk not in self.qdiscs:
                out.append(QdiscAdded(qk[0], kind, qk[2], qk[1]))
        for fk, (kind, prog_id) in filters.items():
            if fk not in self.filters:
                out.append(FilterAdded(fk[0], fk[1], fk[3], fk[4], kind, prog_id, False))
        self.links, self.qdiscs, self.filters = links, qdiscs, filters
        out.append(Resynced(reason))
        return out


@asynccontextmanager
async def open_netlink_event_source(
    runner: NetnsRunner, *, rcvbuf: int | None = DEFAULT_EVENT_RCVBUF, kernel: Kernel = LINUX
) -> AsyncIterator[NetlinkEventSource]:
    """Subscribe to the namespace's link and tc events, read the baseline, yield the source; closes its
    sockets (and so releases the namespace) on exit."""
    mc = await open_multicast_socket(runner, (codec.RTNLGRP_LINK, codec.RTNLGRP_TC), rcvbuf, kernel=kernel)
    try:
        async with open_transport(runner, max_in_flight=4, kernel=kernel) as nl:
            source = NetlinkEventSource(mc, nl)
            await source.baseline()
            yield source
    finally:
        mc.close()


def check_rcvbuf(rcvbuf: object) -> int | None:
    """`rcvbuf` as an event socket's receive buffer size (bytes, >= 256, or None for the system's
    default); ValueError otherwise."""
    if rcvbuf is not None and (not isinstance(rcvbuf, int) or isinstance(rcvbuf, bool) or rcvbuf < 256):
        raise ValueError(f"backend_options['event_rcvbuf'] must be an int >= 256 (bytes), got {rcvbuf!r}")
    return rcvbuf
