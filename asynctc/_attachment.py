"""Attachment: one program on one hook, owned by a session; its lifecycle state machine.

    ATTACHED --detach()--> DETACHED
    ATTACHED --kernel severs (device, qdisc or filter gone)--> SEVERED

Every kernel-changing step (update, detach, pin, unpin) runs under a bounded shield: once started it
completes, so the state recorded here always matches what the kernel did; a cancellation that arrived
meanwhile is delivered at the caller's next checkpoint. Operations on one attachment are serialised.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import trio

from ._errors import ProgramError, Severed, TCError
from ._program import Program
from ._types import AttachmentInfo, State, UpdateResult
from .backend import Backend, BackendAttachment
from .lowlevel.locks import held

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["Attachment"]


class Attachment:
    """A program attached to a device's tc hook by a session. Created by `Session.attach`,
    `Session.open_attachment` and `Session.adopt_pinned`, never directly."""

    def __init__(self, session: Session, backend: Backend, batt: BackendAttachment, *, serial: int) -> None:
        self._session = session
        self._backend = backend
        self._batt = batt
        self._serial = serial
        self._state = State.ATTACHED
        self._lock = trio.Lock()
        self._ended = trio.Event()  # set when the state leaves ATTACHED
        self._released = False  # the session let go of it (pinned, at session close)
        self._sever_reason: str | None = None

    # -- read-only views ------------------------------------------------------------------------------
    @property
    def info(self) -> AttachmentInfo:
        """Where and what this attachment is (frozen; a new value after update, pin or unpin)."""
        return self._batt.info

    @property
    def state(self) -> State:
        return self._state

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def sever_reason(self) -> str | None:
        """Why the kernel severed it (None unless SEVERED)."""
        return self._sever_reason

    @property
    def pinned(self) -> bool:
        return self._batt.info.pinned is not None

    def __repr__(self) -> str:
        i = self.info
        where = f"{i.dev}/{i.direction.value}"
        if i.link_id is not None:
            ident = f"link {i.link_id}"
        elif i.priority is not None and i.handle is not None:
            ident = f"prio {i.priority} handle {i.handle:#x}"
        else:
            ident = ""
        return f"<Attachment {i.backend} {where} prog {i.prog_id} {ident} {self._state.value}>"

    # -- helpers -------------------------------------------------------------------------------------
    def _check_live(self, action: str) -> None:
        if self._released:
            raise TCError(
                f"cannot {action} {self!r}: the session that owned it has closed"
                + (f"; adopt it again with session.adopt_pinned({self.info.pinned!r})" if self.pinned else "")
            )
        if self._state is State.SEVERED:
            raise Severed(
                f"cannot {action} {self!r}: the kernel severed it ({self._sever_reason}); attach again",
                errno=errno.ENOLINK,
            )
        if self._state is State.DETACHED:
            raise TCError(f"cannot {action} {self!r}: it was detached; attach again")

    # -- operations ----------------------------------------------------------------------------------
    async def update(self, program: Program, *, expected: Program | None = None) -> UpdateResult:
        """Swap the attached program atomically for `program`.

        Args:
            program: the new program (SCHED_CLS).
            expected: make it a compare-and-swap: if the program on the hook now is not `expected`, raise
                `Conflict` and change nothing.

        Returns:
            UpdateResult: `method` ("link_update", "netlink_replace" or "make_before_break") and the hook's
            revision afterwards. Offloaded attachments are updated in hardware too; if the hardware refuses,
            `OffloadError` is raised and the old program keeps running.

        Raises:
            Conflict, Severed, ProgramError, OffloadError, TCError.
        """
        self._check_live("update")
        if not isinstance(program, Program):
            raise ProgramError(f"update() takes an asynctc.Program, got {type(program).__name__}")
        program.check_usable()
        if expected is not None and not isinstance(expected, Program):
            raise ProgramError(f"expected= takes an asynctc.Program, got {type(expected).__name__}")
        async with held(self._lock):
            self._check_live("update")
            try:
                with self._session._shield("update", self):
                    result = await self._backend.update(self._batt, program, expected=expected)
            except Severed as exc:
                await self._session._on_severed(self, f"found severed during update: {exc.message}",
                                                locked=True)
                raise
        self._session._notify("update", self, method=result.method)
        return result

    async def detach(self) -> None:
        """Detach the program. Idempotent; a no-op on a severed attachment. Runs to completion once
        started, even if the calling task is cancelled (the cancellation is delivered afterwards)."""
        if self._state is not State.ATTACHED or self._released:
            return
        async with held(self._lock):
            if self._state is not State.ATTACHED or self._released:
                return
            with self._session._shield("detach", self):
                was_attached = await self._backend.detach(self._batt)
            if was_attached:
                self._state = State.DETACHED
                self._session._forget(self)
                self._ended.set()
                self._session._notify("detach", self)
            else:
                await self._session._on_severed(self, "already severed by the kernel when detached",
                                                locked=True, released=True)

    async def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the attachment at `path` (on a bpffs mount) so it survives the session and the process.

        A pinned attachment is not detached when its session closes; `Session.adopt_pinned(path)` in any
        later session takes it over again. Mounting bpffs is the caller's business
        (`mount -t bpf bpf /sys/fs/bpf`); PinError says so when the path is not on bpffs.
        """
        self._check_live("pin")
        async with held(self._lock):
            self._check_live("pin")
            with self._session._shield("pin", self):
                await self._backend.pin(self._batt, os.fspath(path))

    async def unpin(self) -> None:
        """Remove the pin: the attachment is the session's again and is detached when the session closes."""
        self._check_live("unpin")
        async with held(self._lock):
            self._check_live("unpin")
            if self.info.pinned is None:
                return
            with self._session._shield("unpin", self):
                await self._backend.unpin(self._batt)

    async def wait_severed(self) -> None:
        """Return once the kernel has severed this attachment (state SEVERED): its device was deleted,
        its namespace went away, or its qdisc or filter was removed by someone else.

        Raises TCError if the attachment is (or becomes) detached instead: it can then never be severed.
        """
        if self._state is State.ATTACHED:
            await self._session._hub.ensure_started()
            await self._ended.wait()
        if self._state is not State.SEVERED:
            raise TCError(f"{self!r} was detached, not severed; wait_severed() would never return")

    # -- used by the session -------------------------------------------------------------------------
    def _mark(self, state: State, reason: str | None = None) -> None:
        self._state = state
        self._sever_reason = reason
        self._ended.set()
