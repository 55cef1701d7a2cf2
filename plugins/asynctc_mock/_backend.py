"""MockBackend: asynctc's real backends on a MockKernel (no privileges needed).

The mock backend decides nothing itself: it runs the bpf_link backend (tcx links) and the netlink backend
(clsact + cls_bpf filters) unchanged on the session's MockKernel, which answers their bpf(2) calls and
rtnetlink messages as the kernel does. An attach makes a tcx link, as bpf_link does; `mode="legacy"` (an
attach option) makes a cls_bpf filter, as netlink does (with `priority=` and `handle=` choosing the slot),
and `offload="prefer"/"require"` asks for a hardware filter on devices that can offload (MockKernel
`add_device(name, offload=True)`; elsewhere "prefer" makes a software filter, as netlink does). Everything
else (detach, update, pins, adoption, orphans, events) is the real backend's, routed to the one that holds
the attachment.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, TypeVar

from asynctc import Direction, Hook, HookEntry, Probe, Program
from asynctc.backend import AttachRequest, Backend, BackendAttachment, BackendContext, EventSource, Updated
from asynctc.lowlevel.kernel import LINUX
from asynctc_bpf_link import BpfLinkBackend, LinkAttachment
from asynctc_netlink import NetlinkBackend

from ._kernel import MockKernel

__all__ = ["MockAttachment", "MockBackend"]

MockAttachment = BackendAttachment
"""The mock backend's record of one attachment: the real backend's (a tcx `LinkAttachment` or a netlink
`FilterAttachment`)."""

MODES = ("tcx", "legacy")


B = TypeVar("B", bound=Backend[Any])


@functools.cache
def _named(base: type[B], name: str) -> type[B]:
    """`base` under the name of the backend that runs it (what its attachments and errors say)."""
    return type(f"{base.__name__}As_{name}", (base,), {"name": name})


class MockBackend(Backend[BackendAttachment]):
    """The mock backend (see the module docstring).

    Attach options: `mode="tcx"` (default: a tcx link) or `mode="legacy"` (a cls_bpf filter under
    clsact); for filters, `priority=` and `handle=` choose the slot instead of the position.

    Attributes:
        kernel: the MockKernel the session runs on (the session's `kernel=`, or a fresh one).
    """

    name: ClassVar[str] = "mock"
    attach_options: ClassVar[Mapping[str, type]] = {"mode": str, "priority": int, "handle": int}
    kernel_type: ClassVar[type | None] = MockKernel
    kernel_kind: ClassVar[str] = "mock"
    can_offload: ClassVar[bool] = True
    has_revisions: ClassVar[bool] = True

    def __init__(self, ctx: BackendContext) -> None:
        if not isinstance(ctx.kernel, MockKernel):
            raise TypeError(f"the mock backend runs on an asynctc_mock.MockKernel (kernel=), got {ctx.kernel!r}")
        super().__init__(ctx)
        self.kernel: MockKernel = ctx.kernel
        self._tcx: BpfLinkBackend = _named(BpfLinkBackend, self.name)(ctx)
        self._legacy: NetlinkBackend = _named(NetlinkBackend, self.name)(ctx)

    @classmethod
    def new_kernel(cls) -> MockKernel:
        """A fresh MockKernel with the default devices (lo, eth0, veth0, veth1): what a session over the
        mock gets when it is opened without `kernel=`."""
        return MockKernel()

    @classmethod
    async def probe(cls, ctx: BackendContext) -> Probe:
        """Available wherever the session's kernel is a MockKernel (or the session makes one)."""
        if ctx.kernel is not LINUX and not isinstance(ctx.kernel, MockKernel):
            return Probe(False, f"the session's kernel is a {type(ctx.kernel).__name__}, not a MockKernel")
        return Probe(True, "in-memory kernel model; no privileges needed")

    async def open(self) -> None:
        await self._tcx.open()
        try:
            await self._legacy.open()
        except BaseException:
            await self._tcx.aclose()
            raise

    async def aclose(self) -> None:
        """Close both parts (the legacy one deletes the clsact qdiscs it made and left empty)."""
        try:
            await self._legacy.aclose()
        finally:
            await self._tcx.aclose()

    def _part(self, att: BackendAttachment) -> Backend[Any]:
        return self._tcx if isinstance(att, LinkAttachment) else self._legacy

    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        return await self._tcx.resolve_device(dev)

    async def attach(self, request: AttachRequest) -> BackendAttachment:
        """A tcx link (default), a cls_bpf filter (`mode="legacy"`), or a hardware filter (offload
        "prefer"/"require"). Nothing is left behind on failure."""
        options = dict(request.options)
        mode = options.pop("mode", "tcx")
        if mode not in MODES:
            raise ValueError(f"mode must be 'tcx' or 'legacy', got {mode!r}")
        if mode == "legacy" or request.offload != "never":
            return await self._legacy.attach(dataclasses.replace(request, options=options))
        if options:
            raise ValueError(f"{', '.join(sorted(options))}: filter slot options, for mode='legacy' only; a tcx "
                             "link is placed by its position")
        return await self._tcx.attach(dataclasses.replace(request, options={}))

    async def detach(self, att: BackendAttachment) -> bool:
        return await self._part(att).detach(att)

    async def update(self, att: BackendAttachment, program: Program, *, expected: Program | None) -> Updated:
        return await self._part(att).update(att, program, expected=expected)

    async def release(self, att: BackendAttachment) -> None:
        await self._part(att).release(att)

    async def is_attached(self, att: BackendAttachment) -> bool:
        return await self._part(att).is_attached(att)

    async def query(self, ifindex: int, direction: Direction) -> Hook:
        return await self._tcx.query(ifindex, direction)

    async def pin(self, att: BackendAttachment, path: str) -> None:
        await self._part(att).pin(att, path)

    async def unpin(self, att: BackendAttachment) -> None:
        await self._part(att).unpin(att)

    async def adopt_pinned(self, path: str, *, foreign: bool = False) -> BackendAttachment | None:
        got: BackendAttachment | None = await self._tcx.adopt_pinned(path, foreign=foreign)
        if got is None:
            got = await self._legacy.adopt_pinned(path, foreign=foreign)
        return got

    async def reap_orphans(self) -> tuple[HookEntry, ...]:
        return await self._tcx.reap_orphans() + await self._legacy.reap_orphans()

    def open_event_source(self) -> AbstractAsyncContextManager[EventSource]:
        return self.ctx.open_netlink_events()
