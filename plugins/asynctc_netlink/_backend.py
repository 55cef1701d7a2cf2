"""The netlink backend: clsact qdiscs and cls_bpf direct-action filters over asynctc's trio rtnetlink
transport (any kernel with clsact and cls_bpf; the legacy TC path).

Ownership.
- Filters: each filter's TCA_BPF_NAME carries an owner tag (`asynctc.lowlevel.tcpolicy` documents the
  format, "asynctc:OWNER:PID.START.SERIAL:PROGNAME[:pinned]"), so whose a filter is can be proven from
  the kernel alone, after a restart too. Before deleting or replacing its filter, the backend reads it back (a
  filter get) and checks that the name is still the one it wrote: a filter someone else put in the same
  slot is never touched (the kernel has no compare-and-delete, so a change between that read and the
  delete is the one window left).
- clsact: created only when absent (NLM_F_EXCL: an EEXIST means someone else made it, so it is not ours),
  remembered per device by this backend instance (one per session; two sessions of one process are two
  owners, serialised only by the kernel), and deleted only when this instance
  created it and no filter at all (any classifier, any chain) is left on either hook. Another process
  adding a filter between that check and the delete is a window the kernel offers no way to close.
  An `ingress` qdisc in the way of clsact raises AlreadyAttached (the kernel's EEXIST) naming the command
  that removes it; nothing is left behind. Orphaned empty clsact qdiscs (their creator died) are left in
  place by `reap_orphans`: whether asynctc made one cannot be told from the kernel, and an empty clsact
  is harmless.

Positions become priorities relative to every filter on the hook (see
`asynctc.lowlevel.tcpolicy.choose_priority`); `priority=` (1..65535) and `handle=` (default 1) attach
options choose the slot directly. Choosing a priority and adding the filter are serialised per device
within a backend, and the kernel's EEXIST is the final word between processes (an automatically chosen
priority is chosen again, up to 3 times).

Offload: offload="never" asks for software only (skip_hw, so a real NIC does not also get the program);
"require" asks for skip_sw (hardware only, OffloadError when refused, leaving no filter and no qdisc we
created); "prefer" tries skip_sw, then software. `info.offloaded` is the kernel's in_hw flag read back
from the created filter (NLM_F_ECHO). An update of an offloaded filter replaces it with skip_sw too: if
the hardware refuses, the replace fails as a whole and the old program keeps running.

Pinning. Filters outlive their process anyway; `pin(path)` records the attachment so that
`adopt_pinned(path)` can take it over in a later session:
- `path`: the filter's program, pinned (BPF_OBJ_PIN);
- `path + "_record"`: a one-entry BPF array map whose 256-byte value is a `_policy.PinRecord` (magic,
  ifindex, direction, priority, handle, program id, network namespace inode, filter name);
- the filter is renamed with the ":pinned" mark (an atomic NLM_F_REPLACE with the same program), so that
  `reap_orphans` never removes a pinned filter after its process died.
`unpin()` removes both objects and renames the filter with the current session's tag. The program at
`path` keeps its own name, so the bpf_link backend (tried first in a bpf_link session) sees a program,
not a link, and passes it on.

Orphans: `reap_orphans` dumps the clsact filters of every device, and deletes the cls_bpf filters tagged
with this session's owner whose process is dead (no /proc/PID, or another start time there), unless
pinned. A live process's filters (this one's included) and foreign filters are never touched. Process ids
are those of the caller's pid namespace: owners sharing a tag across pid namespaces must not share it.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import ClassVar, Final

import trio

from asynctc import (
    AlreadyAttached,
    AttachmentInfo,
    BackendUnavailable,
    Conflict,
    DeviceNotFound,
    Direction,
    Hook,
    HookEntry,
    NotOwned,
    OffloadError,
    Op,
    PermissionDenied,
    PinError,
    Probe,
    Program,
    Severed,
    TCError,
    from_errno,
    translated,
)
from asynctc.backend import AttachRequest, Backend, BackendAttachment, BackendContext, EventSource, Updated
from asynctc.lowlevel import bpf, codec
from asynctc.lowlevel import hook as hooklib
from asynctc.lowlevel.devlock import DeviceLocking
from asynctc.lowlevel.kernel import BoundDeviceNames, Kernel
from asynctc.lowlevel.locks import held
from asynctc.lowlevel.netdev import resolve_device
from asynctc.lowlevel.netns import current_netns_inode
from asynctc.lowlevel.tcpolicy import (
    AUTO_PRIORITY_ATTEMPTS,
    FilterTag,
    filter_slot_options,
    format_tag,
    parse_tag,
    place_filter,
)
from asynctc.lowlevel.transport import NetlinkTransport, RequestBuilder, open_transport, start_transport

from ._policy import RECORD_SIZE, PinRecord

__all__ = ["FilterAttachment", "NetlinkBackend"]

log = logging.getLogger("asynctc.netlink")

ADD_FLAGS: Final = codec.NLM_F_REQUEST | codec.NLM_F_ACK | codec.NLM_F_CREATE | codec.NLM_F_EXCL | codec.NLM_F_ECHO
# No NLM_F_CREATE: a replace of a filter that someone deleted fails with ENOENT instead of recreating it.
REPLACE_FLAGS: Final = codec.NLM_F_REQUEST | codec.NLM_F_ACK | codec.NLM_F_REPLACE | codec.NLM_F_ECHO
DELETE_FLAGS: Final = codec.NLM_F_REQUEST | codec.NLM_F_ACK
CLEANUP_TIMEOUT: Final = 10.0
RECORD_SUFFIX: Final = "_record"  # bpffs refuses names with dots (EPERM)
NEXT_SUFFIX: Final = "_asynctc_next"  # beside a pin while an update moves it to the new program
CLSACT_ATTEMPTS: Final = 3  # a clsact deleted under an attach by a foreign tool is made again this often

def _tcx_revision(k: Kernel, ifindex: int, direction: Direction) -> int | None:
    try:
        return k.bpf.prog_query(ifindex, hooklib.ATTACH_TYPES[direction]).revision
    except bpf.BpfError:
        return None


def _move_pin(k: Kernel, prog_fd: int, path: str, record: Callable[[], PinRecord]) -> None:
    """Make the pin at `path` name `prog_fd`'s program and its record say `record()`, each step atomic:
    the program is pinned beside the old pin and renamed over it, then the record map's value is
    rewritten in place (in a worker inside the namespace)."""
    value = record().encode()
    k.pins.pin_over(prog_fd, path, NEXT_SUFFIX)
    map_fd = k.pins.get_object(path + RECORD_SUFFIX)
    try:
        k.bpf.map_update(map_fd, 0, value)
    finally:
        k.bpf.close(map_fd)


class FilterAttachment(BackendAttachment):
    """One cls_bpf filter of this backend: where it is, the TCA_BPF_NAME it was given (proof of ownership)
    and a duplicate fd of its current program (for pinning and renaming)."""

    def __init__(self, info: AttachmentInfo, *, name: str, prog_fd: int, gen_flags: int) -> None:
        super().__init__(info)
        self.name = name
        self.prog_fd: int | None = prog_fd
        self.gen_flags = gen_flags  # the skip_hw/skip_sw request flags the filter was made with
        # Replaces in flight (update, pin, unpin rename the filter): while one runs, the name in the kernel
        # may already be the new one, so a concurrent liveness check must not call the filter foreign.
        self.busy = 0
        self.held = False  # counted in its backend's filters per device (NetlinkBackend._hold)

    @property
    def parent(self) -> int:
        return hooklib.CLSACT_PARENTS[self.info.direction]

    @property
    def slot(self) -> tuple[int, int]:
        assert self.info.priority is not None and self.info.handle is not None
        return self.info.priority, self.info.handle

    def take_fd(self) -> int | None:
        fd, self.prog_fd = self.prog_fd, None
        return fd

    def __repr__(self) -> str:
        return f"<FilterAttachment {self.name!r} {self.info}>"


class NetlinkBackend(Backend[FilterAttachment]):
    """clsact + cls_bpf filters over rtnetlink. See the module docstring.

    Attach options: `priority=` (1..65535) and `handle=` (1..0xffffffff, default 1) choose the filter's
    slot; without `priority=` the position chooses it.
    """

    name: ClassVar[str] = "netlink"
    attach_options: ClassVar[Mapping[str, type]] = {"priority": int, "handle": int}
    can_offload: ClassVar[bool] = True
    has_revisions: ClassVar[bool] = False
    kernel_type: ClassVar[type | None] = Kernel

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.kernel: Kernel = ctx.kernel
        self._nl: NetlinkTransport | None = None
        self._names = hooklib.ProgNameCache(self.kernel.bpf)
        self._locks: defaultdict[int, trio.Lock] = defaultdict(trio.Lock)  # per ifindex
        self._devlocks: DeviceLocking | None = None  # shared with every asynctc process (open())
        self._devnames: BoundDeviceNames | None = None  # the namespace's device names (open())
        self._created: set[int] = set()  # ifindexes whose clsact qdisc this instance created
        self._held: dict[int, int] = {}  # ifindex -> how many filters this instance holds there

    # -- availability and lifecycle ------------------------------------------------------------------
    @classmethod
    async def probe(cls, ctx: BackendContext) -> Probe:
        """rtnetlink must accept a change request (it checks CAP_NET_ADMIN before anything else: a qdisc
        delete on ifindex 0 then fails harmlessly with ENODEV), and the kernel must have cls_bpf."""
        refused: TCError | None = None
        try:
            async with open_transport(ctx.runner, kernel=ctx.kernel) as nl:
                try:
                    with translated(Op.NETLINK, backend=cls.name):
                        await nl.request(lambda seq: codec.encode_qdisc_del(seq, 0, kind=None))
                except DeviceNotFound:
                    pass  # the expected answer: the request got past the capability check
                except TCError as exc:
                    refused = exc
        except (OSError, TCError) as exc:
            return Probe(False, f"rtnetlink is not usable here: {exc}")
        if isinstance(refused, PermissionDenied):
            return Probe(False, f"rtnetlink refused a tc change: {refused}")
        if refused is not None:
            return Probe(False, f"rtnetlink is not usable here: {refused}")
        present = await ctx.runner.run(ctx.kernel.classifier_present, "bpf")
        if present is False:
            return Probe(False, "the kernel has no cls_bpf classifier (CONFIG_NET_CLS_BPF)")
        note = "" if present else " (cls_bpf's presence could not be checked)"
        return Probe(True, f"rtnetlink with CAP_NET_ADMIN: clsact + cls_bpf filters{note}")

    async def open(self) -> None:
        """Open the device locks, the device names of the session's namespace (`Kernel.open_device_names`,
        made inside it: `resolve_device` then asks them on the trio thread) and the rtnetlink transport
        (its I/O thread starts with the first request). What was opened is closed again if a later step
        fails."""
        if self._nl is not None:
            return
        ino = self.ctx.runner.ns_inode or os.stat("/proc/self/ns/net").st_ino
        try:
            self._devlocks = self.kernel.device_locks(ino)
        except OSError as exc:
            raise BackendUnavailable(f"the netlink backend cannot create its device locks: {exc}; they "
                                     "keep asynctc processes from deleting each other's filters") from None
        try:
            if self._devnames is None:
                self._devnames = await self.ctx.runner.run(self.kernel.open_device_names)
            self._nl = await start_transport(self.ctx.runner, kernel=self.kernel)
        except BaseException:
            self._close_local()
            raise

    def _close_local(self) -> None:
        """Close the device names and the device locks (idempotent)."""
        names, self._devnames = self._devnames, None
        locks, self._devlocks = self._devlocks, None
        try:
            if names is not None:
                names.close()
        finally:
            if locks is not None:
                locks.close()

    async def aclose(self) -> None:
        """Delete the empty clsact qdiscs this instance created that an earlier cleanup could not, then
        close the transport. Idempotent; failures are raised (after the transport is closed)."""
        nl = self._nl
        if nl is None:
            return
        failures: list[str] = []
        try:
            for ifindex in sorted(self._created):
                try:
                    async with self._device(ifindex, ifindex):  # never between another session's checks
                        await self._drop_clsact_if_empty(ifindex, ifindex, quiet=False)
                except (TCError, OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                    failures.append(f"ifindex {ifindex}: {exc}")
        finally:
            self._nl = None
            try:
                await nl.aclose()
            finally:
                self._close_local()
        if failures:
            raise TCError("the netlink backend could not delete clsact qdiscs it created: " + "; ".join(failures))

    def _transport(self) -> NetlinkTransport:
        if self._nl is None:
            raise TCError("the netlink backend is closed (its session has ended)")
        return self._nl

    async def _request(self, op: Op, build: RequestBuilder, *, dev: str | int | None = None,
                       direction: Direction | None = None, program: object | None = None) -> list[codec.Message]:
        """One rtnetlink request; the kernel's refusal becomes asynctc's exception here, at the backend's
        edge (the transport raises it raw)."""
        with translated(op, backend=self.name, dev=dev, direction=direction, program=program):
            return await self._transport().request(build, op=op)

    async def _dump(self, op: Op, build: RequestBuilder, *, dev: str | int | None = None) -> list[codec.Message]:
        """One rtnetlink dump, its errors translated as `_request`'s."""
        with translated(op, backend=self.name, dev=dev):
            return await self._transport().dump(build, op=op)

    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        """(ifindex, the device's own name), asked on the trio thread of the device names opened in the
        session's namespace (SIOCGIFINDEX / SIOCGIFNAME: no rtnl, no kernel work waited for, no thread
        waited for; `SocketDeviceNames`). It never yields to other tasks either."""
        names = self._devnames
        if names is None:
            raise TCError("the netlink backend is closed (its session has ended)")
        return resolve_device(dev, self.ctx.netns, names)

    @asynccontextmanager
    async def _device(self, ifindex: int, dev: str | int) -> AsyncIterator[None]:
        """Hold the device: its trio lock (this instance's tasks) and its asynctc-wide lock (every other
        asynctc session and process), around steps that check the clsact qdisc and then change it."""
        async with held(self._locks[ifindex]):
            locks = self._devlocks
            if locks is None:
                raise TCError("the netlink backend is closed (its session has ended)")
            try:
                await locks.acquire(ifindex)
            except TimeoutError as exc:
                raise TCError(f"{exc} ({dev}); another asynctc process is stuck changing it",
                              errno=_errno.EAGAIN) from None
            try:
                yield
            finally:
                locks.release(ifindex)

    # -- clsact --------------------------------------------------------------------------------------
    async def _ingress_slot_kind(self, ifindex: int, dev: str | int) -> str | None:
        """The kind of the qdisc in the device's ingress slot ("clsact", "ingress"), None if empty."""
        msgs = await self._dump(Op.QDISC_DUMP, lambda seq: codec.encode_dump_request(seq, codec.RTM_GETQDISC),
                                dev=dev)
        for m in msgs:
            if isinstance(m, codec.QdiscMsg) and m.ifindex == ifindex and m.parent == codec.CLSACT_PARENT:
                return m.kind
        return None

    async def _ensure_clsact(self, ifindex: int, dev: str) -> bool:
        """Make sure the device has a clsact qdisc, creating it (EXCL) only when absent and recording then
        that this instance created it; True when it did (both hooks were empty then). An ingress qdisc in
        the way raises AlreadyAttached."""
        for _ in range(3):
            try:
                await self._request(Op.CLSACT_ADD, lambda seq: codec.encode_qdisc_add_clsact(seq, ifindex), dev=dev)
            except AlreadyAttached:
                kind = await self._ingress_slot_kind(ifindex, dev)
                if kind == "clsact":
                    return False  # someone's (or ours from before): used, never deleted unless ours
                if kind is None:
                    continue  # it went away meanwhile: try again
                raise from_errno(_errno.EEXIST, op=Op.CLSACT_ADD, backend=self.name, dev=dev,
                                 detail=f"{dev} has an {kind} qdisc; `tc qdisc del dev {dev} {kind}` removes it"
                                 ) from None
            else:
                self._created.add(ifindex)
                return True
        raise TCError(f"the clsact qdisc of {dev} kept appearing and disappearing; another program is "
                      "changing it: try again", errno=_errno.EAGAIN)

    async def _any_filter(self, ifindex: int) -> bool:
        """Whether any filter (any classifier, chain or hook) is on the device's clsact qdisc."""
        for parent in hooklib.CLSACT_PARENTS.values():
            def build(seq: int, parent: int = parent) -> bytes:
                return codec.encode_dump_request(seq, codec.RTM_GETTFILTER, ifindex, parent)

            msgs = await self._dump(Op.FILTER_DUMP, build, dev=ifindex)
            if any(isinstance(m, codec.FilterMsg) for m in msgs):
                return True
        return False

    async def _drop_clsact_if_empty(self, ifindex: int, dev: str | int, *, quiet: bool = True) -> None:
        """Delete the clsact qdisc if this instance created it and no filter is left on it. Call with the
        device's lock held. While this instance still holds filters on the device the kernel is not asked
        (they keep it non-empty); one of them deleted by someone else keeps an empty clsact only until it
        is found severed, whose release calls this again. A device or qdisc already gone is fine; other
        failures are logged (quiet) or raised, and the qdisc stays remembered so that `aclose` tries again."""
        if ifindex not in self._created or self._held.get(ifindex, 0) > 0:
            return  # not ours, or ours with our own filters still on it: nothing to check
        try:
            if await self._any_filter(ifindex):
                return
            await self._request(Op.QDISC_DELETE, lambda seq: codec.encode_qdisc_del(seq, ifindex), dev=dev)
        except DeviceNotFound:
            pass  # the device is gone, and its qdisc with it
        except TCError as exc:
            # EINVAL/ENOENT: no clsact there any more (someone deleted it, or replaced it by another kind,
            # which the kind check keeps us from deleting).
            if exc.errno not in (_errno.EINVAL, _errno.ENOENT):
                if not quiet:
                    raise
                log.warning("asynctc netlink: could not delete the clsact qdisc of %s: %s", dev, exc)
                return
        self._created.discard(ifindex)

    async def _cleanup_clsact(self, ifindex: int, dev: str) -> None:
        with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
            try:
                await self._drop_clsact_if_empty(ifindex, dev)
            except Exception as exc:  # reported; the caller's own error wins
                log.warning("asynctc netlink: cleanup of the clsact qdisc of %s failed: %r", dev, exc)

    # -- attach --------------------------------------------------------------------------------------
    async def _choose(self, request: AttachRequest, hook_empty: bool) -> int:
        """A free priority for the request's position among the filters on the hook now (`hook_empty`:
        known without asking, the clsact qdisc was created just now under the device's lock). u32 hash
        tables count: a priority holding only a table is taken."""
        filters: list[codec.FilterMsg] = []
        if not hook_empty:
            with translated(Op.FILTER_DUMP, backend=self.name, dev=request.dev, direction=request.direction):
                filters = await hooklib.dump_filters(self._transport(), request.ifindex, request.direction,
                                                     dev=request.dev, tables=True)
        return place_filter(request.placement, [(f.priority, f.handle, f.kind, f.bpf_id) for f in filters],
                            dev=request.dev, direction=request.direction, backend=self.name)

    async def _add_filter(
        self, request: AttachRequest, priority: int | None, handle: int, name: str, hook_empty: bool
    ) -> tuple[codec.FilterMsg, int]:
        """Add the filter (choosing its priority unless given), in hardware first where asked; returns
        the created filter as the kernel echoed it and the skip flags it was made with."""
        prog_fd = request.program.fd
        parent = hooklib.CLSACT_PARENTS[request.direction]
        ifindex = request.ifindex
        modes: list[tuple[int, Op]] = {
            "require": [(codec.TCA_CLS_FLAGS_SKIP_SW, Op.FILTER_ADD_HW)],
            "prefer": [(codec.TCA_CLS_FLAGS_SKIP_SW, Op.FILTER_ADD_HW), (codec.TCA_CLS_FLAGS_SKIP_HW, Op.FILTER_ADD)],
            "never": [(codec.TCA_CLS_FLAGS_SKIP_HW, Op.FILTER_ADD)],
        }[request.offload]
        for attempt in range(AUTO_PRIORITY_ATTEMPTS):
            # After a collision the hook is not empty any more: the next choice asks the kernel.
            prio = priority if priority is not None else await self._choose(request, hook_empty and not attempt)
            for gen_flags, op in modes:
                def build(seq: int, prio: int = prio, gen_flags: int = gen_flags) -> bytes:
                    return codec.encode_filter(seq, codec.RTM_NEWTFILTER, ADD_FLAGS, ifindex, parent, prio,
                                               handle, codec.ETH_P_ALL, prog_fd, name, True, gen_flags)
                try:
                    msgs = await self._request(op, build, dev=request.dev, direction=request.direction,
                                               program=request.program)
                except OffloadError as exc:
                    if request.offload == "prefer" and gen_flags & codec.TCA_CLS_FLAGS_SKIP_SW:
                        log.info("asynctc netlink: %s refused hardware offload (%s); attaching in software",
                                 request.dev, exc)
                        continue
                    raise
                except AlreadyAttached:
                    if priority is not None or attempt + 1 == AUTO_PRIORITY_ATTEMPTS:
                        raise
                    break  # another process took the priority we chose: choose again
                return await self._echoed(msgs, ifindex, parent, prio, handle, request.dev), gen_flags
        raise AssertionError("unreachable: every attempt returns or raises")  # pragma: no cover

    async def _echoed(
        self, msgs: list[codec.Message], ifindex: int, parent: int, prio: int, handle: int, dev: str
    ) -> codec.FilterMsg:
        for m in msgs:
            if isinstance(m, codec.FilterMsg) and (m.priority, m.handle) == (prio, handle) and m.bpf_id:
                return m
        got = await self._get(ifindex, parent, prio, handle, dev)
        if got is None:
            raise from_errno(_errno.ENOENT, op=Op.FILTER_GET, backend=self.name, dev=dev,
                             detail="the filter vanished right after it was added")
        return got

    async def attach(self, request: AttachRequest) -> FilterAttachment:
        if request.expected_revision is not None:
            # The core refuses it for a session on this backend; a backend that routes attaches here (the
            # mock's mode="legacy") must not have it ignored either.
            raise TCError(f"expected_revision needs a hook with revisions (tcx); legacy tc filters ({self.name} "
                          "backend, cls_bpf) have none. Attach a tcx link, or leave expected_revision unset",
                          errno=_errno.EINVAL)
        priority, handle = filter_slot_options(request.options)
        prog_fd = request.program.fd  # ProgramError when closed or simulated
        name = format_tag(self.ctx.session_tag, request.program.name)
        # dup/close of a *program* fd never block (only closing an attached tcx link fd waits for RCU):
        # no worker-thread hop for them.
        dup = self.kernel.bpf.dup(prog_fd)
        try:
            async with self._device(request.ifindex, request.dev):
                for attempt in range(CLSACT_ATTEMPTS):
                    created = await self._ensure_clsact(request.ifindex, request.dev)
                    try:
                        f, gen_flags = await self._add_filter(request, priority, handle, name, hook_empty=created)
                        break
                    except (DeviceNotFound, TCError) as exc:
                        # A foreign tool (asynctc processes hold the device lock) deleted the clsact qdisc
                        # between our check and our filter: make it again and retry.
                        if (attempt + 1 < CLSACT_ATTEMPTS and exc.errno in (_errno.ENOENT, _errno.EINVAL)
                                and await self._ingress_slot_kind(request.ifindex, request.dev) is None):
                            self._created.discard(request.ifindex)
                            continue
                        await self._cleanup_clsact(request.ifindex, request.dev)
                        raise
                    except BaseException:
                        await self._cleanup_clsact(request.ifindex, request.dev)
                        raise
        except BaseException:
            self.kernel.bpf.close(dup)
            raise
        info = AttachmentInfo(
            backend=self.name, netns=self.ctx.netns, dev=request.dev, ifindex=request.ifindex,
            direction=request.direction, prog_id=f.bpf_id or request.program.id, link_id=None,
            handle=f.handle, priority=f.priority, offloaded=f.in_hw, pinned=None,
        )
        return self._hold(FilterAttachment(info, name=name, prog_fd=dup, gen_flags=gen_flags))

    def _hold(self, att: FilterAttachment) -> FilterAttachment:
        """Count `att` among this instance's filters on its device: while any is held there, the device's
        clsact cannot be empty, and detaching another filter skips the emptiness check."""
        if not att.held:
            att.held = True
            self._held[att.info.ifindex] = self._held.get(att.info.ifindex, 0) + 1
        return att

    def _unhold(self, att: FilterAttachment) -> None:
        if att.held:
            att.held = False
            left = self._held[att.info.ifindex] - 1
            if left:
                self._held[att.info.ifindex] = left
            else:
                del self._held[att.info.ifindex]

    # -- reading one filter --------------------------------------------------------------------------
    async def _get(self, ifindex: int, parent: int, prio: int, handle: int, dev: str | int) -> codec.FilterMsg | None:
        """The filter in a slot (a filter get), None if there is none. DeviceNotFound if the device is gone."""
        try:
            msgs = await self._request(
                Op.FILTER_GET, lambda seq: codec.encode_filter_get(seq, ifindex, parent, prio, handle), dev=dev)
        except Severed:  # ENOENT: no such priority or handle
            return None
        except TCError as exc:
            if exc.errno == _errno.EINVAL:  # no clsact qdisc (any more), or another kind in the slot
                return None
            raise
        return next((m for m in msgs if isinstance(m, codec.FilterMsg)), None)

    async def _current(self, att: FilterAttachment) -> codec.FilterMsg | None:
        """Our filter as the kernel has it now; None if it is gone or the slot holds someone else's."""
        prio, handle = att.slot
        try:
            cur = await self._get(att.info.ifindex, att.parent, prio, handle, att.info.dev)
        except DeviceNotFound:
            return None
        if cur is None or cur.kind != "bpf" or cur.bpf_name != att.name:
            return None
        return cur

    # -- detach, liveness ----------------------------------------------------------------------------
    async def detach(self, att: FilterAttachment) -> bool:
        """Delete the filter. A pinned one is unpinned first (renamed unpinned, then its pin removed), so
        that a crash at any step leaves a pin naming the filter, or an unpinned filter of a dead process
        that reap_orphans removes; never a pin naming nothing, nor a filter marked pinned without a pin."""
        info = att.info
        prio, handle = att.slot
        ours = False
        if info.pinned is not None and await self._current(att) is not None:
            await self.unpin(att)
        try:
            async with self._device(info.ifindex, info.dev):
                if await self._current(att) is not None:
                    try:
                        await self._request(
                            Op.FILTER_DELETE,
                            lambda seq: codec.encode_filter(seq, codec.RTM_DELTFILTER, DELETE_FLAGS, info.ifindex,
                                                            att.parent, prio, handle),
                            dev=info.dev, direction=info.direction)
                        ours = True
                    except (Severed, DeviceNotFound):
                        ours = False  # deleted under us between the check and the delete
                self._unhold(att)
                await self._drop_clsact_if_empty(info.ifindex, info.dev)
        finally:
            # Whatever the kernel said, our resources go (the contract: detach releases in both cases).
            self._unhold(att)
            await self._release_fd(att)
        if info.pinned is not None:
            # A record of a filter that is gone would only make adopt_pinned fail later.
            await self._remove_pin(info.pinned)
        return ours

    async def _release_fd(self, att: FilterAttachment) -> None:
        fd = att.take_fd()
        if fd is not None:
            self.kernel.bpf.close(fd)  # a program fd: closing it never blocks (see attach)
        await trio.lowlevel.checkpoint()

    async def release(self, att: FilterAttachment) -> None:
        """A pinned filter stays; only our duplicate of its program's fd is closed."""
        self._unhold(att)
        await self._release_fd(att)

    async def is_attached(self, att: FilterAttachment) -> bool:
        """Whether our filter is still in its slot: a cls_bpf filter with the name we gave it (the name is
        the proof; during one of our own replaces, which renames it, the filter counts as ours)."""
        cur = await self._current(att)
        return cur is not None or att.busy > 0

    # -- update --------------------------------------------------------------------------------------
    async def _replace(
        self, att: FilterAttachment, prog_fd: int, name: str, program: object, skip_sw: bool
    ) -> codec.FilterMsg:
        """NLM_F_REPLACE of our filter's program and name in its slot (atomic for packets)."""
        info = att.info
        prio, handle = att.slot
        gen_flags = codec.TCA_CLS_FLAGS_SKIP_SW if skip_sw else att.gen_flags & codec.TCA_CLS_FLAGS_SKIP_HW
        op = Op.FILTER_REPLACE_HW if skip_sw else Op.FILTER_REPLACE

        def build(seq: int) -> bytes:
            return codec.encode_filter(seq, codec.RTM_NEWTFILTER, REPLACE_FLAGS, info.ifindex, att.parent, prio,
                                       handle, codec.ETH_P_ALL, prog_fd, name, True, gen_flags)

        att.busy += 1
        try:
            msgs = await self._request(op, build, dev=info.dev, direction=info.direction, program=program)
            f = await self._echoed(msgs, info.ifindex, att.parent, prio, handle, info.dev)
            att.name = name
            return f
        finally:
            att.busy -= 1

    async def update(self, att: FilterAttachment, program: Program, *, expected: Program | None) -> Updated:
        """Replace the filter's program in its slot (NLM_F_REPLACE), holding the device: another asynctc
        session's filter can then not take the slot between our check that the filter is ours and the
        replace (which would overwrite its program)."""
        async with self._device(att.info.ifindex, att.info.dev):
            return await self._update_held(att, program, expected=expected)

    async def _update_held(self, att: FilterAttachment, program: Program, *, expected: Program | None) -> Updated:
        info = att.info
        where = f"update of {info.dev} {info.direction} prio {info.priority} handle {info.handle:#x} [netlink backend]"
        cur = await self._current(att)
        if cur is None:
            raise Severed(f"{where} failed: the filter is gone (deleted, or its slot now holds someone else's "
                          "filter); nothing was changed", errno=_errno.ENOENT)
        if expected is not None and cur.bpf_id != expected.id:
            raise Conflict(f"{where}: the filter runs program {cur.bpf_id}, not the expected program {expected.id} "
                           f"({expected.name!r}); nothing was changed. query() and retry", errno=_errno.EPERM)
        tag = parse_tag(att.name)
        new_name = format_tag(tag.session_tag if tag else self.ctx.session_tag, program.name,
                              pinned=bool(tag and tag.pinned))
        new_fd = self.kernel.bpf.dup(program.fd)
        try:
            f = await self._replace(att, program.fd, new_name, program, cur.skip_sw)
        except BaseException:
            self.kernel.bpf.close(new_fd)
            raise
        old_fd, att.prog_fd = att.prog_fd, new_fd
        if old_fd is not None:
            self.kernel.bpf.close(old_fd)
        att.name = new_name
        prog_id = f.bpf_id or program.id
        if info.pinned is not None:
            await self._repin(att, info.pinned, prog_id)
        revision = await self.ctx.runner.run(_tcx_revision, self.kernel, info.ifindex, info.direction)
        return Updated("netlink_replace", revision, prog_id, offloaded=f.in_hw)

    # -- query ---------------------------------------------------------------------------------------
    async def _filters(self, ifindex: int, direction: Direction) -> list[HookEntry]:
        return await hooklib.filter_entries(self._transport(), ifindex, direction, self._names)

    async def query(self, ifindex: int, direction: Direction) -> Hook:
        with translated(backend=self.name, dev=ifindex, direction=direction):  # the raw error names its op
            return await hooklib.query_hook(self.ctx.runner, ifindex, direction, names=self._names,
                                            backend=self.name, filters=self._filters)

    # -- pinning -------------------------------------------------------------------------------------
    def _record(self, att: FilterAttachment, name: str, prog_id: int) -> Callable[[], PinRecord]:
        """A builder (run in a worker inside the namespace: it reads the namespace's inode)."""
        info = att.info
        prio, handle = att.slot

        def build() -> PinRecord:
            return PinRecord(ifindex=info.ifindex, direction=info.direction, priority=prio, handle=handle,
                             prog_id=prog_id, netns=current_netns_inode(), name=name)

        return build

    def _write_pin(self, prog_fd: int, path: str, record: Callable[[], PinRecord]) -> None:
        """Pin the record map at `path + "_record"`, then the program at `path` (in a worker); nothing is
        left behind on failure. The record goes first: a crash in between leaves a record without a
        program, which adoption recognises as asynctc's and removes; never a pinned program that asynctc
        cannot prove is its own (nor remove)."""
        rec = record().encode()
        map_fd = self.kernel.bpf.map_create_array(RECORD_SIZE, 1, name="atc_nl_pin")
        try:
            self.kernel.bpf.map_update(map_fd, 0, rec)
            self.kernel.pins.pin_object(map_fd, path + RECORD_SUFFIX)
        finally:
            self.kernel.bpf.close(map_fd)
        try:
            self.kernel.pins.pin_object(prog_fd, path)
        except BaseException:
            self.kernel.pins.unpin(path + RECORD_SUFFIX)
            raise

    async def _remove_pin(self, path: str) -> None:
        def remove() -> None:
            self.kernel.pins.unpin(path)
            self.kernel.pins.unpin(path + RECORD_SUFFIX)

        try:
            await self.ctx.runner.run(remove)
        except OSError as exc:
            raise PinError(f"cannot unpin {path}: {exc.strerror}", errno=exc.errno) from None

    async def pin(self, att: FilterAttachment, path: str) -> None:
        async with self._device(att.info.ifindex, att.info.dev):  # the check and the rename, as in update
            await self._pin_held(att, path)

    async def _pin_held(self, att: FilterAttachment, path: str) -> None:
        info = att.info
        if "." in os.path.basename(path):
            raise PinError(f"cannot pin at {path}: bpffs refuses names with a dot; pick a name without one")
        prog_fd = att.prog_fd
        cur = await self._current(att)
        if prog_fd is None or cur is None:
            raise Severed(f"cannot pin the filter of {info.dev} {info.direction} prio {info.priority}: it is gone",
                          errno=_errno.ENOENT)
        tag = parse_tag(att.name)
        pinned_name = format_tag(tag.session_tag if tag else self.ctx.session_tag, _prog_name(tag, info),
                                 pinned=True)
        try:
            await self.ctx.runner.run(
                lambda: self._write_pin(prog_fd, path, self._record(att, pinned_name, info.prog_id)))
        except bpf.BpfError as exc:
            raise from_errno(exc.errno or 0, op=Op.OBJ_PIN, backend=self.name, dev=path) from None
        try:
            # Mark the filter pinned in the kernel, so that no reap_orphans ever removes it.
            await self._replace(att, prog_fd, pinned_name, f"program {info.prog_id}", cur.skip_sw)
        except BaseException:
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                await self._remove_pin(path)
            raise
        att.name = pinned_name

    async def _repin(self, att: FilterAttachment, path: str, prog_id: int) -> None:
        """After an update: the pin names the new program and the record its id and the filter's name.

        Each step is atomic, so a crash at any instant leaves a pin that `adopt_pinned` accepts: the new
        program is pinned beside the old one and renamed over it, then the record map's value is rewritten
        in place. Until both are done the pin may name the old program or the record its id; adoption
        recognises the filter by its slot and its pinned owner tag then, and repairs the pin."""
        prog_fd = att.prog_fd
        assert prog_fd is not None
        try:
            await self.ctx.runner.run(_move_pin, self.kernel, prog_fd, path, self._record(att, att.name, prog_id))
        except (bpf.BpfError, OSError) as exc:
            # The filter runs the new program and keeps its pinned tag, so the pin still adopts it.
            log.warning("asynctc netlink: re-pinning %s after an update failed (%s); adopt_pinned() repairs "
                        "it", path, exc)

    async def unpin(self, att: FilterAttachment) -> None:
        async with self._device(att.info.ifindex, att.info.dev):  # the check and the rename, as in update
            await self._unpin_held(att)

    async def _unpin_held(self, att: FilterAttachment) -> None:
        info = att.info
        path = info.pinned
        if path is None:
            return
        # The filter becomes this session's (reaped after this process dies, detached when it closes).
        name = format_tag(self.ctx.session_tag, _prog_name(parse_tag(att.name), info))
        cur = await self._current(att)
        if cur is not None and att.prog_fd is not None:
            await self._replace(att, att.prog_fd, name, f"program {info.prog_id}", cur.skip_sw)
            att.name = name
        await self._remove_pin(path)

    async def adopt_pinned(self, path: str, *, foreign: bool = False) -> FilterAttachment | None:
        def read() -> tuple[int, PinRecord, str] | None:
            try:
                fd = self.kernel.pins.get_object(path)
            except bpf.BpfError as exc:
                if exc.errno == _errno.ENOENT and _remove_stale_record(self.kernel, path, self.ctx.owner, foreign):
                    raise PinError(f"nothing is pinned at {path}: a pin of asynctc was interrupted there (its "
                                   "filter was never marked pinned); its stale record was removed",
                                   errno=_errno.ENOENT) from None
                raise from_errno(exc.errno or 0, op=Op.OBJ_GET, backend=self.name, dev=path) from None
            try:
                if self.kernel.bpf.fd_object_kind(fd) != "prog":
                    self.kernel.bpf.close(fd)
                    return None  # a tcx link (the bpf_link backend's) or a map: not ours
                rec = _read_record(self.kernel, path + RECORD_SUFFIX)
                if rec is None:
                    self.kernel.bpf.close(fd)
                    return None  # a pinned program without our record: not an attachment of ours
                rec_tag = parse_tag(rec.name)
                owner = rec_tag.owner if rec_tag else None
                if not foreign and owner != self.ctx.owner:
                    raise NotOwned(f"the filter pinned at {path} belongs to owner {owner!r} ({rec.name}), not to "
                                   f"this session's owner {self.ctx.owner!r}; open the session with "
                                   f"owner={owner!r}, or pass adopt_pinned(path, foreign=True) to take it over")
                if rec.netns != current_netns_inode():
                    raise TCError(f"the filter pinned at {path} is in another network namespace than "
                                  f"{'namespace ' + repr(self.ctx.netns) if self.ctx.netns else 'this one'}; "
                                  "open the session in the namespace of its device")
                try:
                    dev = resolve_device(rec.ifindex, self.ctx.netns, self.kernel)[1]
                except DeviceNotFound:
                    # The filter went with its device: the pin and its record only say so. Remove them.
                    self.kernel.pins.unpin(path)
                    self.kernel.pins.unpin(path + RECORD_SUFFIX)
                    raise Severed(f"the filter pinned at {path} was severed: its device (ifindex {rec.ifindex}) "
                                  "is gone; its stale pin was removed", errno=_errno.ENODEV) from None
                return fd, rec, dev
            except BaseException:
                try:
                    self.kernel.bpf.close(fd)
                except OSError:
                    pass
                raise

        got = await self.ctx.runner.run(read)
        if got is None:
            return None
        fd, rec, dev = got
        try:
            parent = hooklib.CLSACT_PARENTS[rec.direction]
            cur = await self._get(rec.ifindex, parent, rec.priority, rec.handle, dev)
            if cur is None or cur.kind != "bpf" or not _is_pinned_filter(cur, rec):
                # Owned (checked above) and held by no live session (the caller's claim): a pin naming a
                # filter that is gone (deleted, or a pinned detach interrupted) only says so. Remove it.
                await self._remove_pin(path)
                raise Severed(
                    f"the filter pinned at {path} ({dev} {rec.direction} prio {rec.priority} handle "
                    f"{rec.handle:#x}) is gone or is not the pinned filter any more; its stale pin was removed",
                    errno=_errno.ENOENT)
            prog_id = cur.bpf_id or rec.prog_id
            if prog_id != rec.prog_id:
                # An update was interrupted before its pin and record were rewritten: finish that now.
                new_fd = await self.ctx.runner.run(self.kernel.bpf.prog_get_fd_by_id, prog_id)
                self.kernel.bpf.close(fd)
                fd = new_fd
        except BaseException:
            self.kernel.bpf.close(fd)
            raise
        info = AttachmentInfo(
            backend=self.name, netns=self.ctx.netns, dev=dev, ifindex=rec.ifindex, direction=rec.direction,
            prog_id=prog_id, link_id=None, handle=rec.handle, priority=rec.priority,
            offloaded=cur.in_hw, pinned=path,
        )
        gen_flags = (cur.gen_flags or 0) & (codec.TCA_CLS_FLAGS_SKIP_HW | codec.TCA_CLS_FLAGS_SKIP_SW)
        att = FilterAttachment(info, name=cur.bpf_name or rec.name, prog_fd=fd, gen_flags=gen_flags)
        tag = parse_tag(att.name)
        try:
            if tag is not None and not tag.pinned:
                # A pin or an unpin (or a pinned detach) was interrupted between marking the filter and
                # its pin: the pin is there, so the filter stays pinned. Mark it again, or reap_orphans
                # would delete it (its process is dead) under its pin.
                await self._replace(att, fd, format_tag(tag.session_tag, tag.prog_name, pinned=True),
                                    f"program {prog_id}", cur.skip_sw)
        except BaseException:
            self.kernel.bpf.close(fd)
            raise
        if prog_id != rec.prog_id:
            await self._repin(att, path, prog_id)
        return self._hold(att)

    # -- orphans -------------------------------------------------------------------------------------
    async def reap_orphans(self) -> tuple[HookEntry, ...]:
        """Delete the cls_bpf filters tagged with this owner whose process is dead (and not pinned);
        return them. Empty clsact qdiscs are left (see the module docstring)."""
        nl = self._transport()
        links = await self._dump(Op.LINK_DUMP, lambda seq: codec.encode_dump_request(seq, codec.RTM_GETLINK))
        candidates: list[tuple[Direction, codec.FilterMsg, str, str]] = []
        for link in links:
            if not isinstance(link, codec.LinkMsg):
                continue
            for direction in Direction:
                try:
                    with translated(Op.FILTER_DUMP, backend=self.name, dev=link.name, direction=direction):
                        filters = await hooklib.dump_filters(nl, link.ifindex, direction, dev=link.name)
                except DeviceNotFound:
                    break  # deleted meanwhile
                for f in filters:
                    tag = parse_tag(f.bpf_name) if f.kind == "bpf" else None
                    if tag is None or tag.owner != self.ctx.owner or tag.pinned or not f.bpf_id:
                        continue
                    candidates.append((direction, f, link.name or str(link.ifindex), tag.session_tag))
        if not candidates:
            return ()
        alive = await self.ctx.runner.run(lambda: [self.kernel.session_alive(c[3]) for c in candidates])
        dead = [c for c, live in zip(candidates, alive, strict=True) if not live]
        # Names before the deletes: a deleted filter's program may be freed with it.
        names = await self.ctx.runner.run(lambda: [self._names.get(c[1].bpf_id or 0) for c in dead])
        removed: list[HookEntry] = []
        for (direction, f, dev, _session), (prog_name, prog_tag) in zip(dead, names, strict=True):
            def build(seq: int, f: codec.FilterMsg = f) -> bytes:
                return codec.encode_filter(seq, codec.RTM_DELTFILTER, DELETE_FLAGS, f.ifindex, f.parent,
                                           f.priority, f.handle)

            async with self._device(f.ifindex, f.ifindex):
                # The slot is read again under the lock: the orphan may have gone and someone else's filter
                # taken its slot since the dump (the liveness check took a thread hop). Only the filter the
                # dump showed, with its name and program, is deleted.
                try:
                    cur = await self._get(f.ifindex, f.parent, f.priority, f.handle, dev)
                except DeviceNotFound:
                    continue
                if cur is None or cur.kind != "bpf" or cur.bpf_name != f.bpf_name or cur.bpf_id != f.bpf_id:
                    continue
                try:
                    await self._request(Op.FILTER_DELETE, build, dev=dev, direction=direction)
                except (Severed, DeviceNotFound):
                    continue  # someone else removed it first
            removed.append(HookEntry(prog_id=f.bpf_id or 0, prog_name=prog_name, prog_tag=f.bpf_tag or prog_tag,
                                     kind="cls_bpf", link_id=None, handle=f.handle, priority=f.priority,
                                     owned=False))
            log.info("asynctc netlink: reaped orphaned filter %r on %s %s", f.bpf_name, dev, direction)
        return tuple(removed)

    # -- events --------------------------------------------------------------------------------------
    def open_event_source(self) -> AbstractAsyncContextManager[EventSource]:
        return self.ctx.open_netlink_events()


def _read_record(k: Kernel, path: str) -> PinRecord | None:
    """The netlink pin record at `path`, or None if none is there (or something else is)."""
    data = k.pins.read_pinned_value(path, RECORD_SIZE)
    return PinRecord.decode(data) if data is not None else None


def _remove_stale_record(k: Kernel, path: str, owner: str, foreign: bool) -> bool:
    """Remove a record of this owner (any, with `foreign`) left at `path + "_record"` without its program
    (a pin interrupted by a crash); True if there was one."""
    rec = _read_record(k, path + RECORD_SUFFIX)
    if rec is None:
        return False
    tag = parse_tag(rec.name)
    if not foreign and (tag is None or tag.owner != owner):
        return False
    return k.pins.unpin(path + RECORD_SUFFIX)


def _is_pinned_filter(cur: codec.FilterMsg, rec: PinRecord) -> bool:
    """Whether the filter in a pin record's slot is the pinned one: it runs the recorded program, or it
    carries the record's pinned owner tag (an update replaced its program and was interrupted before the
    record named the new one; updates keep the tag)."""
    if cur.bpf_id == rec.prog_id:
        return True
    now, then = parse_tag(cur.bpf_name), parse_tag(rec.name)
    return now is not None and then is not None and now.pinned and now.session_tag == then.session_tag


def _prog_name(tag: FilterTag | None, info: AttachmentInfo) -> str:
    """The program name part of a filter's tag (else a stand-in naming the program's id)."""
    return tag.prog_name if tag is not None else f"prog{info.prog_id}"
