"""What is on a tc hook, read from the kernel: tcx programs (BPF_PROG_QUERY) then cls_bpf filters.

Shared by the real backends so that a query lists both kinds in run order whichever backend a session
uses. Entries come back with owned=False; the session marks what it owns.
"""

from __future__ import annotations

import errno as _errno
import os
import threading
from collections.abc import Awaitable, Callable, Sequence

from .._errors import DeviceNotFound, from_errno
from .._types import Direction, Hook, HookEntry
from . import bpf
from .netns import NetnsRunner

__all__ = ["ProgNameCache", "query_hook", "tcx_entries"]

ATTACH_TYPES = {Direction.INGRESS: bpf.BPF_TCX_INGRESS, Direction.EGRESS: bpf.BPF_TCX_EGRESS}


class ProgNameCache:
    """Program id -> (name, tag). A loaded program's name and tag never change, so they are cached; ids
    the kernel no longer knows are simply looked up again. Thread-safe (filled from worker threads)."""

    def __init__(self, limit: int = 4096) -> None:
        self._map: dict[int, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def get(self, prog_id: int) -> tuple[str, str]:
        with self._lock:
            hit = self._map.get(prog_id)
        if hit is not None:
            return hit
        try:
            fd = bpf.prog_get_fd_by_id(prog_id)
        except bpf.BpfError:
            return "", ""
        try:
            info = bpf.prog_info(fd)
        except bpf.BpfError:
            return "", ""
        finally:
            os.close(fd)
        value = (info.name, info.tag)
        with self._lock:
            if len(self._map) >= self._limit:
                self._map.clear()
            self._map[prog_id] = value
        return value

    def remember(self, prog_id: int, name: str, tag: str) -> None:
        with self._lock:
            self._map[prog_id] = (name, tag)


def tcx_entries(ifindex: int, direction: Direction, names: ProgNameCache) -> tuple[int, list[HookEntry]]:
    """(revision, tcx entries in run order) of a hook; run in a worker thread inside the namespace."""
    try:
        q = bpf.prog_query(ifindex, ATTACH_TYPES[direction])
    except bpf.BpfError as exc:
        if exc.errno == _errno.ENODEV:
            raise DeviceNotFound(f"no device with ifindex {ifindex} (it was deleted?)", errno=exc.errno) from None
        raise from_errno(exc.errno or 0, op="prog_query", dev=ifindex, direction=direction) from None
    entries = []
    for prog_id, link_id in zip(q.prog_ids, q.link_ids, strict=True):
        name, tag = names.get(prog_id)
        entries.append(HookEntry(prog_id=prog_id, prog_name=name, prog_tag=tag, kind="tcx",
                                 link_id=link_id or None, handle=None, priority=None, owned=False))
    return q.revision, entries


FilterLister = Callable[[int, Direction], Awaitable[Sequence[HookEntry]]]


async def query_hook(
    runner: NetnsRunner,
    ifindex: int,
    direction: Direction,
    *,
    names: ProgNameCache,
    backend: str,
    filters: FilterLister | None = None,
) -> Hook:
    """The hook's tcx entries (in run order) followed by its cls_bpf filters (by priority).

    `filters` lists the legacy filters of the hook (from a netlink dump); without it only tcx is read.
    """
    revision, entries = await runner.run(tcx_entries, ifindex, direction, names)
    if filters is not None:
        entries.extend(await filters(ifindex, direction))
    return Hook(revision=revision, entries=tuple(entries))
