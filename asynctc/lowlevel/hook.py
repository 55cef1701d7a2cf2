"""What is on a tc hook, read from the kernel: tcx programs (BPF_PROG_QUERY), then every legacy filter.

Shared by the real backends so that a query lists the hook in run order whichever backend a session
uses. Entries come back with owned=False; the session marks what it owns.

Run order, as the kernel runs a hook (each fact pinned by a real-kernel test):
- tcx programs first, in their array order (BPF_PROG_QUERY reports them so);
- then the legacy filters of the qdisc in the device's ingress slot: a clsact qdisc (its ingress and
  egress blocks), or a legacy `ingress` qdisc (one block, run on the ingress hook only). They run by
  priority, and within one priority the NEWEST filter first (cls_bpf inserts a new filter at the head of
  its priority's list). A filter dump lists them in exactly that order, so the dump's order is kept;
  nothing is re-sorted.

Every classifier is listed, not only cls_bpf: a non-BPF classifier (u32 here; flower, matchall, ...
where the kernel has them) shares the priority space and can end classification for the packets it
matches (a u32 filter with a classid), so the cls_bpf filters behind it never see them. Such an entry has
its tc kind as `kind` and no program: prog_id 0, prog_name "", prog_tag "", link_id None. One entry per
filter added: a u32 filter is its key (handle 800::800, ...); the hash tables u32 dumps as nodes of their
own (handle 800:, node id 0: the one `tc filter add ... u32 match ...` creates with its first key, and
any made with `divisor`) classify nothing themselves and are left out, as are the per-priority
classifier heads (handle 0, no options). Placement still needs them: a priority holding only a u32 hash
table (`tc filter add ... prio P handle 1: u32 divisor 1`) is taken (another classifier kind there is
refused with EINVAL), so `dump_filters(..., tables=True)` keeps them for priority choice. A cls_bpf
filter running a classic BPF program (no eBPF program id) is kind "cls_bpf" with prog_id 0.

The parent in a dumped filter is the spelling last used for its block (for an `ingress` qdisc any of
`ffff:`, `ffff:fff1`, `ffff:fff2`, even `ffff:fff3`): filters are therefore taken from the device's
dump whatever parent they report. Only chain 0 is listed: filters on other chains run only when an
action jumps there. On a kernel without tcx (before 6.6) the tcx part is empty and the revision is None.
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

__all__ = [
    "CLSACT_PARENTS",
    "ProgNameCache",
    "dump_filters",
    "filter_entries",
    "filter_entry",
    "hook_filters",
    "is_u32_table",
    "query_hook",
    "tcx_entries",
]

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


U32_NODE_MASK = 0xFFF
"""The node-id bits of a u32 handle (htid:hash:node); node id 0 names a hash table, not a key."""


def is_u32_table(f: codec.FilterMsg) -> bool:
    """Whether a dumped filter is a u32 hash table (node id 0: `800:`, `1:`, ...), not a u32 key."""
    return f.kind == "u32" and f.handle & U32_NODE_MASK == 0


def hook_filters(msgs: Sequence[codec.Message], ifindex: int, *, tables: bool = False) -> list[codec.FilterMsg]:
    """The filters of one hook in a filter dump's messages, in the dump's order (the run order): filter
    messages of `ifindex` on chain 0, without the per-priority classifier heads (handle 0) and, unless
    `tables`, without u32 hash tables (`is_u32_table`: one entry per filter added, its key). The parent
    each reports is not checked: it is the block's last spelling, not the hook's (module docstring)."""
    return [m for m in msgs if isinstance(m, codec.FilterMsg) and m.handle != 0 and m.chain == 0
            and m.ifindex == ifindex and (tables or not is_u32_table(m))]


async def _dump_block(
    nl: NetlinkTransport, ifindex: int, parent: int, dev: str | int | None, tables: bool = False
) -> list[codec.FilterMsg]:
    try:
        msgs = await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETTFILTER, ifindex, parent),
                             op=Op.FILTER_DUMP)
    except NetlinkError as exc:
        if exc.errno == _errno.ENODEV:
            raise DeviceNotFound(f"no device {dev if dev is not None else ifindex} (it was deleted?)",
                                 errno=exc.errno) from None
        raise
    return hook_filters(msgs, ifindex, tables=tables)


async def dump_filters(
    nl: NetlinkTransport, ifindex: int, direction: Direction, *, dev: str | int | None = None,
    tables: bool = False,
) -> list[codec.FilterMsg]:
    """Every filter of the hook `direction` of a device (any classifier, chain 0), without the
    per-priority classifier heads (handle 0) and, unless `tables` (for priority choice: a priority that
    holds only a u32 hash table is taken), without u32 hash tables (`hook_filters`), in the order the
    kernel runs them (the dump's order: by
    priority, newest first within one). The filters of a clsact qdisc's block for the direction, or, for
    ingress, those of a legacy `ingress` qdisc however their parent was spelled; empty when the slot
    holds neither (and for egress under an `ingress` qdisc, which has no egress hook). DeviceNotFound
    when the device is gone; other refusals are the kernel's, raw (`NetlinkError`: the caller translates
    them).

    How the qdisc is told apart, from the kernel's own lookup rules: a dump at parent ffff:fff2 or
    ffff:fff3 reaches a clsact's ingress or egress block, and an `ingress` qdisc's only block for either
    minor (its class lookup accepts any). A dump at ffff:fff1 finds no class on a clsact (empty), but the
    block of an `ingress` qdisc. So an egress dump that found filters is checked with one more dump at
    ffff:fff1: filters there mean they were an `ingress` qdisc's, which do not run on egress.
    """
    out = await _dump_block(nl, ifindex, CLSACT_PARENTS[direction], dev, tables)
    if direction is Direction.EGRESS and out and await _dump_block(nl, ifindex, codec.CLSACT_PARENT, dev, True):
        return []
    return out


def filter_entry(f: codec.FilterMsg, prog_name: str = "", prog_tag: str = "") -> HookEntry:
    """The HookEntry of a dumped filter (owned=False): kind "cls_bpf" with its program for cls_bpf, else
    the classifier's tc kind ("u32", ...) with no program (prog_id 0, prog_name "", prog_tag "").
    `prog_name`/`prog_tag` are the cls_bpf program's, as the kernel reports them by id (the dump's own
    tag wins)."""
    if f.kind == "bpf":
        return HookEntry(prog_id=f.bpf_id or 0, prog_name=prog_name if f.bpf_id else "",
                         prog_tag=(f.bpf_tag or prog_tag) if f.bpf_id else "", kind="cls_bpf", link_id=None,
                         handle=f.handle, priority=f.priority, owned=False)
    return HookEntry(prog_id=0, prog_name="", prog_tag="", kind=f.kind or "unknown", link_id=None,
                     handle=f.handle, priority=f.priority, owned=False)


async def filter_entries(
    nl: NetlinkTransport, ifindex: int, direction: Direction, names: ProgNameCache
) -> list[HookEntry]:
    """The legacy filters of a hook in run order (`dump_filters`), as HookEntry values with owned=False:
    cls_bpf filters with their programs, every other classifier with its tc kind and no program
    (`filter_entry`)."""
    filters = await dump_filters(nl, ifindex, direction)
    ids = [f.bpf_id for f in filters if f.kind == "bpf" and f.bpf_id]
    found = dict(zip(ids, await nl.runner.run(_names_of, names, ids), strict=True)) if ids else {}
    return [filter_entry(f, *found.get(f.bpf_id or 0, ("", ""))) for f in filters]


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
    """The hook's tcx entries (in run order) followed by its legacy filters (in run order: `filter_entries`).

    `filters` lists the legacy filters of the hook (from a netlink dump); without it only tcx is read.
    `runner` runs the BPF_PROG_QUERY in the hook's namespace: the session's runner or its syscall threads.
    """
    revision, entries = await runner.run(tcx_entries, ifindex, direction, names)
    if filters is not None:
        entries.extend(await filters(ifindex, direction))
    return Hook(revision=revision, entries=tuple(entries))
