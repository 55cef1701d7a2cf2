"""pluggy hook specifications of asynctc (project name "asynctc", entry-point group "asynctc").

Plugins implement these with `@asynctc.hookimpl`. pluggy is synchronous: implementations must be plain
functions (an `async def` implementation is rejected when the plugin is registered), and they return
objects; async work happens in those objects' methods (a Backend's, for instance). Implementations may
take fewer arguments than the spec lists, so hooks can grow arguments without breaking plugins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

from ._types import Offload, Probe

if TYPE_CHECKING:
    from ._plugins import BackendRegistry
    from .events import AttachmentEvent

__all__ = ["BackendRequest", "hookimpl", "hookspec"]

PROJECT = "asynctc"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True, slots=True)
class BackendRequest:
    """What backend selection is asked to decide.

    Attributes:
        requested: what the user asked for: "auto" at session level or for an attach without backend=.
        purpose: "session" when choosing a session's backend, "attach" for one attach.
        offload: the attach's offload mode ("never" for a session).
        netns: the session's namespace.
    """

    requested: str
    purpose: str
    offload: Offload
    netns: str | None


@hookspec
def asynctc_register_backends(registry: BackendRegistry) -> None:
    """Register Backend classes.

    Args:
        registry: call `registry.add(BackendClass)` (it is registered under `BackendClass.name`) or
            `registry.add(BackendClass, name="other")`. Registering a name twice is an error.

    Returns nothing. Called once per plugin manager, when backends are first needed.
    """


@hookspec(firstresult=True)
def asynctc_select_backend(request: BackendRequest, available: Mapping[str, Probe]) -> str | None:
    """Pick the backend for a request that did not name one ("auto").

    Args:
        request: what is being decided (see BackendRequest): the session's backend, or one attach's when
            it asks for hardware offload.
        available: every registered backend's probe in this namespace, by name.

    Returns:
        A backend name, or None to let the next implementation decide. firstresult: the first non-None
        answer wins; plugins run in LIFO registration order, so a third-party plugin is asked before the
        built-in default (registered `trylast`), which picks bpf_link where tcx works and netlink otherwise,
        and netlink for attaches that ask for offload.
    """


@hookspec
def asynctc_attachment_event(event: AttachmentEvent) -> None:
    """Observe attachment lifecycle events: attach, update, detach and sever (metrics, logging, audit).

    Args:
        event: an `asynctc.events.AttachmentEvent` (kind, info, attachment, method, reason).

    Returns nothing. Called on the trio thread right after the change, through pluggy (wrappers, tryfirst
    and trylast as pluggy documents); implementations must be quick and must not block. An exception
    raised here ends that call as pluggy documents (wrappers see it, implementations not yet called miss
    the event), is logged, and does not disturb the lifecycle.
    """
