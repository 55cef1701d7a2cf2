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
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import trio

from ._errors import BackendUnavailable, PinError
from ._program import Program
from ._types import AttachmentInfo, Direction, Hook, HookEntry, Offload, Probe, UpdateMethod, UpdateResult
from ._types import Placement as Placement  # a value type; re-exported where backends always found it
from .events import EventSource
from .lowlevel.kernel import LINUX
from .lowlevel.netns import NetnsRunner

__all__ = [
    "atomic",
    "is_atomic",
    "Backend",
    "BackendAttachment",
    "BackendContext",
    "EventSource",
    "Placement",
    "AttachRequest",
    "Updated",
]


F = TypeVar("F", bound=Callable[..., Any])

_atomic: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def atomic(method: F) -> F:
    """Mark a backend method as atomic under cancellation, so the core calls it without a shielded cancel
    scope of its own (one less per call on the hot path: trio's scopes cost ~9 us to enter and leave).

    Only for a method whose one and only checkpoint is a single kernel call that, once the method is
    called, runs to completion and returns its result even if the caller is cancelled meanwhile, such
    as `SyscallThreads.run(..., must_run=True)`: a cancellation is then delivered at the caller's next
    checkpoint, after the core has recorded what the call did, exactly as under a shield. The mark is
    this very function object: a subclass that overrides the method, or a decorator that wraps it (even
    with functools.wraps, which copies attributes), is shielded again unless it marks its own function.
    Used for `attach`."""
    _atomic.add(method)
    return method


def is_atomic(method: Callable[..., Any]) -> bool:
    """Whether `method` (a function or a bound method) was marked with `atomic`."""
    return getattr(method, "__func__", method) in _atomic


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
        kernel: the session's kernel, the only way a backend reaches one: `asynctc.lowlevel.kernel.LINUX`
            (the real kernel), an `asynctc_mock.MockKernel` (a simulated one, under the same real
            backends), or a third-party in-memory kernel of the backend's `kernel_type`.
        options: backend-specific options given to `open_session(backend_options=...)`.
        nursery: the session's nursery, for background tasks that must live as long as the session;
            cancelled after the backend's `aclose()`. None only while probing.
    """

    runner: NetnsRunner
    netns: str | None
    owner: str
    session_tag: str
    kernel: Any = LINUX
    options: Mapping[str, object] = field(default_factory=dict)
    nursery: trio.Nursery | None = None

    def open_netlink_events(self) -> AbstractAsyncContextManager[EventSource]:
        """The rtnetlink event source of the session's namespace (links, qdiscs, filters), for backends on
        the real kernel. `backend_options={"event_rcvbuf": BYTES}` sets its socket's receive buffer (small
        values force resyncs, for tests)."""
        # Imported here: the rtnetlink codec loads pyroute2, which `import asynctc` must not (the backends
        # that use it are loaded in a worker thread).
        from .lowlevel.events import DEFAULT_EVENT_RCVBUF, check_rcvbuf, open_netlink_event_source

        rcvbuf = check_rcvbuf(self.options.get("event_rcvbuf", DEFAULT_EVENT_RCVBUF))
        return open_netlink_event_source(self.runner, rcvbuf=rcvbuf, kernel=self.kernel)


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


class BackendAttachment:
    """A backend's own record of one attachment (a link fd, a filter's name...), subclassed by each backend.

    `info` says where the attachment is. The backend fills it in when it attaches or adopts; after that
    only the core changes it, from what the backend's methods return (`Updated`) and from the pin calls
    that succeeded. The backend reads it."""

    info: AttachmentInfo

    def __init__(self, info: AttachmentInfo) -> None:
        self.info = info


H = TypeVar("H", bound=BackendAttachment)


@dataclass(frozen=True, slots=True)
class Updated:
    """What `Backend.update` did: how (`method`), the hook's revision afterwards (None if it has none), and
    the attachment's program now. `link_id` is the attachment's new tcx link where the update replaced the
    link (make-before-break), None where the attachment kept its link or has none; `offloaded` is whether
    the new program runs in hardware."""

    method: UpdateMethod
    revision: int | None
    prog_id: int
    link_id: int | None = None
    offloaded: bool = False

    @property
    def result(self) -> UpdateResult:
        return UpdateResult(self.method, self.revision)


class Backend(abc.ABC, Generic[H]):
    """Base class of every backend, generic over the backend's own attachment record `H` (a subclass of
    `BackendAttachment`). Subclasses set `name` and implement the abstract methods: kernel verbs only.
    Policy (positions, ownership marks, lifecycles, cleanup, severing) is the core's.

    Class attributes:
        name: the name users select it by.
        attach_options: the backend-specific keyword options `Session.attach` accepts for it, name -> type
            (e.g. the netlink backend's `priority` and `handle`, both int). The core refuses any other
            option, or a value of another type, with TypeError before the backend is called; the backend
            checks the values' ranges.
        can_offload: whether it can put programs in hardware (offload="prefer"/"require").
        has_revisions: whether its hooks have a tcx revision (expected_revision works).
        kernel_kind: "linux" for backends a session on the real kernel may use ("auto" picks among them),
            "mock" for backends that run on an in-memory kernel of their own making (`new_kernel()`) unless
            given one.
        kernel_type: the class of kernel the backend runs on: `asynctc.lowlevel.kernel.Kernel` for
            backends that reach the kernel only through `ctx.kernel` (they run on the real kernel and on
            a MockKernel alike), an in-memory model's own class, or None for the real kernel only. A
            session uses a backend only if its kernel is of that class (`open_session(kernel=...)` raises
            TypeError otherwise, before anything opens).

    The core runs attach, update, detach, pin, unpin, adopt_pinned and reap_orphans shielded from
    cancellation (an `attach` marked `atomic` needs no shield: it cannot be interrupted), so a backend's
    multi-step operation is never interrupted half-way; it must still leave
    nothing behind when one of its own steps fails, and it must not wait without bound (each netlink
    request has an answer timeout; each bpf() call is bounded by the kernel). Calls on one attachment are
    serialised by the core.
    """

    name: ClassVar[str]
    attach_options: ClassVar[Mapping[str, type]] = {}
    can_offload: ClassVar[bool] = False
    has_revisions: ClassVar[bool] = False
    kernel_kind: ClassVar[str] = "linux"
    kernel_type: ClassVar[type | None] = None

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    # -- availability ---------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    async def probe(cls, ctx: BackendContext) -> Probe:
        """Whether this backend can work in ctx's namespace, and why (or why not). Must not raise for
        expected reasons (missing privileges, old kernel): say them in the Probe."""

    async def open(self) -> None:
        """Acquire what the backend needs (sockets...). Called once before any other instance method."""

    async def aclose(self) -> None:
        """Release what `open` acquired, after the session detached what it owned. Idempotent."""

    # -- devices --------------------------------------------------------------------------------------
    @abc.abstractmethod
    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        """(ifindex, name) of a device given by name or ifindex; DeviceNotFound if it is not there."""

    # -- attachments ----------------------------------------------------------------------------------
    @abc.abstractmethod
    async def attach(self, request: AttachRequest) -> H:
        """Attach the program; the record's `info` says where it is now. On failure nothing may be left
        behind (no link, no filter, no qdisc)."""

    @abc.abstractmethod
    async def detach(self, att: H) -> bool:
        """Detach (and remove its pin, if pinned). Return True if it was detached now, False if the kernel
        had already severed it (then only release resources). Must release every resource of `att` in both
        cases."""

    @abc.abstractmethod
    async def update(self, att: H, program: Program, *, expected: Program | None) -> Updated:
        """Swap the program atomically (Conflict if `expected` is given and another program is there,
        changing nothing); a pinned attachment stays pinned at its path. Return what changed: the core
        applies it to `att.info`."""

    async def release(self, att: H) -> None:
        """Let go of a pinned attachment without detaching it (close fds): its session is closing."""

    @abc.abstractmethod
    async def is_attached(self, att: H) -> bool:
        """Ask the kernel whether the attachment is still there (False once severed)."""

    @abc.abstractmethod
    async def query(self, ifindex: int, direction: Direction) -> Hook:
        """Every entry on the hook in the order the kernel runs them (tcx first, then the legacy filters of
        whichever qdisc holds the hook, by priority and newest first within one priority; every classifier,
        a non-BPF one with prog_id 0), all with owned=False: the core marks what the session owns.
        `asynctc.lowlevel.hook.query_hook` does this for a real kernel."""

    # -- pinning --------------------------------------------------------------------------------------
    async def pin(self, att: H, path: str) -> None:
        """Make the attachment outlive the session and process, recorded at `path` on bpffs (the core then
        sets `att.info.pinned`)."""
        raise PinError(f"the {self.name} backend cannot pin attachments")

    async def unpin(self, att: H) -> None:
        """Remove the pin at `att.info.pinned`; the attachment is the session's again (detached when the
        session closes). The core then clears `att.info.pinned`."""
        raise PinError(f"the {self.name} backend cannot pin attachments")

    async def adopt_pinned(self, path: str, *, foreign: bool = False) -> H | None:
        """Take over the attachment pinned at `path`; None if what is there is not this backend's kind.

        Ownership is proven, never assumed from the path: unless `foreign`, raise NotOwned when asynctc's
        own record at the pin does not name `ctx.owner` (or there is no such record)."""
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
