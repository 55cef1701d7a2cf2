"""The Backend contract: what every asynctc backend implements, built-in or third-party.

A backend class is registered by name (hook `asynctc_register_backends`). A session creates one instance
per backend it uses, with a `BackendContext`, and calls its async methods; the backend does the kernel work
and knows nothing of sessions, registries or lifecycles:

- the core resolves positions to program/link ids (`Placement`), keeps the registry of attachments, marks
  which hook entries are owned, runs cleanup under shields and decides when something is severed;
- the backend turns each request into kernel calls, returns what the kernel says, and raises asynctc
  exceptions (built once, with `asynctc.from_errno`).

Blocking calls (bpf(2), close() of link fds, netlink sends and dumps) must go through `ctx.runner`, so
they run in worker threads in the session's namespace. `asynctc.testing.check_backend` runs the
conformance suite against any backend.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import trio

from ._errors import BackendUnavailable, PinError
from ._program import Program
from ._types import AttachmentInfo, Direction, Hook, HookEntry, Offload, Probe, UpdateResult
from ._types import Placement as Placement  # a value type; re-exported where backends always found it
from .events import KernelEvent, Resynced
from .lowlevel.netns import NetnsRunner

__all__ = [
    "Backend",
    "BackendAttachment",
    "BackendContext",
    "EventSource",
    "Placement",
    "AttachRequest",
]


@dataclass(frozen=True, slots=True)
class BackendContext:
    """What a session gives each backend it opens.

    Attributes:
        runner: runs sync calls in worker threads inside the session's namespace (use it for every
            blocking kernel call).
        netns: the session's namespace (None: the caller's).
        owner: the tag that marks what the session creates.
        session_tag: unique to this session in this process (owner, pid, process start time, serial); what
            a backend records in the kernel to prove ownership after a restart.
        kernel: the MockKernel for the mock backend; None otherwise.
        options: backend-specific options given to `open_session(backend_options=...)`.
        nursery: the session's nursery, for background tasks that must live as long as the session;
            cancelled after the backend's `aclose()`. None only while probing.
    """

    runner: NetnsRunner
    netns: str | None
    owner: str
    session_tag: str
    kernel: Any = None
    options: Mapping[str, object] = field(default_factory=dict)
    nursery: trio.Nursery | None = None


@dataclass(frozen=True, slots=True)
class AttachRequest:
    """One attach, as the core hands it to a backend. `options` are per-attach backend options
    (e.g. the netlink backend's `priority` and `handle`)."""

    dev: str
    ifindex: int
    direction: Direction
    program: Program
    placement: Placement
    expected_revision: int | None
    offload: Offload
    options: Mapping[str, object] = field(default_factory=dict)


class BackendAttachment(abc.ABC):
    """A backend's own record of one attachment (a link fd, a filter's handle...). The core treats it as
    opaque; it reads `info`, which the backend keeps up to date (program id after an update, pin path)."""

    info: AttachmentInfo


class EventSource(abc.ABC):
    """A stream of kernel events for one namespace. `receive()` returns the next batch (never empty).

    When events were lost, the source re-reads the kernel's state, returns the differences as ordinary
    events and then a `Resynced` (in the same batch or the next)."""

    @abc.abstractmethod
    async def receive(self) -> list[KernelEvent | Resynced]: ...


class Backend(abc.ABC):
    """Base class of every backend. Subclasses set `name` and implement the abstract methods.

    Class attributes:
        name: the name users select it by.
        can_offload: whether it can put programs in hardware (offload="prefer"/"require").
        has_revisions: whether its hooks have a tcx revision (expected_revision works).
        kernel_kind: "linux" for backends that drive the real kernel, "mock" for in-memory models; a
            session only combines backends of one kind.

    The core runs attach, update, detach, pin, unpin, adopt_pinned and reap_orphans shielded from
    cancellation, so a backend's multi-step operation is never interrupted half-way; it must still leave
    nothing behind when one of its own steps fails, and it must not wait without bound (each netlink
    request has an answer timeout; each bpf() call is bounded by the kernel).
    """

    name: ClassVar[str]
    can_offload: ClassVar[bool] = False
    has_revisions: ClassVar[bool] = False
    kernel_kind: ClassVar[str] = "linux"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    # -- availability ---------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    async def probe(cls, ctx: BackendContext) -> Probe:
        """Whether this backend can work in ctx's namespace, and why (or why not). Must not raise for
        expected reasons (missing privileges, old kernel): say them in the Probe."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire what the backend needs (sockets...). Called once before any other instance method."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what `open` acquired, after the session detached what it owned. Idempotent: it is
        called again at session close if the namespace went away earlier."""

    # -- devices --------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        """(ifindex, name) of a device given by name or ifindex; DeviceNotFound if it is not there."""

    # -- attachments ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def attach(self, request: AttachRequest) -> BackendAttachment:
        """Attach the program. On failure nothing may be left behind (no link, no filter, no qdisc)."""

    @abc.abstractmethod
    async def detach(self, att: BackendAttachment) -> bool:
        """Detach. Return True if it was detached now, False if the kernel had already severed it (then
        only release resources). Must release every resource of `att` in both cases."""

    @abc.abstractmethod
    async def update(
        self, att: BackendAttachment, program: Program, *, expected: Program | None
    ) -> UpdateResult:
        """Swap the program atomically (Conflict if `expected` is given and another program is there,
        changing nothing). Update `att.info` to the new program before returning."""

    async def release(self, att: BackendAttachment) -> None:  # noqa: B027 - optional hook
        """Let go of a pinned attachment without detaching it (close fds): its session is closing."""

    @abc.abstractmethod
    async def is_attached(self, att: BackendAttachment) -> bool:
        """Ask the kernel whether the attachment is still there (False once severed)."""

    @abc.abstractmethod
    async def query(self, ifindex: int, direction: Direction) -> Hook:
        """Every program on the hook in run order (tcx first, then cls_bpf by priority), all with
        owned=False: the core marks what the session owns."""

    # -- pinning --------------------------------------------------------------------------------------
    async def pin(self, att: BackendAttachment, path: str) -> None:
        """Make the attachment outlive the session and process, recorded at `path` on bpffs."""
        raise PinError(f"the {self.name} backend cannot pin attachments")

    async def unpin(self, att: BackendAttachment) -> None:
        """Remove the pin; the attachment is the session's again (detached when the session closes)."""
        raise PinError(f"the {self.name} backend cannot pin attachments")

    async def adopt_pinned(self, path: str) -> BackendAttachment | None:
        """Take over the attachment pinned at `path`; None if what is there is not this backend's."""
        return None

    # -- orphans --------------------------------------------------------------------------------------
    async def reap_orphans(self) -> tuple[HookEntry, ...]:
        """Remove what a dead process with this owner tag left behind; never a live owner's or a foreign
        object. Return what was removed (owned=False: it was nobody's any more)."""
        return ()

    # -- events ---------------------------------------------------------------------------------------
    def open_event_source(self) -> AbstractAsyncContextManager[EventSource]:
        """An event source for the session's namespace. Raise BackendUnavailable where there is none."""
        raise BackendUnavailable(f"the {self.name} backend has no event source")


async def aiter_events(source: EventSource) -> AsyncIterator[KernelEvent | Resynced]:
    """Iterate a source's events one by one."""
    while True:
        for ev in await source.receive():
            yield ev
