"""What is on a tc hook, read from the kernel: tcx programs (BPF_PROG_QUERY) then cls_bpf filters.

Shared by the real backends so that a query lists both kinds in run order whichever backend a session
uses. Entries come back with owned=False; the session marks what it owns.

Legacy filters that are not cls_bpf (u32, ...) run no BPF program, so they are not listed: a HookEntry
describes a program. They still occupy priorities, which the netlink backend takes into account when it
places a filter. Only chain 0 is listed: filters on other chains run only when an action jumps there.
On a kernel without tcx (before 6.6) the tcx part is empty and the revision is None.
"""

from __future__ import annotations

import errno as _errno
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from .._errors import DeviceNotFound, Op
from .._types import Direction, Hook, HookEntry
from . import bpf, codec
from .netns import NetnsRunner
from .nlsock import NetlinkError
from .syscalls import SyscallThreads

if TYPE_CHECKING:
    from .transport import NetlinkTransport

__all__ = ["CLSACT_PARENTS", "ProgNameCache", "cls_bpf_entries", "dump_filters", "query_hook", "tcx_entries"]

CLSACT_PARENTS = {Direction.INGRESS: codec.INGRESS_PARENT, Direction.EGRESS: codec.EGRESS_PARENT}

ATTACH_TYPES = {Direction.INGRESS: bpf.BPF_TCX_INGRESS, Direction.EGRESS: bpf.BPF_TCX_EGRESS}


class ProgNameCache:
    """Program id -> (name, tag), read through one kernel's bpf(2) calls (`calls`: the session kernel's
    `Bpf`; `tcx_entries` queries hooks through the same). A loaded program's name and tag never change, so
    they are cached; ids the kernel no longer knows are simply looked up again. Thread-safe (filled from
    worker threads)."""

    def __init__(self, calls: bpf.Bpf = bpf.LINUX, limit: int = 4096) -> None:
        self.calls = calls
        self._map: dict[int, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, prog_id: int) -> tuple[str, str]:
        with self._lock:
            hit = self._map.get(prog_id)
        if hit is not None:
            return hit
        try:
            fd = self.calls.prog_get_fd_by_id(prog_id)
        except bpf.BpfError:
            return "", ""
        try:
            info = self.calls.prog_info(fd)
        except bpf.BpfError:
            return "", ""
        finally:
            self.calls.close(fd)
        value = (info.name, info.tag)
        with self._lock:
            if len(self._map) >= self._limit:
                self._map.clear()
            self._map[prog_id] = value
        return value


def tcx_entries(
    ifindex: int, direction: Direction, names: ProgNameCache
) -> tuple[int | None, list[HookEntry]]:
    """(revision, tcx entries in run order) of a hook, asked through `names.calls`; run in a worker thread
    inside the namespace.

    A kernel without tcx refuses the tcx attach types with EINVAL: then (None, []).
    """
    try:
        q = names.calls.prog_query(ifindex, ATTACH_TYPES[direction])
    except bpf.BpfError as exc:
        if exc.errno == _errno.EINVAL:
            return None, []
        if exc.errno == _errno.ENODEV:
            raise DeviceNotFound(f"no device with ifindex {ifindex} (it was deleted?)", errno=exc.errno) from None
        raise  # the kernel's refusal, raw: the backend translates it
    entries = []
    for prog_id, link_id in zip(q.prog_ids, q.link_ids, strict=True):
        name, tag = names.get(prog_id)
        entries.append(HookEntry(prog_id=prog_id, prog_name=name, prog_tag=tag, kind="tcx",
                                 link_id=link_id or None, handle=None, priority=None, owned=False))
    return q.revision, entries


def _names_of(names: ProgNameCache, prog_ids: Sequence[int]) -> list[tuple[str, str]]:
    return [names.get(i) for i in prog_ids]


async def dump_filters(
    nl: NetlinkTransport, ifindex: int, direction: Direction, *, dev: str | int | None = None
) -> list[codec.FilterMsg]:
    """Every filter of the clsact hook `direction` of a device (any classifier, chain 0), without the
    per-priority classifier heads (handle 0), sorted by (priority, handle). Empty when the device has no
    clsact qdisc. DeviceNotFound when the device is gone; other refusals are the kernel's, raw
    (`NetlinkError`: the caller translates them)."""
    parent = CLSACT_PARENTS[direction]
    try:
        msgs = await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETTFILTER, ifindex, parent),
                             op=Op.FILTER_DUMP)
    except NetlinkError as exc:
        if exc.errno == _errno.ENODEV:
            raise DeviceNotFound(f"no device {dev if dev is not None else ifindex} (it was deleted?)",
                                 errno=exc.errno) from None
        raise
    out = [m for m in msgs if isinstance(m, codec.FilterMsg) and m.handle != 0 and m.chain == 0
           and m.ifindex == ifindex and m.parent == parent]
    out.sort(key=lambda m: (m.priority, m.handle))
    return out


async def cls_bpf_entries(
    nl: NetlinkTransport, ifindex: int, direction: Direction, names: ProgNameCache
) -> list[HookEntry]:
    """The cls_bpf filters of a clsact hook in run order (priority, then handle), as HookEntry values with
    kind "cls_bpf" and owned=False. Other classifiers (u32...) are left out: they run no BPF program."""
    filters = [f for f in await dump_filters(nl, ifindex, direction) if f.kind == "bpf" and f.bpf_id]
    ids = [f.bpf_id or 0 for f in filters]
    prog_names = await nl.runner.run(_names_of, names, ids) if ids else []
    entries = []
    for f, (name, tag) in zip(filters, prog_names, strict=True):
        entries.append(HookEntry(prog_id=f.bpf_id or 0, prog_name=name, prog_tag=f.bpf_tag or tag,
                                 kind="cls_bpf", link_id=None, handle=f.handle, priority=f.priority,
                                 owned=False))
    return entries


FilterLister = Callable[[int, Direction], Awaitable[Sequence[HookEntry]]]


async def query_hook(
    runner: NetnsRunner | SyscallThreads,
    ifindex: int,
    direction: Direction,
    *,
    names: ProgNameCache,
    backend: str,
    filters: FilterLister | None = None,
) -> Hook:
    """The hook's tcx entries (in run order) followed by its cls_bpf filters (by priority).

    `filters` lists the legacy filters of the hook (from a netlink dump); without it only tcx is read.
    `runner` runs the BPF_PROG_QUERY in the hook's namespace: the session's runner or its syscall threads.
    """
    revision, entries = await runner.run(tcx_entries, ifindex, direction, names)
    if filters is not None:
        entries.extend(await filters(ifindex, direction))
    return Hook(revision=revision, entries=tuple(entries))
