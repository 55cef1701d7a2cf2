"""Session: the public facade over the parts of a session, each owning one concern.

- `BackendSet` (_backends): which backends the session opened, of which kernel kind, chosen how;
- `Registry` (_registry): the live attachments, by device, and the ownership marks on query results;
- `resolve_placement` (_placement): positions to placements, a pure function;
- `Lifecycle` (_lifecycle): every operation on attachments, severing, cleanup at close;
- `Fanout` (_monitor) and `Watcher` (_watcher): monitors and the kernel events that drive severing.

`open_session` builds every part, and the session on top, before it yields the session.
"""

from __future__ import annotations

import errno as _errno
import functools
import itertools
import logging
import math
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any

import trio

from . import _plugins
from ._attachment import Attachment
from ._backends import BackendSet
from ._errors import CleanupError, OffloadError, PinError, ProgramError, TCError
from ._lifecycle import Lifecycle
from ._monitor import Fanout, Monitor
from ._placement import resolve_placement
from ._program import Program
from ._registry import AttachmentRecord, Registry
from ._types import OFFLOAD_MODES, Direction, Hook, HookEntry, Last, Offload, Position, Probe
from ._watcher import Watcher
from .backend import AttachRequest, Backend, BackendContext, is_atomic
from .lowlevel.devlock import Claim, PinClaim
from .lowlevel.kernel import LINUX, Kernel
from .lowlevel.netdev import check_dev
from .lowlevel.netns import NetnsRunner
from .lowlevel.pins import check_path
from .lowlevel.tcpolicy import format_session_tag, process_start_time

__all__ = ["Session", "open_session"]

log = logging.getLogger("asynctc")

# The kernel serialises tc changes under rtnl: 16 threads reach the same tcx throughput as 64 here, and
# fewer new threads keep the trio thread responsive (each thread start waits on it; docs/benchmarks.md).
DEFAULT_MAX_WORKERS = 16
DEFAULT_CLEANUP_TIMEOUT = 30.0

_session_serials = itertools.count(1)
_serial_lock = threading.Lock()


def _session_tag(owner: str) -> str:
    with _serial_lock:
        serial = next(_session_serials)
    pid = os.getpid()
    return format_session_tag(owner, pid, process_start_time(pid) or "0", serial)


def _pin_claims(kernel: object, session_tag: str) -> Callable[[str], Claim]:
    """How a session claims pins: through its kernel (the real one claims them among every process of the
    host; a MockKernel within itself); for a third-party in-memory kernel, host claims named within that
    kernel object."""
    if isinstance(kernel, Kernel):
        return lambda path: kernel.pin_claim(path, session_tag)
    prefix = f"{type(kernel).__name__}@{id(kernel):x}:"
    return lambda path: PinClaim(prefix + path)


def _check_options(be: Backend[Any], options: Mapping[str, object]) -> None:
    """Attach options are checked once, here, against what the backend declares (`attach_options`)."""
    accepted = be.attach_options
    for key, value in options.items():
        expected = accepted.get(key)
        if expected is None:
            takes = ", ".join(f"{k}= ({t.__name__})" for k, t in accepted.items()) or "none"
            raise TypeError(f"the {be.name} backend takes no attach option {key!r}; its options: {takes}")
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise TypeError(f"attach option {key}= of the {be.name} backend takes a {expected.__name__}, "
                            f"got {value!r}")


class Session:
    """A session: where attachments are made, queried and cleaned up. Open one with `open_session`."""

    def __init__(
        self,
        *,
        backends: BackendSet,
        registry: Registry,
        lifecycle: Lifecycle,
        fanout: Fanout,
        watcher: Watcher,
        runner: NetnsRunner,
        owner: str,
    ) -> None:
        self._backends = backends
        self._registry = registry
        self._lifecycle = lifecycle
        self._fanout = fanout
        self._watcher = watcher
        self._runner = runner
        self._owner = owner

    # -- public properties ---------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        """The name of the session's backend ("bpf_link", "netlink", "mock" or a third party's)."""
        return self._backends.primary.name

    @property
    def netns(self) -> str | None:
        return self._runner.netns

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def attachments(self) -> tuple[Attachment, ...]:
        """The live attachments this session owns (attached, not severed), oldest first."""
        return tuple(rec.public for rec in self._registry.records())

    @property
    def runner(self) -> NetnsRunner:
        """The session's worker-thread runner (in its namespace, bounded by its CapacityLimiter)."""
        return self._runner

    @property
    def cleanup_timeout(self) -> float:
        return self._lifecycle.cleanup_timeout

    @property
    def closed(self) -> bool:
        return self._lifecycle.closed

    @property
    def monitors(self) -> int:
        """How many monitors are open on this session."""
        return len(self._fanout)

    @property
    def kernel(self) -> Any:
        """The in-memory kernel of the session (`asynctc_mock.MockKernel`: the one given as `kernel=`, or
        the fresh one a mock session made); None for sessions on the real kernel."""
        kernel = self._backends.context.kernel
        return None if kernel is LINUX else kernel

    # -- backends ------------------------------------------------------------------------------------
    async def probe(self) -> dict[str, Probe]:
        """Probe every installed backend in this session's namespace: {name: Probe(available, reason)}."""
        return await self._backends.probe()

    # -- attach --------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._lifecycle.closed:
            raise TCError("this session is closed; open a new one with asynctc.open_session()")
        if self._watcher.netns_gone is not None:
            raise TCError(f"network namespace {self.netns!r} is gone ({self._watcher.netns_gone}); open a new "
                          "session in an existing namespace", errno=_errno.ENOENT)

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
        rec = await self._attach(dev, direction, program, position, expected_revision, offload, backend, options)
        return rec.public

    # KI-protected: a Ctrl-C between the kernel's answer and the registration would lose the link (it is
    # delivered at the next checkpoint instead, once the session owns the attachment).
    @trio.lowlevel.enable_ki_protection
    async def _attach(self, dev: str | int, direction: Direction | str, program: Program, position: Position | None,
                      expected_revision: int | None, offload: Offload, backend: str | None,
                      options: dict[str, object]) -> AttachmentRecord:
        self._check_open()
        check_dev(dev)
        direction = Direction.coerce(direction)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be None or a backend name (str), got {type(backend).__name__} {backend!r}")
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        if not isinstance(program, Program):
            raise ProgramError(f"program must be an asynctc.Program, got {type(program).__name__}")
        program.check_usable()
        if expected_revision is not None and (
            not isinstance(expected_revision, int) or isinstance(expected_revision, bool)
            or not 0 <= expected_revision < 2**64
        ):
            raise ValueError(f"expected_revision must be None or an int in 0..2**64-1 (the kernel's u64 revision), "
                             f"got {expected_revision!r}")
        position = Last() if position is None else position
        be = await self._backends.for_attach(backend, offload)
        _check_options(be, options)
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
        request = AttachRequest(
            dev=name,
            ifindex=ifindex,
            direction=direction,
            program=program,
            placement=resolve_placement(position, ifindex, direction),
            expected_revision=expected_revision,
            offload=offload if be.can_offload else "never",
            options=options,
        )
        registry = self._registry
        registry.begin_attach(ifindex)
        try:
            if is_atomic(be.attach):
                handle = await be.attach(request)  # completes once called: no shield needed (backend.atomic)
            else:
                with trio.CancelScope(shield=True):
                    handle = await be.attach(request)
            if self._lifecycle.closed:
                # The session closed while the kernel attached (its cleanup could not see this one yet):
                # nothing may outlive it unowned.
                with trio.CancelScope(shield=True):
                    await be.detach(handle)
                raise TCError("this session closed while the attach was under way; the program was detached "
                              "again. Open a new session with asynctc.open_session()")
        finally:
            registry.end_attach(ifindex)
        # No checkpoint from here to the return: the attachment is registered before any cancellation
        # can be delivered, so it is never lost.
        return self._lifecycle.register(be, handle)

    def open_attachment(
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
    ) -> AbstractAsyncContextManager[Attachment]:
        """`attach` as an async context manager: the attachment is detached when the block exits, normally,
        by an exception or by cancellation (shielded, bounded by the session's cleanup_timeout). A failing
        detach is raised as CleanupError (its `errors` hold the cause) if the block succeeded, and attached
        as a note (and logged) if the block failed: it never hides the block's own error. The attachment then
        stays in the session, which tries again when it closes. A pinned attachment is left in place."""
        return _AttachmentBlock(functools.partial(self._attach, dev, direction, program, position, expected_revision,
                                                  offload, backend, options), self._cleanup_detach)

    async def _cleanup_detach(self, rec: AttachmentRecord, original: BaseException | None) -> None:
        if rec.info.pinned is not None:
            return
        timeout = self.cleanup_timeout
        try:
            if not await self._lifecycle.detach_within(rec, timeout):
                raise TCError(f"detaching {rec.public!r} could not start within {timeout}s (another operation "
                              "on it held it); the session detaches it when it closes")
        except Exception as exc:
            if original is None:
                raise CleanupError(f"detaching {rec.public!r} at the end of its block failed: {exc}", [exc]) from exc
            log.error("asynctc: cleanup of %r failed while handling %r: %r", rec.public, original, exc)
            original.add_note(f"asynctc: cleanup of {rec.public!r} also failed: {exc!r}")

    # -- query, pins, orphans ------------------------------------------------------------------------
    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        """(ifindex, name) of a device in the session's namespace; DeviceNotFound otherwise."""
        self._check_open()
        check_dev(dev)
        return await self._backends.primary.resolve_device(dev)

    async def query(self, dev: str | int, direction: Direction | str) -> Hook:
        """Every entry on the hook in the order the kernel runs them: tcx entries first, then the legacy
        filters of whichever qdisc holds the hook (clsact, or a legacy `ingress` qdisc), by priority and
        within one priority the newest first. Every classifier is listed: a u32 (or other non-BPF) filter
        is an entry with its tc kind and no program (prog_id 0, prog_name and prog_tag ""). Entries this
        session owns (created or adopted) have owned=True; foreign ones owned=False."""
        self._check_open()
        check_dev(dev)
        direction = Direction.coerce(direction)
        primary = self._backends.primary
        ifindex, _ = await primary.resolve_device(dev)
        hook = await primary.query(ifindex, direction)
        return Hook(revision=hook.revision, entries=self._registry.mark_owned(hook.entries, ifindex, direction))

    def owns_filter(self, ifindex: int, direction: Direction | None, priority: int, handle: int) -> bool:
        """Whether a cls_bpf filter is one of this session's attachments."""
        return self._registry.owns_filter(ifindex, direction, priority, handle)

    async def adopt_pinned(self, path: str | os.PathLike[str], *, foreign: bool = False) -> Attachment:
        """Take ownership of the attachment pinned at `path` again (after a restart, or from another
        session). The attachment stays pinned; `unpin()` it to have it detached when the session closes.

        Ownership is proven, not assumed from the path: asynctc's own record at the pin must name this
        session's owner (NotOwned otherwise, saying whose it is when known), and no other live asynctc
        session, in this process or another, may hold it (NotOwned). `foreign=True` is the explicit opt-in
        of recovery tools: it adopts a pin whatever its record says (a live holder still refuses it)."""
        self._check_open()
        spath = check_path(path)
        if not isinstance(foreign, bool):
            raise TypeError(f"foreign must be a bool, got {foreign!r}")
        mine = self._registry.pinned_at(spath)
        if mine is not None:
            return mine.public
        claim = self._lifecycle.claim(spath)
        errors: list[str] = []
        try:
            for name in self._backends.kin_names():
                be = await self._backends.get_available(name, errors)
                if be is None:
                    continue
                with trio.CancelScope(shield=True):
                    handle = await be.adopt_pinned(spath, foreign=foreign)
                if handle is not None:
                    return self._lifecycle.register(be, handle, claim).public
        except BaseException:
            claim.release()
            raise
        claim.release()
        raise PinError(
            f"nothing asynctc can adopt is pinned at {spath!r} (no backend recognised it)"
            + (f"; {'; '.join(errors)}" if errors else "")
        )

    async def reap_orphans(self) -> tuple[HookEntry, ...]:
        """Remove what a dead process with this session's owner tag left behind (legacy filters outlive
        their process) and return what was removed. Never touches a live owner's or a foreign object."""
        self._check_open()
        removed: list[HookEntry] = []
        for name in self._backends.kin_names():
            be = await self._backends.get_available(name, [])
            if be is None:
                continue
            with trio.CancelScope(shield=True):
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
        if isinstance(buffer, bool) or not isinstance(buffer, int):
            raise TypeError(f"buffer must be an int (events), got {type(buffer).__name__} {buffer!r}")
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        await self._lifecycle.watching()
        sub = self._fanout.subscribe(buffer)
        try:
            yield Monitor(sub)
        finally:
            self._fanout.unsubscribe(sub)

    # -- close ---------------------------------------------------------------------------------------
    async def aclose(self) -> list[BaseException]:
        """Detach what the session owns (not pinned), let go of the rest, close the backends and the
        monitors. Shielded and bounded by `cleanup_timeout`; returns the failures (`open_session` reports
        them). Called by `open_session` when its block ends."""
        if self._lifecycle.closed:
            return []
        if self._watcher.netns_gone is not None:
            # The attachments of a deleted namespace are marked SEVERED first and released after: let
            # that finish before the runner goes.
            with trio.move_on_after(self.cleanup_timeout, shield=True):
                await self._watcher.let_go.wait()
        errors = await self._lifecycle.close()
        with trio.move_on_after(self.cleanup_timeout, shield=True):
            # An attach still in the kernel (started outside the session's block) sees the session closed
            # when it returns and detaches what it made: through a backend that must still be open.
            await self._registry.all_settled()
            errors.extend(await self._backends.aclose())
        self._fanout.close()
        self._runner.close()
        return errors

    def __repr__(self) -> str:
        try:
            name = self.backend_name
        except TCError:
            name = "?"
        return f"<Session backend={name} netns={self.netns!r} owner={self._owner!r}>"


class _AttachmentBlock:
    """What `Session.open_attachment` returns: attach on entry, detach on exit (see there). A class, not an
    asynccontextmanager generator: it runs once per lifecycle, on the hot path of every attach+detach."""

    __slots__ = ("_attach", "_cleanup", "_rec")

    def __init__(self, attach: Callable[[], Awaitable[AttachmentRecord]],
                 cleanup: Callable[[AttachmentRecord, BaseException | None], Awaitable[None]]) -> None:
        self._attach = attach
        self._cleanup = cleanup
        self._rec: AttachmentRecord | None = None

    async def __aenter__(self) -> Attachment:
        if self._rec is not None:
            raise RuntimeError("an open_attachment() context manager can be entered only once")
        self._rec = await self._attach()
        return self._rec.public

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._rec is not None
        await self._cleanup(self._rec, exc)


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
        kernel: the kernel to run on: None for the real one (for backend="mock": a fresh
            asynctc_mock.MockKernel), or an asynctc_mock.MockKernel, under "mock", "bpf_link" or "netlink"
            alike ("auto" with a kernel means "mock").
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
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name (str), got {type(backend).__name__} {backend!r}")
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int, got {type(max_workers).__name__} {max_workers!r}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if isinstance(cleanup_timeout, bool) or not isinstance(cleanup_timeout, int | float):
        raise TypeError(f"cleanup_timeout must be a number of seconds, got {type(cleanup_timeout).__name__} "
                        f"{cleanup_timeout!r}")
    if not (cleanup_timeout > 0) or math.isnan(cleanup_timeout):
        raise ValueError(f"cleanup_timeout must be > 0 seconds, got {cleanup_timeout!r}")
    if backend_options is not None and not isinstance(backend_options, Mapping):
        raise TypeError(f"backend_options must be a mapping of option names to values, got "
                        f"{type(backend_options).__name__} {backend_options!r}")
    pm, classes = await _plugins.load_plugins(plugins)
    if kernel is not None:
        if backend == "auto":
            backend = "mock"
        cls = classes.get(backend)
        if cls.kernel_type is None and cls.kernel_kind != "mock":
            raise ValueError(
                f"kernel= is for backends that can run on an in-memory kernel (mock, bpf_link, netlink); backend "
                f"{backend!r} drives the real kernel only: leave kernel= out"
            )
        if cls.kernel_type is not None and not isinstance(kernel, cls.kernel_type):
            raise TypeError(f"the {backend} backend cannot run on {kernel!r} (kernel=): it needs a "
                            f"{cls.kernel_type.__module__}.{cls.kernel_type.__name__}")
    kernel = BackendSet.default_kernel(classes, backend, kernel)
    runner = NetnsRunner(netns, trio.CapacityLimiter(max_workers))

    body_exc: BaseException | None = None
    errors: list[BaseException] = []
    session: Session | None = None
    try:
        async with trio.open_nursery() as nursery:
            ctx = BackendContext(runner=runner, netns=runner.netns, owner=owner, session_tag=_session_tag(owner),
                                 kernel=kernel, options=dict(backend_options or {}), nursery=nursery)
            try:
                backends = await BackendSet.open(pm, classes, ctx, backend)
            except BaseException as exc:
                body_exc = exc
            else:
                registry = Registry()
                fanout = Fanout()
                lifecycle = Lifecycle(registry, fanout, _plugins.AttachmentEventHook(pm),
                                      cleanup_timeout=cleanup_timeout,
                                      claim=_pin_claims(backends.context.kernel, ctx.session_tag))
                watcher = Watcher(backends, lifecycle, registry, fanout, runner)
                session = Session(backends=backends, registry=registry, lifecycle=lifecycle, fanout=fanout,
                                  watcher=watcher, runner=runner, owner=owner)
                nursery.start_soon(watcher.run)
                try:
                    yield session
                except BaseException as exc:
                    body_exc = exc
                finally:
                    errors = await session.aclose()
            nursery.cancel_scope.cancel()
    finally:
        runner.close()
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
