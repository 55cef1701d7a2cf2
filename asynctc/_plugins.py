"""The plugin manager: built-in and third-party plugins, both through the entry-point group "asynctc"."""

from __future__ import annotations

import inspect
import logging
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy
import trio

from . import hookspecs
from ._errors import BackendUnavailable, TCError
from ._types import Probe
from .backend import Backend
from .hookspecs import BackendRequest, hookimpl

__all__ = [
    "BackendRegistry",
    "PluginError",
    "PluginLoadWarning",
    "get_plugin_manager",
    "load_plugins",
    "make_plugin_manager",
]

ENTRY_POINT_GROUP = "asynctc"
log = logging.getLogger("asynctc")


class PluginError(TCError):
    """A plugin is malformed: an async hook implementation, an unknown hook, a bad backend class."""


class PluginLoadWarning(UserWarning):
    """An installed plugin (entry point) could not be used: it failed to import or is malformed. It is left
    out; the other plugins load."""


class BackendRegistry:
    """Backend classes by name, filled by `asynctc_register_backends` implementations."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Backend[Any]]] = {}

    def add(self, cls: type[Backend[Any]], name: str | None = None) -> None:
        """Register `cls` under `name` (default: cls.name)."""
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise PluginError(f"{cls!r} is not a subclass of asynctc.backend.Backend")
        key = name or getattr(cls, "name", None)
        if not key:
            raise PluginError(f"backend class {cls.__qualname__} has no `name`; set the class attribute")
        if key in self._classes and self._classes[key] is not cls:
            raise PluginError(
                f"two plugins register a backend named {key!r}: {self._classes[key].__module__} and "
                f"{cls.__module__}; uninstall one"
            )
        self._classes[key] = cls

    def get(self, name: str) -> type[Backend[Any]]:
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes)) or "none"
            raise BackendUnavailable(
                f"no backend named {name!r} is installed (installed: {known}); install the plugin that "
                "provides it (entry-point group 'asynctc')"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._classes))

    def __contains__(self, name: object) -> bool:
        return name in self._classes


class _DefaultSelection:
    """The built-in choice for "auto": bpf_link where tcx works, netlink otherwise; netlink (which can
    offload) for attaches that ask for hardware. Registered trylast, so any plugin can override it."""

    @staticmethod
    @hookimpl(trylast=True)
    def asynctc_select_backend(request: BackendRequest, available: Mapping[str, Probe]) -> str | None:
        def ok(name: str) -> bool:
            p = available.get(name)
            return p is not None and p.available

        if request.offload != "never" and ok("netlink"):
            return "netlink"
        if ok("bpf_link"):
            return "bpf_link"
        if ok("netlink"):
            return "netlink"
        return None


class _Manager(pluggy.PluginManager):
    """A PluginManager that refuses async hook implementations and hooks nobody specified."""

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        for attr in dir(plugin):
            if not attr.startswith("asynctc_"):
                continue
            fn = getattr(plugin, attr, None)
            if fn is None:
                continue
            target = inspect.unwrap(fn)
            if inspect.iscoroutinefunction(target) or inspect.isasyncgenfunction(target):
                raise PluginError(
                    f"plugin {name or plugin!r}: hook {attr} is `async def`; asynctc hooks are synchronous "
                    "(pluggy never awaits them). Return an object and do async work in its methods."
                )
        ret = super().register(plugin, name)
        try:
            self.check_pending()
        except pluggy.PluginValidationError as exc:
            self.unregister(plugin)
            raise PluginError(f"plugin {name or plugin!r} implements an unknown hook: {exc}") from None
        return ret


def make_plugin_manager(
    *, entry_points: bool = True, plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """A fresh plugin manager: the hookspecs, the default selection, entry-point plugins, then `plugins`."""
    pm = _Manager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(_DefaultSelection(), name="asynctc.default-selection")
    if entry_points:
        _load_entry_points(pm)
    for p in plugins:
        pm.register(p)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every plugin of the entry-point group. One that fails to import, or that `register`
    refuses (an `async def` hook, an unknown hook), is reported with a PluginLoadWarning naming its
    distribution and left out: one broken package must not make every session of the process fail."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
            what = "could not be imported" if not isinstance(exc, PluginError) else "is malformed"
            message = (
                f"asynctc: the plugin {ep.name!r} ({ep.value}) of the distribution {dist!r} {what} and is "
                f"left out: {exc!r}; fix or uninstall {dist!r}"
            )
            log.warning("%s", message)
            warnings.warn(message, PluginLoadWarning, stacklevel=2)


_lock = threading.Lock()
_default_pm: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    global _default_pm
    with _lock:
        if _default_pm is None:
            _default_pm = make_plugin_manager()
        return _default_pm


_registries: weakref.WeakKeyDictionary[pluggy.PluginManager, BackendRegistry] = weakref.WeakKeyDictionary()


def collect_backends(pm: pluggy.PluginManager) -> BackendRegistry:
    """The backends registered by `pm`'s plugins, collected once per plugin manager."""
    with _lock:
        registry = _registries.get(pm)
    if registry is None:
        registry = BackendRegistry()
        pm.hook.asynctc_register_backends(registry=registry)
        with _lock:
            registry = _registries.setdefault(pm, registry)
    return registry


async def load_plugins(
    plugins: Iterable[object] | None = None,
) -> tuple[pluggy.PluginManager, BackendRegistry]:
    """The plugin manager and its backends for a new session: the process-wide manager, or a fresh one
    with `plugins` added when some are given.

    Building a manager imports every entry-point plugin and what they import (pyroute2, for one): tens of
    milliseconds the first time in a process. That runs in a worker thread, so the trio loop never waits
    for it; the process-wide manager is built once (under a lock, whichever thread or trio run asks first)
    and returned at once afterwards."""
    if not plugins:
        pm = _default_pm
        if pm is not None:
            with _lock:
                registry = _registries.get(pm)
            if registry is not None:
                await trio.lowlevel.checkpoint()
                return pm, registry
        return await trio.to_thread.run_sync(_default_with_backends)
    extra = tuple(plugins)
    return await trio.to_thread.run_sync(_fresh_with_backends, extra)


def _default_with_backends() -> tuple[pluggy.PluginManager, BackendRegistry]:
    pm = get_plugin_manager()
    return pm, collect_backends(pm)


def _fresh_with_backends(plugins: tuple[object, ...]) -> tuple[pluggy.PluginManager, BackendRegistry]:
    pm = make_plugin_manager(plugins=plugins)
    return pm, collect_backends(pm)


class AttachmentEventHook:
    """The asynctc_attachment_event hook of one session's plugin manager. `observed` is checked before an
    event is built: with no implementation registered (the usual case) an attach or detach builds no event
    and makes no pluggy call. It is asked each time, so a plugin registered on the manager later is seen."""

    __slots__ = ("_caller", "_pm")

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self._caller = pm.hook.asynctc_attachment_event

    @property
    def observed(self) -> bool:
        return bool(self._caller.get_hookimpls())

    def notify(self, event: object) -> None:
        notify(self._pm, event)


def notify(pm: pluggy.PluginManager, event: object) -> None:
    """Call the asynctc_attachment_event hook through pluggy, so wrappers, hookwrappers, tryfirst and
    trylast behave as pluggy documents. An exception raised by an implementation ends that call as pluggy
    documents (wrappers see it; implementations not yet called miss that one event) and is logged here:
    it never reaches the attach, update, detach or severing that caused the event."""
    try:
        pm.hook.asynctc_attachment_event(event=event)
    except Exception:
        log.exception("asynctc: an asynctc_attachment_event implementation raised (event %r)", event)
