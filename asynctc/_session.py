"""Session: backend choice, the registry of live attachments, the session nursery, cleanup."""

from __future__ import annotations

import dataclasses
import errno as _errno
import itertools
import logging
import math
import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pluggy
import trio

from . import _plugins
from ._attachment import Attachment
from ._errors import (
    AnchorNotFound,
    BackendUnavailable,
    CleanupError,
    NotOwned,
    OffloadError,
    PinError,
    ProgramError,
    TCError,
)
from ._monitor import Monitor, _Hub
from ._program import Program
from ._types import (
    OFFLOAD_MODES,
    After,
    Before,
    Direction,
    First,
    Hook,
    HookEntry,
    Last,
    Offload,
    Position,
    Probe,
    State,
)
from .backend import AttachRequest, Backend, BackendAttachment, BackendContext, Placement
from .events import AttachmentEvent, AttachmentSevered
from .hookspecs import BackendRequest
from .lowlevel.locks import held
from .lowlevel.netns import NetnsRunner
from .lowlevel.tcpolicy import format_session_tag, process_start_time

__all__ = ["Session", "open_session"]

log = logging.getLogger("asynctc")

# The kernel serialises tc changes under rtnl: 16 threads reach the same tcx throughput as 64 here, and
# fewer new threads keep the trio thread responsive (each thread start waits on it; docs/benchmarks.md).
DEFAULT_MAX_WORKERS = 16
DEFAULT_CLEANUP_TIMEOUT = 30.0

_serials = itertools.count(1)
_session_serials = itertools.count(1)
_serial_lock = threading.Lock()
_open_sessions: weakref.WeakSet[Session] = weakref.WeakSet()  # for NotOwned: pins held by live sessions


class Session:
    """A session: where attachments are made, queried and cleaned up. Open one with `open_session`."""

    def __init__(
        self,
        *,
        pm: pluggy.PluginManager,
        registry: _plugins.BackendRegistry,
        runner: NetnsRunner,
        netns: str | None,
        owner: str,
        kernel: Any,
        backend_options: Mapping[str, object],
        cleanup_timeout: float,
        requested: str,
    ) -> None:
        self._pm = pm
        self._registry = registry
        self._runner = runner
        self._netns = netns
        self._owner = owner
        self._kernel = kernel
        self._requested = requested
        self.cleanup_timeout = cleanup_timeout
        with _serial_lock:
            serial = next(_session_serials)
        pid = os.getpid()
        self._ctx = BackendContext(
            runner=runner,
            netns=netns,
            owner=owner,
            session_tag=format_session_tag(owner, pid, process_start_time(pid) or "0", serial),
            kernel=kernel,
            options=dict(backend_options),
        )
        self._backends: dict[str, Backend] = {}
        self._backend_locks: dict[str, trio.Lock] = {}
        self._primary: Backend | None = None
        self._attach_choices: dict[str, str] = {}  # offload mode -> backend chosen for "auto" attaches
        self._attachments: dict[int, Attachment] = {}
        self._by_device: dict[int, dict[int, Attachment]] = {}  # ifindex -> serial -> attachment
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._netns_gone: str | None = None  # why, once the session's namespace was deleted
        self._hub = _Hub(self)
        _open_sessions.add(self)

    # -- public properties ---------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        """The name of the session's backend ("bpf_link", "netlink", "mock" or a third party's)."""
        assert self._primary is not None
        return self._primary.name

    @property
    def netns(self) -> str | None:
        return self._netns

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        """The live attachments this session owns (attached, not severed), oldest first."""
        return tuple(self._attachments.values())

    @property
    def runner(self) -> NetnsRunner:
        """The session's worker-thread runner (in its namespace, bounded by its CapacityLimiter)."""
        return self._runner

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def kernel(self) -> Any:
        """The in-memory kernel of a mock session (`asynctc_mock.MockKernel`: the one given as `kernel=`,
        or the fresh one the session made); None for sessions on the real kernel."""
        return self._kernel

    def _default_kernel(self, name: str) -> None:
        """A session on a backend of kernel_kind "mock" opened without kernel= gets a fresh kernel of the
        backend's own making (its `new_kernel()`), recorded here so `session.kernel` exposes it and backends
        that drive the real kernel are refused in this session."""
        if self._kernel is not None:
            return
        cls = self._registry.get(name)
        new_kernel = getattr(cls, "new_kernel", None)
        if cls.kernel_kind == "mock" and callable(new_kernel):
            self._kernel = new_kernel()
            self._ctx = dataclasses.replace(self._ctx, kernel=self._kernel)

    # -- backends ------------------------------------------------------------------------------------
    async def probe(self) -> dict[str, Probe]:
        """Probe every installed backend in this session's namespace: {name: Probe(available, reason)}."""
        names = self._registry.names()
        results: dict[str, Probe] = {}

        async def one(name: str) -> None:
            cls = self._registry.get(name)
            try:
                results[name] = await cls.probe(self._ctx)
            except Exception as exc:  # a probe must not raise; if one does, say so
                results[name] = Probe(False, f"probe raised {exc!r}")

        async with trio.open_nursery() as n:
            for name in names:
                n.start_soon(one, name)
        return {name: results[name] for name in names}

    async def _select(self, request: BackendRequest) -> str:
        available = await self.probe()
        if self._primary is not None:
            # One session, one kernel: only backends of the session's kind (real or in-memory) qualify.
            kind = self._primary.kernel_kind
            available = {k: v for k, v in available.items()
                         if self._registry.get(k).kernel_kind == kind}
        else:
            # "auto" never picks an in-memory kernel for a session: those are chosen by name.
            available = {k: v for k, v in available.items()
                         if self._registry.get(k).kernel_kind != "mock"}
        choice: str | None = self._pm.hook.asynctc_select_backend(request=request, available=available)
        if choice is None:
            reasons = "; ".join(f"{k}: {v.reason}" for k, v in available.items()) or "none installed"
            raise BackendUnavailable(
                f"no backend can work here ({reasons}). Run as root on Linux >= 6.6 for bpf_link, or use "
                "backend='mock' for the in-memory kernel"
            )
        return choice

    async def _open_backend(self, name: str) -> Backend:
        be = self._backends.get(name)
        if be is not None:
            return be
        lock = self._backend_locks.setdefault(name, trio.Lock())
        async with lock:
            be = self._backends.get(name)
            if be is not None:
                return be
            cls = self._registry.get(name)
            kind = cls.kernel_kind
            if self._kernel is not None and kind != "mock":
                raise TCError(f"this session runs on a MockKernel; backend {name!r} needs the real kernel")
            if self._primary is not None and kind != self._primary.kernel_kind:
                raise TCError(
                    f"backend {name!r} works on {'an in-memory' if kind == 'mock' else 'the real'} kernel, this "
                    f"session on {'an in-memory' if self._primary.kernel_kind == 'mock' else 'the real'} one; "
                    "open a separate session for it"
                )
            probe = await cls.probe(self._ctx)
            if not probe.available:
                raise BackendUnavailable(f"the {name} backend is not available here: {probe.reason}")
            be = cls(self._ctx)
            await be.open()
            self._backends[name] = be
            return be

    async def _backend_for(self, name: str | None, offload: Offload) -> Backend:
        assert self._primary is not None
        if name is None and not (offload != "never" and self._requested == "auto" and not self._primary.can_offload):
            return self._primary
        if name is not None and name != "auto":
            return await self._open_backend(name)
        # Selection probes every backend; its answer for an offload mode holds for the session's life.
        chosen = self._attach_choices.get(offload)
        if chosen is None:
            chosen = await self._select(
                BackendRequest(requested="auto", purpose="attach", offload=offload, netns=self._netns)
            )
            self._attach_choices[offload] = chosen
        return await self._open_backend(chosen)

    # -- attach --------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TCError("this session is closed; open a new one with asynctc.open_session()")
        if self._netns_gone is not None:
            raise TCError(f"network namespace {self.netns!r} is gone ({self._netns_gone}); open a new session "
                          "in an existing namespace", errno=_errno.ENOENT)

    def _placement(self, position: Position, ifindex: int, direction: Direction) -> Placement:
        if isinstance(position, First):
            return Placement("first")
        if isinstance(position, Last):
            return Placement("last")
        if isinstance(position, Before | After):
            where: Any = "before" if isinstance(position, Before) else "after"
            anchor = position.anchor
            if isinstance(anchor, Attachment):
                if anchor.state is not State.ATTACHED:
                    raise AnchorNotFound(f"the anchor {anchor!r} is not attached; anchor to a live attachment")
                ai = anchor.info
                if ai.ifindex != ifindex or ai.direction is not direction:
                    raise AnchorNotFound(
                        f"the anchor {anchor!r} is on {ai.dev}/{ai.direction.value}, not on this hook; "
                        "anchor to an attachment on the same device and direction"
                    )
                return Placement(where, prog_id=ai.prog_id, link_id=ai.link_id, priority=ai.priority,
                                 handle=ai.handle)
            if isinstance(anchor, Program):
                return Placement(where, prog_id=anchor.id)
            if isinstance(anchor, int) and not isinstance(anchor, bool) and anchor > 0:
                return Placement(where, prog_id=anchor)
            raise TypeError(
                f"a Before/After anchor is a Program, an Attachment or a positive program id, got {anchor!r}"
            )
        raise TypeError(
            f"position must be asynctc.First(), Last(), Before(x) or After(x), got {position!r}"
        )

    async def attach(
        self,
        dev: str | int,
        direction: Direction | str,
        program: Program,
        *,
        position: Position | None = None,
        expected_revision: int | None = None,
        offload: Offload = "never",
        backend: str | None = None,
        **options: object,
    ) -> Attachment:
        """Attach `program` to the `direction` hook of device `dev`; the session owns the result.

        Args:
            dev: a device name or ifindex in the session's namespace.
            direction: Direction.INGRESS / EGRESS, or "ingress" / "egress".
            program: an asynctc.Program of type SCHED_CLS (a simulated program on the mock).
            position: First(), Last() (default), Before(x) or After(x), x a Program, an Attachment or a
                program id on the same hook.
            expected_revision: attach only if the hook's revision is this (tcx); StaleRevision otherwise.
            offload: "never", "prefer" (hardware where the device takes it) or "require" (OffloadError
                otherwise, leaving nothing behind).
            backend: a backend name for this attach only (default: the session's; "auto" selects).
            **options: backend-specific options, e.g. `priority=` and `handle=` for netlink.

        Returns:
            The Attachment, detached when the session closes unless pinned (see also `open_attachment`).

        Raises:
            DeviceNotFound, ProgramError, AlreadyAttached, StaleRevision, HookFull, AnchorNotFound,
            PermissionDenied, OffloadError, BackendUnavailable, TCError.
        """
        self._check_open()
        direction = Direction.coerce(direction)
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        if not isinstance(program, Program):
            raise ProgramError(f"program must be an asynctc.Program, got {type(program).__name__}")
        program.check_usable()
        if expected_revision is not None and (
            not isinstance(expected_revision, int) or isinstance(expected_revision, bool) or expected_revision < 0
        ):
            raise ValueError(f"expected_revision must be a non-negative int or None, got {expected_revision!r}")
        position = Last() if position is None else position
        be = await self._backend_for(backend, offload)
        if expected_revision is not None and not be.has_revisions:
            raise TCError(
                f"expected_revision needs a hook with revisions (tcx); the {be.name} backend has none. "
                "Use backend='bpf_link' or leave expected_revision unset"
            )
        if offload == "require" and not be.can_offload:
            raise OffloadError(
                f"offload='require': the {be.name} backend has no hardware path (tcx runs in software only); "
                "use backend='netlink' (cls_bpf skip_sw) on a device that can offload"
            )
        ifindex, name = await be.resolve_device(dev)
        placement = self._placement(position, ifindex, direction)
        request = AttachRequest(
            dev=name,
            ifindex=ifindex,
            direction=direction,
            program=program,
            placement=placement,
            expected_revision=expected_revision,
            offload=offload if be.can_offload else "never",
            options=options,
        )
        with self._shield("attach", None, dev=name, direction=direction):
            batt = await be.attach(request)
        # No checkpoint from here to the return: the attachment is registered before any cancellation
        # can be delivered, so it is never lost.
        return self._register(be, batt)

    def _register(self, be: Backend, batt: BackendAttachment) -> Attachment:
        with _serial_lock:
            serial = next(_serials)
        att = Attachment(self, be, batt, serial=serial)
        self._attachments[serial] = att
        self._by_device.setdefault(att.info.ifindex, {})[serial] = att
        self._notify("attach", att)
        self._hub.attachment_added()
        return att

    @asynccontextmanager
    async def open_attachment(
        self,
        dev: str | int,
        direction: Direction | str,
        program: Program,
        *,
        position: Position | None = None,
        expected_revision: int | None = None,
        offload: Offload = "never",
        backend: str | None = None,
        **options: object,
    ) -> AsyncIterator[Attachment]:
        """`attach` as an async context manager: the attachment is detached when the block exits, normally,
        by an exception or by cancellation (shielded, bounded by the session's cleanup_timeout). A failing
        detach is raised as CleanupError (its `errors` hold the cause) if the block succeeded, and attached
        as a note (and logged) if the block failed: it never hides the block's own error. The attachment then
        stays in the session, which tries again when it closes. A pinned attachment is left in place."""
        att = await self.attach(
            dev, direction, program, position=position, expected_revision=expected_revision,
            offload=offload, backend=backend, **options,
        )
        try:
            yield att
        except BaseException as exc:
            await self._cleanup_detach(att, exc)
            raise
        else:
            await self._cleanup_detach(att, None)

    async def _cleanup_detach(self, att: Attachment, original: BaseException | None) -> None:
        if att.pinned:
            return
        try:
            with trio.move_on_after(self.cleanup_timeout, shield=True) as scope:
                await att.detach()
            if scope.cancelled_caught:
                raise TCError(f"detaching {att!r} did not finish within {self.cleanup_timeout}s")
        except Exception as exc:
            if original is None:
                raise CleanupError(f"detaching {att!r} at the end of its block failed: {exc}", [exc]) from exc
            log.error("asynctc: cleanup of %r failed while handling %r: %r", att, original, exc)
            original.add_note(f"asynctc: cleanup of {att!r} also failed: {exc!r}")

    # -- query, pins, orphans ------------------------------------------------------------------------
    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        """(ifindex, name) of a device in the session's namespace; DeviceNotFound otherwise."""
        self._check_open()
        assert self._primary is not None
        return await self._primary.resolve_device(dev)

    async def query(self, dev: str | int, direction: Direction | str) -> Hook:
        """Every program on the hook in run order: tcx entries first, then cls_bpf filters by priority.
        Entries this session owns (created or adopted) have owned=True; foreign ones owned=False."""
        self._check_open()
        direction = Direction.coerce(direction)
        assert self._primary is not None
        ifindex, _ = await self._primary.resolve_device(dev)
        hook = await self._primary.query(ifindex, direction)
        keys = self._owned_keys(ifindex, direction)
        return Hook(revision=hook.revision, entries=tuple(self._mark_owned(e, keys) for e in hook.entries))

    def _on_device(self, ifindex: int) -> list[Attachment]:
        """This session's attachments on one device (an index: the hub asks for every kernel event)."""
        on_device = self._by_device.get(ifindex)
        return list(on_device.values()) if on_device else []

    def _owned_keys(self, ifindex: int, direction: Direction) -> set[tuple[object, ...]]:
        keys: set[tuple[object, ...]] = set()
        for att in self._on_device(ifindex):
            i = att.info
            if i.direction is not direction:
                continue
            if i.link_id is not None:
                keys.add(("tcx", i.link_id))
            if i.priority is not None and i.handle is not None:
                keys.add(("cls_bpf", i.priority, i.handle))
        return keys

    @staticmethod
    def _mark_owned(e: HookEntry, keys: set[tuple[object, ...]]) -> HookEntry:
        key: tuple[object, ...] = ("tcx", e.link_id) if e.kind == "tcx" else ("cls_bpf", e.priority, e.handle)
        owned = key in keys
        if owned == e.owned:
            return e
        return HookEntry(e.prog_id, e.prog_name, e.prog_tag, e.kind, e.link_id, e.handle, e.priority, owned)

    def owns_filter(self, ifindex: int, direction: Direction | None, priority: int, handle: int) -> bool:
        """Whether a cls_bpf filter is one of this session's attachments."""
        if direction is None:
            return False
        return ("cls_bpf", priority, handle) in self._owned_keys(ifindex, direction)

    def _kin_names(self) -> list[str]:
        """The session's backend first, then every other installed backend of its kind (real kernel or
        in-memory): those that may hold what the session asks about."""
        assert self._primary is not None
        kind = self._primary.kernel_kind
        others = [n for n in self._registry.names()
                  if n != self._primary.name and self._registry.get(n).kernel_kind == kind]
        return [self._primary.name, *others]

    async def _open_kin(self, name: str, unavailable: list[str]) -> Backend | None:
        """The backend `name`, opened; None (its reason appended to `unavailable`) if it cannot work here."""
        try:
            return await self._open_backend(name)
        except BackendUnavailable as exc:
            unavailable.append(str(exc))
            return None

    async def adopt_pinned(self, path: str | os.PathLike[str]) -> Attachment:
        """Take ownership of the attachment pinned at `path` again (after a restart, or from another
        session). The attachment stays pinned; `unpin()` it to have it detached when the session closes."""
        self._check_open()
        spath = os.fspath(path)
        for att in self._attachments.values():
            if att.info.pinned == spath:
                return att
        for other in list(_open_sessions):
            if other is not self and not other._closed and any(
                a.info.pinned == spath for a in other._attachments.values()
            ):
                raise NotOwned(
                    f"the attachment pinned at {spath!r} is held by another open session ({other!r}); it can be "
                    "adopted once that session closes (pinned attachments outlive it) or unpins it"
                )
        errors: list[str] = []
        for name in self._kin_names():
            be = await self._open_kin(name, errors)
            if be is None:
                continue
            with self._shield("adopt", None, dev=spath):
                batt = await be.adopt_pinned(spath)
            if batt is not None:
                return self._register(be, batt)
        raise PinError(
            f"nothing asynctc can adopt is pinned at {spath!r} (no backend recognised it)"
            + (f"; {'; '.join(errors)}" if errors else "")
        )

    async def reap_orphans(self) -> tuple[HookEntry, ...]:
        """Remove what a dead process with this session's owner tag left behind (legacy filters outlive
        their process) and return what was removed. Never touches a live owner's or a foreign object."""
        self._check_open()
        removed: list[HookEntry] = []
        for name in self._kin_names():
            be = await self._open_kin(name, [])
            if be is None:
                continue
            with self._shield("reap_orphans", None):
                removed.extend(await be.reap_orphans())
        return tuple(removed)

    # -- monitors ------------------------------------------------------------------------------------
    @asynccontextmanager
    async def open_monitor(self, *, buffer: int = 1024) -> AsyncIterator[Monitor]:
        """An async iterator of `asynctc.events` for this session's namespace, until the block exits.

        Each monitor has its own bounded buffer of `buffer` events: a consumer that falls behind loses
        events for itself only (it then receives `EventsDropped(count)`), never stalling the session or
        other monitors. When the kernel itself lost events, the monitor re-reads the kernel's state, emits
        the differences and then `Resynced`.
        """
        self._check_open()
        await self._hub.ensure_started()
        mon = self._hub.subscribe(buffer)
        try:
            yield mon
        finally:
            self._hub.unsubscribe(mon)

    # -- internal: used by Attachment and the hub ----------------------------------------------------
    @contextmanager
    def _shield(self, op: str, att: Attachment | None, **where: object) -> Iterator[None]:
        """Run a kernel-changing step to completion whatever happens to the calling task: cancellation is
        delivered at the caller's next checkpoint, after the step, so the session's records always match
        what the kernel did. There is no deadline here on purpose: a deadline could only fire between the
        steps of an operation, leaving it half done. Each blocking kernel call is bounded by the kernel
        itself, and each netlink request by its transport's answer timeout."""
        with trio.CancelScope(shield=True):
            yield

    def _forget(self, att: Attachment) -> None:
        self._attachments.pop(att._serial, None)
        on_device = self._by_device.get(att.info.ifindex)
        if on_device is not None:
            on_device.pop(att._serial, None)
            if not on_device:
                del self._by_device[att.info.ifindex]

    def _notify(self, kind: str, att: Attachment, *, method: str | None = None,
                reason: str | None = None) -> None:
        ev = AttachmentEvent(kind=kind, info=att.info, attachment=att, method=method,  # type: ignore[arg-type]
                             reason=reason)
        _plugins.notify(self._pm, ev)

    async def _on_severed(self, att: Attachment, reason: str, *, locked: bool = False,
                          released: bool = False) -> None:
        """Record that the kernel severed `att`: release its resources, mark it, tell everyone."""

        async def release() -> None:
            if not released:
                with trio.move_on_after(self.cleanup_timeout, shield=True):
                    try:
                        await att._backend.detach(att._batt)
                    except Exception as exc:  # resources of a severed attachment: report, go on
                        log.warning("asynctc: releasing severed %r failed: %r", att, exc)

        if att.state is not State.ATTACHED:
            return
        if locked:
            await release()
        else:
            async with held(att._lock):
                if att.state is not State.ATTACHED:
                    return
                await release()
        att._mark(State.SEVERED, reason)
        self._forget(att)
        self._notify("sever", att, reason=reason)
        self._hub.publish(AttachmentSevered(att, reason))

    async def _check_alive(self, atts: Iterable[Attachment], reason: str) -> None:
        """Ask the kernel about each attachment and record the severed ones. Each check holds the
        attachment's lock, so it never races an update or a detach of the same attachment (an answer read
        before a concurrent update finished could otherwise release a live attachment)."""
        for att in list(atts):
            if self._closed:
                return
            if att.state is not State.ATTACHED or att._released:
                continue
            async with held(att._lock):
                if att.state is not State.ATTACHED or att._released or self._closed:
                    continue
                try:
                    alive = await att._backend.is_attached(att._batt)
                except Exception as exc:
                    log.warning("asynctc: could not check %r: %r", att, exc)
                    continue
                if not alive:
                    await self._on_severed(att, reason, locked=True)

    async def _on_netns_gone(self, reason: str) -> None:
        """The session's namespace was deleted: sever and release everything held in it, close the
        backends' sockets and the namespace fd so the kernel can destroy it. From now on every call
        says that the namespace is gone."""
        self._netns_gone = reason
        for att in list(self._attachments.values()):
            await self._on_severed(att, reason)
        for be in list(self._backends.values()):
            try:
                await be.aclose()
            except Exception as exc:
                log.warning("asynctc: closing the %s backend after %s failed: %r", be.name, reason, exc)
        self._runner.close(reason)

    # -- close ---------------------------------------------------------------------------------------
    async def _close(self) -> list[BaseException]:
        """Detach what the session owns (not pinned), release the rest, close backends. Shielded and
        bounded; returns the failures (the caller reports them)."""
        self._closed = True
        _open_sessions.discard(self)
        errors: list[BaseException] = []
        atts = list(self._attachments.values())

        async def detach_one(att: Attachment) -> None:
            try:
                if att.pinned:
                    async with held(att._lock):
                        await att._backend.release(att._batt)
                        att._released = True
                else:
                    await att.detach()
            except Exception as exc:
                errors.append(exc)

        with trio.move_on_after(self.cleanup_timeout, shield=True) as scope:
            async with trio.open_nursery() as n:
                for att in atts:
                    n.start_soon(detach_one, att)
            for be in list(self._backends.values()):
                try:
                    await be.aclose()
                except Exception as exc:
                    errors.append(exc)
        if scope.cancelled_caught:
            errors.append(TCError(f"session cleanup did not finish within {self.cleanup_timeout}s; "
                                  f"{len(self._attachments)} attachment(s) may remain: query the hooks"))
        for att in atts:
            att._released = True
        self._attachments.clear()
        self._by_device.clear()
        self._runner.close()
        return errors

    def __repr__(self) -> str:
        name = self._primary.name if self._primary else "?"
        return f"<Session backend={name} netns={self._netns!r} owner={self._owner!r}>"


@asynccontextmanager
async def open_session(
    backend: str = "auto",
    netns: str | os.PathLike[str] | None = None,
    owner: str = "asynctc",
    kernel: Any = None,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    cleanup_timeout: float = DEFAULT_CLEANUP_TIMEOUT,
    plugins: Iterable[object] | None = None,
    backend_options: Mapping[str, object] | None = None,
) -> AsyncIterator[Session]:
    """Open a session: choose the backend, and clean up whatever the session owns when the block ends.

    Args:
        backend: "auto" (bpf_link where tcx works, netlink otherwise), "bpf_link", "netlink", "mock", or
            a third-party backend's name.
        netns: None (the caller's namespace), a name under /run/netns, or a path to a namespace file.
        owner: the tag marking what this session creates (how orphans are recognised later).
        kernel: for backend="mock" only: an asynctc_mock.MockKernel (a fresh one when omitted).
        max_workers: how many worker threads the session's blocking kernel calls may use at once.
        cleanup_timeout: bound on cleanup when the session closes.
        plugins: extra plugin objects for this session only (a fresh plugin manager is built for it).
        backend_options: backend-specific options (see each backend's docs).

    On exit, every attachment the session owns is detached (concurrently, shielded, bounded by
    cleanup_timeout), however the block ends; pinned attachments stay. A cleanup failure is raised as
    CleanupError if the block succeeded, and added as a note to the block's exception otherwise.
    """
    if not isinstance(owner, str) or not owner or any(c in owner for c in ":/\0 ") or len(owner) > 64:
        raise ValueError(f"owner must be a short tag without ':', '/', spaces or NUL, got {owner!r}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if not (cleanup_timeout > 0) or math.isnan(cleanup_timeout):
        raise ValueError(f"cleanup_timeout must be > 0 seconds, got {cleanup_timeout!r}")
    pm, registry = await _plugins.load_plugins(plugins)
    if kernel is not None:
        if backend == "auto":
            backend = "mock"
        if registry.get(backend).kernel_kind != "mock":
            raise ValueError(
                f"kernel= is for in-memory kernel backends such as 'mock'; backend {backend!r} drives the real "
                "kernel: leave kernel= out"
            )
    runner = NetnsRunner(netns, trio.CapacityLimiter(max_workers))
    session = Session(
        pm=pm,
        registry=registry,
        runner=runner,
        netns=None if netns is None else os.fspath(netns),
        owner=owner,
        kernel=kernel,
        backend_options=backend_options or {},
        cleanup_timeout=cleanup_timeout,
        requested=backend,
    )
    body_exc: BaseException | None = None
    errors: list[BaseException] = []
    async with trio.open_nursery() as nursery:
        session._nursery = nursery
        session._ctx = dataclasses.replace(session._ctx, nursery=nursery)
        try:
            try:
                if backend == "auto":
                    name = await session._select(
                        BackendRequest(requested="auto", purpose="session", offload="never", netns=session.netns)
                    )
                else:
                    name = backend
                session._default_kernel(name)
                session._primary = await session._open_backend(name)
            except BaseException as exc:
                body_exc = exc
            else:
                try:
                    yield session
                except BaseException as exc:
                    body_exc = exc
        finally:
            errors = await session._close()
            await session._hub.aclose()
            nursery.cancel_scope.cancel()
    # The body's exception is re-raised here, outside the session nursery, so it is never wrapped in an
    # ExceptionGroup by it.
    if body_exc is not None:
        for err in errors:
            log.error("asynctc: session cleanup failed while handling %r: %r", body_exc, err)
            body_exc.add_note(f"asynctc: session cleanup also failed: {err!r}")
        raise body_exc
    if errors:
        raise CleanupError(
            f"session cleanup failed ({len(errors)} error(s)): " + "; ".join(repr(e) for e in errors), errors
        )

