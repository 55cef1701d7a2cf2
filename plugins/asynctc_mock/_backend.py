"""MockBackend: the asynctc Backend contract on a MockKernel, shaped like the real backends.

By default an attach makes a tcx link (as the bpf_link backend does); `mode="legacy"` (an attach option)
makes a clsact + cls_bpf filter instead (as the netlink backend does), so the netlink-shaped paths
(positions mapped onto priorities, qdisc ownership, filters deleted by others) can be tested without
privileges. `offload="prefer"/"require"` attaches a hardware-only (skip_sw) filter where the device takes
it; "prefer" falls back to software where it does not, "require" raises OffloadError leaving nothing.

Every kernel call goes through `ctx.runner` (a worker thread), like the real backends' syscalls: injected
latency blocks a worker thread, never the trio thread.

Legacy filters follow the netlink backend's policy, `asynctc.lowlevel.tcpolicy`: positions become
priorities by `place_filter` (HookFull when there is no gap, AnchorNotFound for an anchor that is not a
cls_bpf filter), the default handle is 1, a filter is named with the owner tag
"asynctc:OWNER:PID.START.SERIAL:PROGNAME" (`format_tag`), renamed with the ":pinned" mark while pinned, and
a software filter is added with skip_hw, so that an offload-capable device does not also run it in
hardware.

Ownership records in the kernel: links carry the creating session's tag (`ctx.session_tag`), filters its
owner tag (cls_bpf's TCA_BPF_NAME), and a clsact qdisc records the tag of the session that created it. A
session deletes a clsact qdisc only if its own tag created it and no filter is left on it.
Orphans (`reap_orphans`) are unpinned filters whose owner tag names this session's owner and a dead
process (`MockKernel.tag_alive`), and empty clsact qdiscs such a process created.
"""

from __future__ import annotations

import errno as _errno
import functools
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import ClassVar, Literal, TypedDict, TypeVar

import trio

from asynctc import (
    AttachmentInfo,
    Conflict,
    Direction,
    Hook,
    HookEntry,
    NotOwned,
    OffloadError,
    Op,
    Probe,
    Program,
    TCError,
    from_errno,
)
from asynctc.backend import AttachRequest, Backend, BackendAttachment, BackendContext, EventSource, Updated
from asynctc.events import (
    DeviceAdded,
    DeviceRemoved,
    FilterAdded,
    FilterRemoved,
    KernelEvent,
    QdiscAdded,
    QdiscRemoved,
    Resynced,
)
from asynctc.lowlevel.kernel import LINUX
from asynctc.lowlevel.tcpolicy import (
    AUTO_PRIORITY_ATTEMPTS,
    filter_slot_options,
    format_tag,
    parse_session_tag,
    parse_tag,
    place_filter,
)

from ._kernel import FilterInfo, KernelError, KernelSnapshot, MockKernel, Subscription

__all__ = ["MockAttachment", "MockBackend", "MockEventSource", "diff_snapshots"]

log = logging.getLogger("asynctc.mock")

T = TypeVar("T")

CLEANUP_TIMEOUT = 10.0
"""How long the undoing of a half-done operation may take (shielded from cancellation)."""


class _Where(TypedDict):
    """What an operation was about, for error messages."""

    dev: str
    direction: Direction
    program: object




class MockAttachment(BackendAttachment):
    """The mock backend's record of one attachment: a tcx link, or a cls_bpf filter (with its name)."""

    def __init__(self, info: AttachmentInfo, *, kind: Literal["tcx", "filter"], filter_name: str = "") -> None:
        super().__init__(info)
        self.kind: Literal["tcx", "filter"] = kind
        self.filter_name = filter_name
        self.renaming = 0  # our own replaces in flight (they rename the filter: it still counts as ours)
        self.closed = False  # the link "fd" was closed

    def __repr__(self) -> str:
        return f"<MockAttachment {self.kind} {self.info}>"


class MockBackend(Backend[MockAttachment]):
    """The mock backend: asynctc's contract on an in-memory `MockKernel` (no privileges needed).

    Attach options: `mode="tcx"` (default: a tcx link) or `mode="legacy"` (a cls_bpf filter under
    clsact); for filters, `priority=` and `handle=` choose the slot instead of the position.

    Attributes:
        kernel: the MockKernel this backend drives (the session's `kernel=`, or a fresh one).
    """

    name = "mock"
    attach_options: ClassVar[Mapping[str, type]] = {"mode": str, "priority": int, "handle": int}
    kernel_type: ClassVar[type | None] = MockKernel
    kernel_kind = "mock"
    can_offload = True
    has_revisions = True

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        kernel = ctx.kernel if ctx.kernel is not LINUX else MockKernel()
        if not isinstance(kernel, MockKernel):
            raise TypeError(f"the mock backend needs an asynctc_mock.MockKernel as kernel=, got {kernel!r}")
        self.kernel: MockKernel = kernel
        self.tag = ctx.session_tag
        # per ifindex: choosing a priority and adding the filter
        self._locks: defaultdict[int, trio.Lock] = defaultdict(trio.Lock)

    @classmethod
    def new_kernel(cls) -> MockKernel:
        """A fresh MockKernel with the default devices (lo, eth0, veth0, veth1): what a session over the
        mock gets when it is opened without `kernel=`."""
        return MockKernel()

    @classmethod
    async def probe(cls, ctx: BackendContext) -> Probe:
        """Available wherever the session's kernel is a MockKernel (or none: a fresh one is made). A
        session over another in-memory kernel (a third-party backend's) leaves the mock out."""
        if ctx.kernel is not LINUX and not isinstance(ctx.kernel, MockKernel):
            return Probe(False, f"the session's kernel is a {type(ctx.kernel).__name__}, not a MockKernel")
        return Probe(True, "in-memory kernel model; no privileges needed")

    # -- plumbing -------------------------------------------------------------------------------------
    async def _k(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run one kernel call in a worker thread (the session's runner)."""
        return await self.ctx.runner.run(functools.partial(fn, *args, **kwargs))

    def _err(
        self, exc: KernelError, *, op: str | None = None, dev: str | int | None = None,
        direction: Direction | None = None, program: object | None = None,
    ) -> TCError:
        return from_errno(
            exc.errno or 0, op=op or exc.op, backend=self.name, dev=dev, direction=direction, program=program,
            detail=exc.detail or None,
        )

    # -- devices --------------------------------------------------------------------------------------
    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        """(ifindex, name) of a device of the MockKernel; DeviceNotFound otherwise."""
        if not isinstance(dev, str | int) or isinstance(dev, bool):
            raise TypeError(f"dev must be a device name or an ifindex, got {dev!r}")
        try:
            ifindex, name, _offload = await self._k(self.kernel.dev_get, dev)
        except KernelError as exc:
            raise self._err(exc, dev=dev) from None
        return ifindex, name

    # -- attach ---------------------------------------------------------------------------------------
    async def attach(self, request: AttachRequest) -> MockAttachment:
        """Attach as a tcx link (default), a cls_bpf filter (`mode="legacy"`), or a hardware filter
        (offload "prefer"/"require"). Nothing is left behind on failure."""
        mode = request.options.get("mode", "tcx")
        if mode not in ("tcx", "legacy"):
            raise ValueError(f"mode must be 'tcx' or 'legacy', got {mode!r}")
        if request.offload != "never":
            try:
                return await self._attach_filter(request, skip_sw=True)
            except OffloadError as exc:
                if request.offload == "require":
                    raise
                log.info("asynctc mock: offload refused on %s (%s); attaching in software", request.dev, exc)
        if mode == "legacy":
            return await self._attach_filter(request, skip_sw=False)
        return await self._attach_tcx(request)

    async def _register(self, program: Program) -> int:
        try:
            return await self._k(self.kernel.register_program, program)
        except KernelError as exc:
            raise from_errno(exc.errno or 0, op=Op.PROG_GET, backend=self.name, program=program,
                             detail=exc.detail) from None

    async def _attach_tcx(self, request: AttachRequest) -> MockAttachment:
        prog_id = await self._register(request.program)
        p = request.placement
        rel: int | None = None
        is_link = False
        if p.where in ("before", "after"):
            if p.link_id is not None:
                rel, is_link = p.link_id, True
            else:
                rel = p.prog_id
        try:
            link_id = await self._k(
                self.kernel.link_create, request.ifindex, request.direction, prog_id,
                before=p.where in ("first", "before"), after=p.where in ("last", "after"),
                relative_id=rel, relative_is_link=is_link, expected_revision=request.expected_revision or 0,
                creator=self.tag,
            )
        except KernelError as exc:
            raise self._err(exc, dev=request.dev, direction=request.direction, program=request.program) from None
        info = AttachmentInfo(
            backend=self.name, netns=self.ctx.netns, dev=request.dev, ifindex=request.ifindex,
            direction=request.direction, prog_id=prog_id, link_id=link_id, handle=None, priority=None,
            offloaded=False, pinned=None,
        )
        return MockAttachment(info, kind="tcx")

    async def _ensure_clsact(self, request: AttachRequest) -> bool:
        """Make sure the device has a clsact qdisc; True if this call created it."""
        for _ in range(2):
            try:
                q = await self._k(self.kernel.qdisc_get, request.ifindex)
                if q is not None:
                    if q.kind != "clsact":
                        raise from_errno(_errno.EEXIST, op=Op.QDISC_ADD, backend=self.name, dev=request.dev,
                                         detail=f"an {q.kind} qdisc is on the device")
                    return False
                await self._k(self.kernel.qdisc_add, request.ifindex, "clsact", creator=self.tag)
                return True
            except KernelError as exc:
                if exc.errno == _errno.EEXIST and exc.op == "qdisc_add":
                    continue  # someone created one meanwhile: look again
                raise self._err(exc, dev=request.dev) from None
        raise from_errno(_errno.EEXIST, op=Op.QDISC_ADD, backend=self.name, dev=request.dev)

    def _choose_priority(self, request: AttachRequest, filters: tuple[FilterInfo, ...]) -> int:
        """Map a position onto a priority between the existing filters' (the netlink backend's rule)."""
        return place_filter(request.placement, [(f.priority, f.handle, f.kind, f.prog_id) for f in filters],
                            dev=request.dev, direction=request.direction, backend=self.name)

    async def _attach_filter(self, request: AttachRequest, *, skip_sw: bool) -> MockAttachment:
        priority, handle = filter_slot_options(request.options)
        prog_id = await self._register(request.program)
        async with self._locks[request.ifindex]:
            created = await self._ensure_clsact(request)
            try:
                f = await self._add_filter(request, prog_id, priority, handle, skip_sw=skip_sw)
            except BaseException:
                if created:
                    await self._drop_qdisc_if_empty(request.ifindex)
                raise
        info = AttachmentInfo(
            backend=self.name, netns=self.ctx.netns, dev=request.dev, ifindex=request.ifindex,
            direction=request.direction, prog_id=prog_id, link_id=None, handle=f.handle, priority=f.priority,
            offloaded=f.skip_sw, pinned=None,
        )
        return MockAttachment(info, kind="filter", filter_name=f.name)

    async def _add_filter(
        self, request: AttachRequest, prog_id: int, priority: int | None, handle: int, *, skip_sw: bool
    ) -> FilterInfo:
        """Add the filter named with our owner tag, choosing its priority unless given (again, when another
        session took the chosen one meanwhile). A software filter gets skip_hw: an offload-capable device
        must not also run it in hardware."""
        where = _Where(dev=request.dev, direction=request.direction, program=request.program)
        name = format_tag(self.tag, request.program.name)
        for attempt in range(AUTO_PRIORITY_ATTEMPTS):
            prio = priority
            try:
                if prio is None:
                    filters = await self._k(self.kernel.filter_dump, request.ifindex, request.direction)
                    prio = self._choose_priority(request, filters)
                return await self._k(self.kernel.filter_add, request.ifindex, request.direction, prog_id,
                                     priority=prio, handle=handle, name=name, skip_sw=skip_sw, skip_hw=not skip_sw)
            except KernelError as exc:
                if (exc.errno == _errno.EEXIST and exc.op == "filter_add" and priority is None
                        and attempt + 1 < AUTO_PRIORITY_ATTEMPTS):
                    continue  # another session took the priority we chose: choose again
                raise self._err(exc, **where) from None
        raise AssertionError("unreachable: every attempt returns or raises")  # pragma: no cover

    async def _drop_qdisc_if_empty(self, ifindex: int) -> None:
        """Delete the device's clsact qdisc if this session created it and no filter is on it. A failure
        is logged; `aclose` tries again and reports."""
        try:
            await self._k(self._drop_qdisc_sync, ifindex)
        except KernelError as exc:
            if exc.errno != _errno.ENODEV:
                log.warning("asynctc mock: could not delete the clsact qdisc of ifindex %d: %s", ifindex, exc)

    def _drop_qdisc_sync(self, ifindex: int) -> bool:
        q = self.kernel.qdisc_get(ifindex)
        if q is None or q.kind != "clsact" or q.creator != self.tag:
            return False
        if any(self.kernel.filter_dump(ifindex, d) for d in Direction):
            return False
        self.kernel.qdisc_delete(ifindex)
        return True

    # -- detach ---------------------------------------------------------------------------------------
    async def detach(self, att: MockAttachment) -> bool:
        """Detach the link or delete the filter; False when the kernel had severed it already. A pin of a
        detached attachment is removed with it."""
        info = att.info
        if att.kind == "tcx":
            assert info.link_id is not None
            if att.closed:
                return False
            try:
                try:
                    li = await self._k(self.kernel.link_info, info.link_id)
                except KernelError as exc:
                    if exc.errno == _errno.ENOENT:
                        att.closed = True
                        return False
                    raise
                alive = li.ifindex != 0
                if alive:
                    await self._k(self.kernel.link_detach, info.link_id)
                for path in li.pinned:
                    await self._k(self.kernel.obj_unpin, path)
            except KernelError as exc:
                raise self._err(exc, dev=info.dev, direction=info.direction) from None
            finally:
                # As the real backend closes its link fd whatever happened: the link is released either
                # way (closing the last reference of an unpinned link detaches it), never leaked.
                if not att.closed:
                    att.closed = True
                    await self._k(self.kernel.link_close, info.link_id)
            return alive
        assert info.priority is not None and info.handle is not None
        gone = False
        try:
            if not await self._filter_is_ours(att):
                gone = True
            else:
                await self._k(self.kernel.filter_delete, info.ifindex, info.direction, info.priority,
                              info.handle)
        except KernelError as exc:
            if exc.errno not in (_errno.ENOENT, _errno.ENODEV):
                raise self._err(exc, dev=info.dev, direction=info.direction) from None
            gone = True
        if info.pinned is not None:
            try:
                await self._k(self.kernel.obj_unpin, info.pinned)
            except KernelError as exc:
                if exc.errno != _errno.ENOENT:
                    raise self._err(exc, op=Op.OBJ_UNPIN, dev=info.dev) from None
        async with self._locks[info.ifindex]:  # not between another attach's clsact check and its filter add
            await self._drop_qdisc_if_empty(info.ifindex)
        return not gone

    async def _current_filter(self, att: MockAttachment) -> FilterInfo | None:
        i = att.info
        try:
            filters = await self._k(self.kernel.filter_dump, i.ifindex, i.direction)
        except KernelError as exc:
            if exc.errno == _errno.ENODEV:
                return None
            raise
        return next((f for f in filters if (f.priority, f.handle) == (i.priority, i.handle)), None)

    async def _filter_is_ours(self, att: MockAttachment) -> bool:
        f = await self._current_filter(att)
        if f is None or f.kind != "bpf":
            return False
        return att.renaming > 0 or (f.name == att.filter_name and f.prog_id == att.info.prog_id)

    async def _replace_filter(self, att: MockAttachment, prog_id: int, name: str) -> FilterInfo:
        """Replace our filter's program and name in its slot (atomic for packets), as the netlink backend
        does for update, pin and unpin. KernelError as the kernel raised it."""
        info = att.info
        assert info.priority is not None and info.handle is not None
        att.renaming += 1
        try:
            f = await self._k(self.kernel.filter_replace, info.ifindex, info.direction, info.priority,
                              info.handle, prog_id, name=name)
            att.filter_name = name
            return f
        finally:
            att.renaming -= 1

    async def is_attached(self, att: MockAttachment) -> bool:
        """Whether the link is still on its hook, or the filter is still there and still ours."""
        if att.kind == "tcx":
            assert att.info.link_id is not None
            if att.closed:
                return False
            try:
                li = await self._k(self.kernel.link_info, att.info.link_id)
            except KernelError as exc:
                if exc.errno == _errno.ENOENT:
                    return False
                raise self._err(exc) from None
            return li.ifindex != 0
        try:
            return await self._filter_is_ours(att)
        except KernelError as exc:
            raise self._err(exc) from None

    # -- update ---------------------------------------------------------------------------------------
    async def update(self, att: MockAttachment, program: Program, *, expected: Program | None) -> Updated:
        """Swap the program: tcx link update in place (compare-and-swap with `expected`), falling back to
        make-before-break when the kernel refuses the in-place update; a cls_bpf filter is replaced
        (NLM_F_REPLACE), in hardware too when offloaded (OffloadError if refused, the old program kept)."""
        info = att.info
        new_id = await self._register(program)
        if att.kind == "filter":
            return await self._update_filter(att, program, new_id, expected)
        assert info.link_id is not None
        op = Op.LINK_UPDATE_CAS if expected is not None else Op.LINK_UPDATE
        try:
            await self._k(self.kernel.link_update, info.link_id, new_id,
                          old_prog_id=expected.id if expected is not None else None)
        except KernelError as exc:
            if exc.op == "link_update" and exc.errno in (_errno.EOPNOTSUPP, _errno.EINVAL):
                log.info("asynctc mock: in-place update of link %d refused (%s); make-before-break",
                         info.link_id, exc)
                return await self._make_before_break(att, program, new_id, expected)
            raise self._err(exc, op=op, dev=info.dev, direction=info.direction, program=program) from None
        return Updated("link_update", await self._revision(info.ifindex, info.direction), new_id)

    async def _revision(self, ifindex: int, direction: Direction) -> int | None:
        try:
            return (await self._k(self.kernel.prog_query, ifindex, direction)).revision
        except KernelError:
            return None

    async def _make_before_break(
        self, att: MockAttachment, program: Program, new_id: int, expected: Program | None
    ) -> Updated:
        """The new program's link goes in just before the old one (anchored to it, guarded by the hook's
        revision), then the old link goes: the hook is never without one of them. Rolled back on failure."""
        info = att.info
        assert info.link_id is not None
        where = _Where(dev=info.dev, direction=info.direction, program=program)
        for _attempt in range(5):
            try:
                q = await self._k(self.kernel.prog_query, info.ifindex, info.direction)
                li = await self._k(self.kernel.link_info, info.link_id)
            except KernelError as exc:
                if exc.errno in (_errno.ENODEV, _errno.ENOENT):
                    raise from_errno(_errno.ENOLINK, op=Op.LINK_UPDATE, backend=self.name, **where) from None
                raise self._err(exc, **where) from None
            if li.ifindex == 0:
                raise from_errno(_errno.ENOLINK, op=Op.LINK_UPDATE, backend=self.name, **where)
            if expected is not None and li.prog_id != expected.id:
                raise from_errno(_errno.EPERM, op=Op.LINK_UPDATE_CAS, backend=self.name, **where,
                                 detail=f"the link runs program {li.prog_id}, not {expected.id}")
            if li.prog_id == new_id:
                return Updated("make_before_break", q.revision, new_id)
            try:
                new_link = await self._k(
                    self.kernel.link_create, info.ifindex, info.direction, new_id, before=True,
                    relative_id=info.link_id, relative_is_link=True, expected_revision=q.revision,
                    creator=self.tag,
                )
            except KernelError as exc:
                if exc.errno == _errno.ESTALE:
                    continue  # the hook changed between the query and the create: look again
                raise self._err(exc, **where) from None
            try:
                await self._k(self.kernel.link_detach, info.link_id)
            except KernelError as exc:
                await self._rollback_link(new_link)
                raise self._err(exc, **where) from None
            await self._retire_old_link(info.link_id, new_link, info.pinned)
            return Updated("make_before_break", await self._revision(info.ifindex, info.direction), new_id,
                           link_id=new_link)
        raise from_errno(_errno.ESTALE, op=Op.LINK_CREATE, backend=self.name, **where,
                         detail="the hook kept changing during make-before-break")

    async def _rollback_link(self, link_id: int) -> None:
        try:
            await self._k(self.kernel.link_detach, link_id)
            await self._k(self.kernel.link_close, link_id)
        except KernelError as exc:  # pragma: no cover - reported, the original error wins
            log.error("asynctc mock: rolling back link %d failed: %s", link_id, exc)

    async def _retire_old_link(self, old_id: int, new_id: int, pinned: str | None) -> None:
        """After make-before-break: move the pin to the new link and close the old one."""
        if pinned is not None:
            try:
                await self._k(self.kernel.obj_unpin, pinned)
                await self._k(self.kernel.obj_pin, new_id, pinned)
            except KernelError as exc:
                log.warning("asynctc mock: moving the pin %s to the new link %d failed: %s", pinned, new_id, exc)
        try:
            await self._k(self.kernel.link_close, old_id)
        except KernelError as exc:
            log.warning("asynctc mock: closing the replaced link %d failed: %s", old_id, exc)

    async def _update_filter(
        self, att: MockAttachment, program: Program, new_id: int, expected: Program | None
    ) -> Updated:
        info = att.info
        assert info.priority is not None and info.handle is not None
        where = _Where(dev=info.dev, direction=info.direction, program=program)
        try:
            cur = await self._current_filter(att)
        except KernelError as exc:
            raise self._err(exc, **where) from None
        if cur is None or cur.name != att.filter_name or cur.kind != "bpf":
            raise from_errno(_errno.ENOENT, op=Op.FILTER_REPLACE, backend=self.name, **where)
        if expected is not None and cur.prog_id != expected.id:
            raise Conflict(
                f"update of {info.dev} {info.direction} prio {info.priority} [mock backend]: the filter runs "
                f"program {cur.prog_id}, not the expected program {expected.id} ({expected.name!r}); nothing was "
                "changed. query() and retry",
                errno=_errno.EPERM,
            )
        tag = parse_tag(att.filter_name)
        name = format_tag(tag.session_tag if tag else self.tag, program.name, pinned=bool(tag and tag.pinned))
        try:
            await self._replace_filter(att, new_id, name)
        except KernelError as exc:
            raise self._err(exc, **where) from None
        return Updated("netlink_replace", await self._revision(info.ifindex, info.direction), new_id)

    # -- query ----------------------------------------------------------------------------------------
    async def query(self, ifindex: int, direction: Direction) -> Hook:
        """tcx entries in array order, then cls_bpf filters by priority (all owned=False)."""
        try:
            return await self._k(self._query_sync, ifindex, direction)
        except KernelError as exc:
            raise self._err(exc, dev=ifindex, direction=direction) from None

    def _query_sync(self, ifindex: int, direction: Direction) -> Hook:
        k = self.kernel
        q = k.prog_query(ifindex, direction)
        entries: list[HookEntry] = []
        for e in q.entries:
            name, tag, _type = k.prog_info(e.prog_id)
            entries.append(HookEntry(e.prog_id, name, tag, "tcx", e.link_id or None, None, None, False))
        for f in k.filter_dump(ifindex, direction):
            if f.kind != "bpf" or f.prog_id is None:
                continue
            name, tag, _type = k.prog_info(f.prog_id)
            entries.append(HookEntry(f.prog_id, name, tag, "cls_bpf", None, f.handle, f.priority, False))
        return Hook(q.revision, tuple(entries))

    # -- pins -----------------------------------------------------------------------------------------
    async def pin(self, att: MockAttachment, path: str) -> None:
        """Pin the link (or record the filter) at `path` in the kernel's pin table. A pinned filter is
        renamed with the ":pinned" mark, so that no `reap_orphans` ever removes it."""
        info = att.info
        try:
            if att.kind == "tcx":
                assert info.link_id is not None
                await self._k(self.kernel.obj_pin, info.link_id, path)
            else:
                assert info.priority is not None and info.handle is not None
                await self._k(self.kernel.obj_pin_filter, info.ifindex, info.direction, info.priority,
                              info.handle, path)
        except KernelError as exc:
            raise self._err(exc, op=Op.OBJ_PIN, dev=info.dev, direction=info.direction) from None
        if att.kind == "filter":
            tag = parse_tag(att.filter_name)
            name = format_tag(tag.session_tag if tag else self.tag, self._prog_name(att), pinned=True)
            try:
                try:
                    await self._replace_filter(att, info.prog_id, name)
                except KernelError as exc:
                    raise self._err(exc, op=Op.FILTER_REPLACE, dev=info.dev, direction=info.direction) from None
            except BaseException:
                with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                    try:
                        await self._k(self.kernel.obj_unpin, path)
                    except KernelError as exc:
                        log.warning("asynctc mock: removing the pin %s again failed: %s", path, exc)
                raise

    def _prog_name(self, att: MockAttachment) -> str:
        """The program name part of a filter's owner tag (else a stand-in naming the program's id)."""
        tag = parse_tag(att.filter_name)
        return tag.prog_name if tag is not None else f"prog{att.info.prog_id}"

    async def unpin(self, att: MockAttachment) -> None:
        """Remove the pin; the attachment is the session's again (a filter is renamed with this session's
        tag: reaped after this process dies, detached when the session closes)."""
        path = att.info.pinned
        if path is None:
            return
        if att.kind == "filter" and await self._filter_is_ours(att):
            try:
                await self._replace_filter(att, att.info.prog_id, format_tag(self.tag, self._prog_name(att)))
            except KernelError as exc:
                if exc.errno not in (_errno.ENOENT, _errno.ENODEV):
                    raise self._err(exc, op=Op.FILTER_REPLACE, dev=att.info.dev) from None
        try:
            await self._k(self.kernel.obj_unpin, path)
        except KernelError as exc:
            if exc.errno != _errno.ENOENT:
                raise self._err(exc, op=Op.OBJ_UNPIN, dev=att.info.dev) from None

    async def adopt_pinned(self, path: str, *, foreign: bool = False) -> MockAttachment | None:
        """Take over the link or filter pinned at `path`. A pinned link that was severed meanwhile is
        unpinned and reported as Severed."""
        try:
            got = await self._k(self.kernel.obj_get, path)
        except KernelError as exc:
            raise self._err(exc, op=Op.OBJ_GET, dev=path) from None
        if got[0] == "link":
            link_id = got[1]
            li = await self._k(self.kernel.link_info, link_id)
            tag = parse_session_tag(li.creator or "")
            self._check_owner(path, tag[0] if tag else None, foreign)
            if li.ifindex == 0:
                await self._k(self.kernel.link_close, link_id)
                await self._k(self.kernel.obj_unpin, path)
                raise from_errno(_errno.ENOLINK, op=Op.OBJ_GET, backend=self.name, dev=path,
                                 detail="the pinned link was severed; its pin was removed")
            try:
                _ifindex, name, _off = await self._k(self.kernel.dev_get, li.ifindex)
            except KernelError as exc:  # pragma: no cover - a live link has a device
                await self._k(self.kernel.link_close, link_id)
                raise self._err(exc, dev=li.ifindex) from None
            info = AttachmentInfo(
                backend=self.name, netns=self.ctx.netns, dev=name, ifindex=li.ifindex, direction=li.direction,
                prog_id=li.prog_id, link_id=link_id, handle=None, priority=None, offloaded=False, pinned=path,
            )
            return MockAttachment(info, kind="tcx")
        f = got[1]
        assert isinstance(f, FilterInfo) and f.prog_id is not None
        ftag = parse_tag(f.name)
        self._check_owner(path, ftag.owner if ftag else None, foreign)
        _ifindex, name, _off = await self._k(self.kernel.dev_get, f.ifindex)
        info = AttachmentInfo(
            backend=self.name, netns=self.ctx.netns, dev=name, ifindex=f.ifindex, direction=f.direction,
            prog_id=f.prog_id, link_id=None, handle=f.handle, priority=f.priority, offloaded=f.skip_sw,
            pinned=path,
        )
        return MockAttachment(info, kind="filter", filter_name=f.name)

    def _check_owner(self, path: str, owner: str | None, foreign: bool) -> None:
        if not foreign and owner != self.ctx.owner:
            raise NotOwned(f"the attachment pinned at {path} belongs to owner {owner!r}, not to this session's "
                           f"owner {self.ctx.owner!r}; open the session with owner={owner!r}, or pass "
                           "adopt_pinned(path, foreign=True) to take it over")

    async def release(self, att: MockAttachment) -> None:
        """Close our handle on a pinned link (the pin keeps it attached); filters need nothing."""
        if att.kind == "tcx" and not att.closed:
            assert att.info.link_id is not None
            att.closed = True
            try:
                await self._k(self.kernel.link_close, att.info.link_id)
            except KernelError as exc:
                if exc.errno != _errno.ENOENT:
                    raise self._err(exc, dev=att.info.dev) from None

    # -- orphans --------------------------------------------------------------------------------------
    def _is_dead_session(self, session_tag: str) -> bool:
        """Whether `session_tag` is another session of this owner whose process is dead."""
        parsed = parse_session_tag(session_tag)
        if parsed is None or parsed[0] != self.ctx.owner:
            return False
        return session_tag != self.tag and not self.kernel.tag_alive(session_tag)

    def _is_orphan_filter(self, name: str) -> bool:
        """Whether a filter's name is the owner tag of a dead session of this owner, and not pinned."""
        tag = parse_tag(name)
        return tag is not None and not tag.pinned and self._is_dead_session(tag.session_tag)

    async def reap_orphans(self) -> tuple[HookEntry, ...]:
        """Delete the unpinned cls_bpf filters whose owner tag names this session's owner and a dead process
        (tcx links die with their process, unless pinned on purpose), then the empty clsact qdiscs such a
        process created. Returns the filters removed."""
        return await self._k(self._reap_sync)

    def _reap_sync(self) -> tuple[HookEntry, ...]:
        k = self.kernel
        removed: list[HookEntry] = []
        for ifindex in k.devices().values():
            try:
                for direction in Direction:
                    for f in k.filter_dump(ifindex, direction):
                        if f.kind != "bpf" or f.prog_id is None or not self._is_orphan_filter(f.name):
                            continue
                        name, tag, _type = k.prog_info(f.prog_id)
                        try:
                            k.filter_delete(ifindex, direction, f.priority, f.handle)
                        except KernelError as exc:
                            if exc.errno == _errno.ENOENT:
                                continue
                            raise
                        removed.append(HookEntry(f.prog_id, name, tag, "cls_bpf", None, f.handle, f.priority,
                                                 False))
                q = k.qdisc_get(ifindex)
                if (q is not None and q.kind == "clsact" and q.creator is not None
                        and self._is_dead_session(q.creator)
                        and not any(k.filter_dump(ifindex, d) for d in Direction)):
                    k.qdisc_delete(ifindex)
            except KernelError as exc:
                if exc.errno == _errno.ENODEV:
                    continue  # the device went away meanwhile
                raise self._err(exc, op=exc.op, dev=ifindex) from None
        return tuple(removed)

    # -- lifecycle ------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Delete the empty clsact qdiscs this session created that an earlier cleanup could not."""
        failures: list[str] = []
        for ifindex in (await self._k(self.kernel.devices)).values():
            try:
                await self._k(self._drop_qdisc_sync, ifindex)
            except KernelError as exc:
                if exc.errno != _errno.ENODEV:
                    failures.append(f"ifindex {ifindex}: {exc}")
        if failures:
            raise TCError("could not delete clsact qdiscs this session created: " + "; ".join(failures))

    # -- events ---------------------------------------------------------------------------------------
    def open_event_source(self) -> AbstractAsyncContextManager[EventSource]:
        """The MockKernel's events, as the netlink multicast source would deliver them."""
        return self._event_source()

    @asynccontextmanager
    async def _event_source(self) -> AsyncIterator[EventSource]:
        source = MockEventSource(self.kernel, trio.lowlevel.current_trio_token())
        await source.start()
        try:
            yield source
        finally:
            source.close()


def diff_snapshots(old: KernelSnapshot, new: KernelSnapshot) -> list[KernelEvent]:
    """The events that turn `old` into `new`: removals (filters, qdiscs, devices) then additions."""
    out: list[KernelEvent] = []
    for key, (kind, prog_id) in old.filters.items():
        if new.filters.get(key) != (kind, prog_id) and key not in new.filters:
            ifindex, direction, prio, handle = key
            out.append(FilterRemoved(ifindex, direction, prio, handle, kind, prog_id, False))
    for ifindex, (kind, handle, parent) in old.qdiscs.items():
        if new.qdiscs.get(ifindex) != (kind, handle, parent):
            out.append(QdiscRemoved(ifindex, kind, handle, parent))
    for ifindex, name in old.devices.items():
        if new.devices.get(ifindex) != name:
            out.append(DeviceRemoved(ifindex, name))
    for ifindex, name in new.devices.items():
        if old.devices.get(ifindex) != name:
            out.append(DeviceAdded(ifindex, name))
    for ifindex, (kind, handle, parent) in new.qdiscs.items():
        if old.qdiscs.get(ifindex) != (kind, handle, parent):
            out.append(QdiscAdded(ifindex, kind, handle, parent))
    for key, (kind, prog_id) in new.filters.items():
        if old.filters.get(key) != (kind, prog_id):
            ifindex, direction, prio, handle = key
            out.append(FilterAdded(ifindex, direction, prio, handle, kind, prog_id, False))
    return out


def _apply(snap: KernelSnapshot, ev: KernelEvent) -> None:
    """Keep a source's picture of the kernel up to date with one delivered event."""
    if isinstance(ev, DeviceAdded):
        snap.devices[ev.ifindex] = ev.name
    elif isinstance(ev, DeviceRemoved):
        snap.devices.pop(ev.ifindex, None)
        snap.qdiscs.pop(ev.ifindex, None)
        for key in [k for k in snap.filters if k[0] == ev.ifindex]:
            del snap.filters[key]
    elif isinstance(ev, QdiscAdded):
        snap.qdiscs[ev.ifindex] = (ev.kind, ev.handle, ev.parent)
    elif isinstance(ev, QdiscRemoved):
        snap.qdiscs.pop(ev.ifindex, None)
        for key in [k for k in snap.filters if k[0] == ev.ifindex]:
            del snap.filters[key]
    elif isinstance(ev, FilterAdded) and ev.direction is not None:
        snap.filters[(ev.ifindex, ev.direction, ev.priority, ev.handle)] = (ev.kind, ev.prog_id)
    elif isinstance(ev, FilterRemoved) and ev.direction is not None:
        snap.filters.pop((ev.ifindex, ev.direction, ev.priority, ev.handle), None)


class MockEventSource(EventSource):
    """Events of a MockKernel for one trio run: no polling. The kernel (in any thread) wakes the source
    through the trio token; `receive()` takes what is queued. After an overflow the source re-reads the
    kernel (in a worker thread), returns the differences and then `Resynced`."""

    def __init__(self, kernel: MockKernel, token: trio.lowlevel.TrioToken) -> None:
        self._kernel = kernel
        self._token = token
        self._wake = trio.Event()
        self._sub: Subscription | None = None
        self._known: KernelSnapshot | None = None

    async def start(self) -> None:
        def start() -> tuple[Subscription, KernelSnapshot]:
            sub = self._kernel.subscribe(self._ping)
            return sub, sub.snapshot()

        self._sub, self._known = await trio.to_thread.run_sync(start)

    def _ping(self) -> None:
        # Called under the kernel lock by whichever thread changed the kernel: never block here.
        try:
            self._token.run_sync_soon(self._set_wake)
        except trio.RunFinishedError:
            pass

    def _set_wake(self) -> None:
        self._wake.set()

    async def receive(self) -> list[KernelEvent | Resynced]:
        """The next batch of events (never empty)."""
        assert self._sub is not None and self._known is not None
        while True:
            overflowed, events = self._sub.take_events()
            if overflowed:
                snap = await trio.to_thread.run_sync(self._sub.resync)
                out: list[KernelEvent | Resynced] = list(diff_snapshots(self._known, snap))
                self._known = snap
                out.append(Resynced("the kernel's event queue overflowed; state re-read"))
                return out
            if events:
                for ev in events:
                    _apply(self._known, ev)
                return list(events)
            self._wake = trio.Event()
            await self._wake.wait()

    def close(self) -> None:
        """Stop receiving events."""
        if self._sub is not None:
            self._sub.close()
