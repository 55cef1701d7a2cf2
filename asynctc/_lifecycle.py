"""The lifecycle of a session's attachments: register, update, detach, pin, unpin, sever, and the cleanup
when the session closes.

Every kernel-changing step runs shielded: once started it completes, so the registry always matches what
the kernel did, and a cancellation that arrived meanwhile is delivered at the caller's next checkpoint.
There is no deadline inside a step on purpose (a deadline could only fire between the steps of an
operation, leaving it half done): each blocking kernel call is bounded by the kernel itself, and each
netlink request by its transport's answer timeout. Cleanup at close is bounded by `cleanup_timeout`.
"""

from __future__ import annotations

import errno as _errno
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal, Protocol

import trio

from ._attachment import Attachment
from ._errors import DeviceNotFound, NotOwned, PinError, ProgramError, Severed, TCError
from ._monitor import Fanout
from ._program import Program
from ._registry import AttachmentRecord, Registry
from ._types import State, UpdateResult
from .backend import Backend, BackendAttachment
from .events import AttachmentEvent, AttachmentSevered
from .lowlevel.devlock import Claim, PinClaim
from .lowlevel.locks import held

__all__ = ["Lifecycle", "WatchDemand"]

log = logging.getLogger("asynctc")

EventKind = Literal["attach", "update", "detach", "sever"]


class Observers(Protocol):
    """Who observes attachment events (the session's `asynctc_attachment_event` hook): `observed` is asked
    first, so that nobody listening costs no event."""

    @property
    def observed(self) -> bool: ...

    def notify(self, event: AttachmentEvent) -> None: ...


class WatchDemand:
    """How the lifecycle asks for the kernel's events to be watched, without knowing the watcher: the
    watcher task waits for `wanted`, starts its event source, then sets `ready`."""

    def __init__(self) -> None:
        self.wanted = trio.Event()
        self.ready = trio.Event()

    async def wait_ready(self) -> None:
        self.wanted.set()
        await self.ready.wait()


class Lifecycle:
    """Carries out every operation on a session's attachments and keeps the registry in step with the
    kernel. `Attachment` handles and the event watcher call it; it calls the backends."""

    def __init__(
        self,
        registry: Registry,
        fanout: Fanout,
        observers: Observers,
        *,
        cleanup_timeout: float,
        claim: Callable[[str], Claim] = PinClaim,
    ) -> None:
        self.registry = registry
        self.fanout = fanout
        self.demand = WatchDemand()
        self.cleanup_timeout = cleanup_timeout
        self.closed = False
        self._observers = observers
        self._new_claim = claim

    def claim(self, path: str) -> Claim:
        """Claim the pin `path` for this session (NotOwned when a live asynctc session, in this process or
        another, holds the attachment pinned there)."""
        claim = self._new_claim(path)
        holder = claim.try_acquire()
        if holder is not None:
            raise NotOwned(f"the attachment pinned at {path!r} is held by a live asynctc session ({holder}); it "
                           "can be adopted once that session closes (pinned attachments outlive it) or unpins it")
        return claim

    def _notify(self, kind: EventKind, rec: AttachmentRecord, *, method: str | None = None,
                reason: str | None = None) -> None:
        if not self._observers.observed:
            return
        self._observers.notify(AttachmentEvent(kind=kind, info=rec.info, attachment=rec.public, method=method,
                                               reason=reason))

    async def watching(self) -> None:
        """Make sure the kernel's events are watched (severing is noticed), and wait until they are."""
        await self.demand.wait_ready()

    # -- register ------------------------------------------------------------------------------------
    def register(self, backend: Backend[Any], handle: BackendAttachment,
                 claim: Claim | None = None) -> AttachmentRecord:
        """Record what a backend attached or adopted (with the claim on its pin, if adopted); the session
        owns it from now on. No checkpoint here, so a caller that just got `handle` from the kernel can
        never lose it to a cancellation."""
        rec = AttachmentRecord(backend, handle, lambda r: Attachment(r, self))
        rec.claim = claim
        self.registry.add(rec)
        self._notify("attach", rec)
        self.demand.wanted.set()  # the session now has something to lose: watch for severing
        return rec

    # -- operations ----------------------------------------------------------------------------------
    @staticmethod
    def _check_live(rec: AttachmentRecord, action: str, *, severed_ok: bool = False) -> None:
        att = rec.public
        if rec.released:
            raise TCError(
                f"cannot {action} {att!r}: the session that owned it has closed"
                + (f"; adopt it again with session.adopt_pinned({rec.info.pinned!r})" if rec.info.pinned else "")
            )
        if rec.state is State.SEVERED and not severed_ok:
            raise Severed(f"cannot {action} {att!r}: the kernel severed it ({rec.sever_reason}); attach again",
                          errno=_errno.ENOLINK)
        if rec.state is State.DETACHED:
            raise TCError(f"cannot {action} {att!r}: it was detached; attach again")

    async def update(self, rec: AttachmentRecord, program: Program, *, expected: Program | None) -> UpdateResult:
        self._check_live(rec, "update")
        if not isinstance(program, Program):
            raise ProgramError(f"update() takes an asynctc.Program, got {type(program).__name__}")
        program.check_usable()
        if expected is not None and not isinstance(expected, Program):
            raise ProgramError(f"expected= takes an asynctc.Program, got {type(expected).__name__}")
        async with held(rec.lock):
            self._check_live(rec, "update")
            try:
                with trio.CancelScope(shield=True):
                    updated = await rec.backend.update(rec.handle, program, expected=expected)
            except Severed as exc:
                await self._sever_locked(rec, f"found severed during update: {exc.message}")
                raise
            rec.change(prog_id=updated.prog_id, offloaded=updated.offloaded,
                       link_id=rec.info.link_id if updated.link_id is None else updated.link_id)
        self._notify("update", rec, method=updated.method)
        return updated.result

    async def detach(self, rec: AttachmentRecord) -> None:
        """`Attachment.detach()`: waits for the record's lock (cancellably), then detaches shielded."""
        if not rec.live:
            return
        async with held(rec.lock):
            if rec.live:
                with trio.CancelScope(shield=True):
                    await self._detach_held(rec)

    async def detach_within(self, rec: AttachmentRecord, seconds: float) -> bool:
        """Detach at the end of an `open_attachment` block: the wait for the record's lock is bounded by
        `seconds`, the detach itself (once the lock is held) is shielded with no deadline, as every
        kernel-changing step (see the module docstring). One cancel scope serves both, its deadline lifted
        when the lock is taken: this runs once per lifecycle, and trio's scopes are not cheap. False if
        the lock was not had in time (nothing was done)."""
        if not rec.live:
            return True
        with trio.CancelScope(shield=True, deadline=trio.current_time() + seconds) as scope:
            async with held(rec.lock):
                if scope.cancel_called:  # the deadline passed as the lock came: do not start
                    return False
                scope.deadline = math.inf
                if rec.live:
                    await self._detach_held(rec)
        return not scope.cancelled_caught

    async def _detach_held(self, rec: AttachmentRecord) -> None:
        """Detach a live record whose lock the caller holds, shielded by the caller."""
        was_attached = await rec.backend.detach(rec.handle)
        if rec.info.pinned is not None:
            rec.change(pinned=None)
        rec.drop_claim()
        if was_attached:
            rec.end(State.DETACHED)
            self.registry.remove(rec)
            self._notify("detach", rec)
        else:
            self._mark_severed(rec, "already severed by the kernel when detached")

    async def pin(self, rec: AttachmentRecord, path: str) -> None:
        self._check_live(rec, "pin")
        async with held(rec.lock):
            self._check_live(rec, "pin")
            if rec.info.pinned == path:
                return
            if rec.info.pinned is not None:
                raise PinError(f"{rec.public!r} is already pinned at {rec.info.pinned}; unpin() it first")
            try:
                claim = self.claim(path)
            except NotOwned as exc:
                raise PinError(f"cannot pin {rec.public!r} at {path!r}: the path is taken ({exc.message})",
                               errno=_errno.EEXIST) from None
            try:
                with trio.CancelScope(shield=True):
                    await rec.backend.pin(rec.handle, path)
            except BaseException:
                claim.release()
                raise
            rec.claim = claim
            rec.change(pinned=path)

    async def unpin(self, rec: AttachmentRecord) -> None:
        """Remove the pin; on a severed attachment, remove its stale pin (if its release has not)."""
        self._check_live(rec, "unpin", severed_ok=True)
        async with held(rec.lock):
            self._check_live(rec, "unpin", severed_ok=True)
            if rec.info.pinned is None:
                return
            with trio.CancelScope(shield=True):
                await rec.backend.unpin(rec.handle)
            rec.change(pinned=None)
            rec.drop_claim()

    # -- severing ------------------------------------------------------------------------------------
    def _mark_severed(self, rec: AttachmentRecord, reason: str) -> None:
        """Record that the kernel severed `rec` and tell everyone; its resources are released apart."""
        rec.end(State.SEVERED, reason)
        self.registry.remove(rec)
        self._notify("sever", rec, reason=reason)
        self.fanout.publish(AttachmentSevered(rec.public, reason))

    async def _release_severed(self, rec: AttachmentRecord) -> None:
        with trio.move_on_after(self.cleanup_timeout, shield=True):
            try:
                await rec.backend.detach(rec.handle)
                rec.change(pinned=None)  # detach removes a pin, which would name nothing now
                rec.drop_claim()
            except Exception as exc:  # resources of a severed attachment: report, go on
                log.warning("asynctc: releasing severed %r failed: %r", rec.public, exc)

    async def _sever_locked(self, rec: AttachmentRecord, reason: str) -> None:
        if rec.state is not State.ATTACHED:
            return
        await self._release_severed(rec)
        self._mark_severed(rec, reason)

    async def _reason(self, rec: AttachmentRecord, fallback: str) -> str:
        """Why `rec` was found severed: its device is gone, or the fallback (its hook or filter went)."""
        try:
            await rec.backend.resolve_device(rec.info.ifindex)
        except DeviceNotFound:
            return f"device {rec.info.dev} (ifindex {rec.info.ifindex}) was deleted"
        except Exception:  # the answer only refines the reason
            pass
        return fallback

    async def check_alive(self, records: Iterable[AttachmentRecord], reason: str | None) -> None:
        """Ask the kernel about each record, concurrently, and sever those it no longer holds. `reason`
        None: find out (device deleted, else its hook or filter was removed). Each check holds the
        record's lock, so it never races an update or a detach of the same attachment."""

        async def check(rec: AttachmentRecord) -> None:
            if not rec.live or self.closed:
                return
            async with held(rec.lock):
                if not rec.live or self.closed:
                    return
                try:
                    alive = await rec.backend.is_attached(rec.handle)
                except Exception as exc:
                    log.warning("asynctc: could not check %r: %r", rec.public, exc)
                    return
                if alive:
                    return
                why = reason if reason is not None else await self._reason(
                    rec, "its hook or filter was removed by someone else")
                # Released before it is marked: whoever waits for the severing then finds what the session
                # held on the hook (a clsact qdisc it created...) already gone.
                await self._release_severed(rec)
                self._mark_severed(rec, why)

        async with trio.open_nursery() as n:
            for rec in list(records):
                n.start_soon(check, rec)

    async def sever_all(self, reason: str) -> None:
        """Everything the session holds is doomed (its namespace was deleted): mark every attachment
        SEVERED at once, then let go of their resources concurrently (without detaching one by one: the
        kernel tears the namespace's hooks down itself once nothing holds it)."""
        records = [rec for rec in self.registry.records() if rec.live]
        for rec in records:
            self._mark_severed(rec, reason)

        async def release(rec: AttachmentRecord) -> None:
            async with held(rec.lock):
                try:
                    await rec.backend.release(rec.handle)
                except Exception as exc:
                    log.warning("asynctc: releasing %r after %s failed: %r", rec.public, reason, exc)
                rec.released = True
                rec.drop_claim()

        with trio.move_on_after(self.cleanup_timeout, shield=True):
            async with trio.open_nursery() as n:
                for rec in records:
                    n.start_soon(release, rec)

    # -- close ---------------------------------------------------------------------------------------
    async def close(self) -> list[BaseException]:
        """Detach what the session owns (not pinned) and let go of the pinned rest, concurrently, shielded
        and bounded by `cleanup_timeout`. Returns the failures (the caller reports them)."""
        self.closed = True
        errors: list[BaseException] = []
        records = self.registry.records()

        async def close_one(rec: AttachmentRecord) -> None:
            try:
                if rec.info.pinned is not None:
                    async with held(rec.lock):
                        if rec.live:
                            await rec.backend.release(rec.handle)
                            rec.released = True
                        rec.drop_claim()
                else:
                    await self.detach(rec)
            except Exception as exc:
                errors.append(exc)

        with trio.move_on_after(self.cleanup_timeout, shield=True) as scope:
            async with trio.open_nursery() as n:
                for rec in records:
                    n.start_soon(close_one, rec)
        if scope.cancelled_caught:
            errors.append(TCError(f"session cleanup did not finish within {self.cleanup_timeout}s; "
                                  f"{len(self.registry)} attachment(s) may remain: query the hooks"))
        for rec in records:
            rec.released = True
        self.registry.clear()
        return errors
