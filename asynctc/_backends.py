"""The backends of one session: which are installed, which kind of kernel the session runs on, which one is
primary, and which one serves each request (chosen by the `asynctc_select_backend` hook)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pluggy
import trio

from ._errors import BackendUnavailable, TCError
from ._plugins import BackendRegistry
from ._types import Offload, Probe
from .backend import Backend, BackendContext
from .hookspecs import BackendRequest
from .lowlevel.kernel import LINUX

__all__ = ["BackendSet"]

log = logging.getLogger("asynctc")


def runs_on(cls: type[Backend[Any]], kernel: object) -> bool:
    """Whether backend class `cls` can run on `kernel` (the real kernel `LINUX`, a MockKernel, or a
    third-party in-memory kernel): its `kernel_type` says which kernels it takes; without one, a backend of
    kind "mock" takes any in-memory kernel (it checks the type itself) and any other the real kernel only."""
    if cls.kernel_type is not None:
        return isinstance(kernel, cls.kernel_type)
    return (kernel is LINUX) == (cls.kernel_kind != "mock")


def _kernel_name(kernel: object) -> str:
    return "the real kernel" if kernel is LINUX else f"an in-memory kernel ({type(kernel).__name__})"


class BackendSet:
    """The backends a session has opened, all running on the session's one kernel (`ctx.kernel`: the real
    kernel, or one in-memory kernel), created with `await BackendSet.open(...)` and closed with `aclose()`."""

    def __init__(self, pm: pluggy.PluginManager, classes: BackendRegistry, ctx: BackendContext,
                 requested: str) -> None:
        self._pm = pm
        self._classes = classes
        self._ctx = ctx
        self._requested = requested
        self._opened: dict[str, Backend[Any]] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._attach_choices: dict[str, str] = {}  # offload mode -> backend chosen for "auto" attaches
        self._primary: Backend[Any] | None = None
        self._close_lock = trio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, pm: pluggy.PluginManager, classes: BackendRegistry, ctx: BackendContext,
                   requested: str) -> BackendSet:
        """Choose and open the primary backend for a session that asked for `requested` ("auto" or a name).
        On failure nothing stays open."""
        self = cls(pm, classes, ctx, requested)
        try:
            if requested == "auto":
                name = await self.select(BackendRequest(requested="auto", purpose="session", offload="never",
                                                        netns=ctx.netns))
            else:
                name = requested
            if ctx.kernel is LINUX and not runs_on(self._classes.get(name), LINUX):
                # "auto" resolved (by a selection plugin) to a backend of an in-memory kernel: its own.
                self._ctx = dataclasses.replace(ctx, kernel=self.default_kernel(classes, name, None))
            self._primary = await self.get(name)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    @property
    def primary(self) -> Backend[Any]:
        """The session's backend (the one `backend=` named or "auto" chose)."""
        if self._primary is None:
            raise TCError("the session's backend is not open")
        return self._primary

    @property
    def context(self) -> BackendContext:
        return self._ctx

    def opened(self) -> list[Backend[Any]]:
        return list(self._opened.values())

    # -- choosing ------------------------------------------------------------------------------------
    async def probe(self) -> dict[str, Probe]:
        """Probe every installed backend: {name: Probe(available, reason)}, in registration order."""
        names = self._classes.names()
        results: dict[str, Probe] = {}

        async def one(name: str) -> None:
            try:
                results[name] = await self._classes.get(name).probe(self._ctx)
            except Exception as exc:  # a probe must not raise; if one does, say so
                results[name] = Probe(False, f"probe raised {exc!r}")

        async with trio.open_nursery() as n:
            for name in names:
                n.start_soon(one, name)
        return {name: results[name] for name in names}

    async def select(self, request: BackendRequest) -> str:
        """The backend name the `asynctc_select_backend` hook picks among the available ones that run on the
        session's kernel (on the real kernel, "auto" never picks a backend of kind "mock": those are asked
        for by name)."""
        available = await self.probe()
        kernel = self._ctx.kernel
        available = {k: v for k, v in available.items()
                     if runs_on(self._classes.get(k), kernel)
                     and (kernel is not LINUX or self._classes.get(k).kernel_kind != "mock")}
        choice: str | None = self._pm.hook.asynctc_select_backend(request=request, available=available)
        if choice is None:
            reasons = "; ".join(f"{k}: {v.reason}" for k, v in available.items()) or "none installed"
            raise BackendUnavailable(
                f"no backend can work here ({reasons}). Run as root on Linux >= 6.6 for bpf_link, or use "
                "backend='mock' for the in-memory kernel"
            )
        return choice

    async def get(self, name: str) -> Backend[Any]:
        """The backend `name`, opened on first use. It must be of the session's kernel kind."""
        be = self._opened.get(name)
        if be is not None:
            return be
        if self._closed:
            raise TCError("this session is closed; open a new one with asynctc.open_session()")
        async with self._locks.setdefault(name, trio.Lock()):
            be = self._opened.get(name)
            if be is not None:
                return be
            cls = self._classes.get(name)
            if not runs_on(cls, self._ctx.kernel):
                wants = (f"a {cls.kernel_type.__name__}" if cls.kernel_type is not None
                         else "an in-memory kernel" if cls.kernel_kind == "mock" else "the real kernel")
                raise TCError(f"backend {name!r} runs on {wants}, this session on {_kernel_name(self._ctx.kernel)}; "
                              "open a separate session for it")
            probe = await cls.probe(self._ctx)
            if not probe.available:
                raise BackendUnavailable(f"the {name} backend is not available here: {probe.reason}")
            be = cls(self._ctx)
            await be.open()
            self._opened[name] = be
            return be

    async def for_attach(self, name: str | None, offload: Offload) -> Backend[Any]:
        """The backend for one attach: `name` if given, else the primary, except that an offloading
        "auto" session picks (once per offload mode) a backend that can offload."""
        primary = self.primary
        if name is None and not (offload != "never" and self._requested == "auto" and not primary.can_offload):
            return primary
        if name is not None and name != "auto":
            return await self.get(name)
        chosen = self._attach_choices.get(offload)
        if chosen is None:
            chosen = await self.select(
                BackendRequest(requested="auto", purpose="attach", offload=offload, netns=self._ctx.netns)
            )
            self._attach_choices[offload] = chosen
        return await self.get(chosen)

    def kin_names(self) -> list[str]:
        """The primary backend's name, then every other installed backend that runs on the session's kernel:
        those that may hold what a pin or an orphan is."""
        primary = self.primary.name
        return [primary, *(n for n in self._classes.names()
                           if n != primary and runs_on(self._classes.get(n), self._ctx.kernel))]

    async def get_available(self, name: str, unavailable: list[str]) -> Backend[Any] | None:
        """The backend `name`, opened; None (its reason appended to `unavailable`) if it cannot work here."""
        try:
            return await self.get(name)
        except BackendUnavailable as exc:
            unavailable.append(str(exc))
            return None

    # -- closing -------------------------------------------------------------------------------------
    async def aclose(self) -> list[BaseException]:
        """Close every opened backend (each one's failure is returned, the others still close). A second
        call waits for the first to finish and returns no failures of its own."""
        errors: list[BaseException] = []
        async with self._close_lock:
            if self._closed:
                return errors
            self._closed = True
            for be in list(self._opened.values()):
                try:
                    await be.aclose()
                except Exception as exc:
                    errors.append(exc)
        return errors

    @staticmethod
    def default_kernel(classes: BackendRegistry, name: str, kernel: Any) -> Any:
        """The kernel a session on backend `name` runs on: `kernel` if given; for a backend of kind
        "mock" without one, a fresh kernel of the backend's own making (its `new_kernel()`); else the real
        kernel (`LINUX`)."""
        if kernel is not None:
            return kernel
        if name == "auto":
            return LINUX
        cls = classes.get(name)
        new_kernel = getattr(cls, "new_kernel", None)
        if cls.kernel_kind == "mock" and callable(new_kernel):
            return new_kernel()
        return LINUX
