"""Attachment: the public handle on one program attached to one hook, owned by a session.

    ATTACHED --detach()--> DETACHED
    ATTACHED --kernel severs (device, qdisc or filter gone)--> SEVERED

The handle reads its record (`asynctc._registry.AttachmentRecord`) and asks the session's lifecycle
(`asynctc._lifecycle.Lifecycle`) to carry out each operation: every kernel-changing step runs to completion
once started, so the recorded state always matches what the kernel did; operations on one attachment are
serialised by the record's lock.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._errors import TCError
from ._program import Program
from ._registry import AttachmentRecord
from ._types import AttachmentInfo, State, UpdateResult
from .lowlevel.pins import check_path

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle

__all__ = ["Attachment"]


class Attachment:
    """A program attached to a device's tc hook by a session. Created by `Session.attach`,
    `Session.open_attachment` and `Session.adopt_pinned`, never directly."""

    __slots__ = ("__weakref__", "_lifecycle", "_record")

    def __init__(self, record: AttachmentRecord, lifecycle: Lifecycle) -> None:
        self._record = record
        self._lifecycle = lifecycle

    # -- read-only views ------------------------------------------------------------------------------
    @property
    def info(self) -> AttachmentInfo:
        """Where and what this attachment is (frozen; a new value after update, pin or unpin)."""
        return self._record.info

    @property
    def state(self) -> State:
        return self._record.state

    @property
    def backend_name(self) -> str:
        return self._record.backend.name

    @property
    def sever_reason(self) -> str | None:
        """Why the kernel severed it (None unless SEVERED)."""
        return self._record.sever_reason

    @property
    def pinned(self) -> bool:
        return self._record.info.pinned is not None

    def __repr__(self) -> str:
        i = self.info
        where = f"{i.dev}/{i.direction.value}"
        if i.link_id is not None:
            ident = f" link {i.link_id}"
        elif i.priority is not None and i.handle is not None:
            ident = f" prio {i.priority} handle {i.handle:#x}"
        else:
            ident = ""
        return f"<Attachment {i.backend} {where} prog {i.prog_id}{ident} {self.state.value}>"

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
        return await self._lifecycle.update(self._record, program, expected=expected)

    async def detach(self) -> None:
        """Detach the program. Idempotent; a no-op on a severed attachment. Runs to completion once
        started, even if the calling task is cancelled (the cancellation is delivered afterwards)."""
        await self._lifecycle.detach(self._record)

    async def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the attachment at `path` (on a bpffs mount) so it survives the session and the process.

        A pinned attachment is not detached when its session closes; `Session.adopt_pinned(path)` in any
        later session takes it over again. Mounting bpffs is the caller's business
        (`mount -t bpf bpf /sys/fs/bpf`); PinError says so when the path is not on bpffs.
        """
        await self._lifecycle.pin(self._record, check_path(path))

    async def unpin(self) -> None:
        """Remove the pin: the attachment is the session's again and is detached when the session closes.
        On a severed attachment it removes the stale pin (if the session has not already)."""
        await self._lifecycle.unpin(self._record)

    async def wait_severed(self) -> None:
        """Return once the kernel has severed this attachment (state SEVERED): its device was deleted,
        its namespace went away, or its qdisc or filter was removed by someone else.

        Raises TCError if the attachment is (or becomes) detached instead: it can then never be severed.
        """
        rec = self._record
        if rec.state is State.ATTACHED:
            await self._lifecycle.watching()
            await rec.ended.wait()
        if rec.state is not State.SEVERED:
            raise TCError(f"{self!r} was detached, not severed; wait_severed() would never return")
