"""The plugin manager: built-in and third-party plugins, both through the entry-point group "asynctc"."""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from . import hookspecs
from ._errors import BackendUnavailable, TCError
from ._types import Probe
from .backend import Backend
from .hookspecs import BackendRequest, hookimpl

__all__ = ["BackendRegistry", "PluginError", "get_plugin_manager", "make_plugin_manager"]

ENTRY_POINT_GROUP = "asynctc"
log = logging.getLogger("asynctc")


class PluginError(TCError):
    """A plugin is malformed: an async hook implementation, an unknown hook, a bad backend class."""


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
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            # A broken third-party plugin must not take the others down; say which and why.
            log.warning("asynctc: could not load plugin %r (%s): %r", ep.name, ep.value, exc)
            continue
        pm.register(plugin, name=ep.name)


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


def notify(pm: pluggy.PluginManager, event: object) -> None:
    """Call every asynctc_attachment_event implementation, each on its own: an observer's exception is
    logged and neither reaches the lifecycle nor keeps the other observers from seeing the event."""
    kwargs = {"event": event}
    for impl in pm.hook.asynctc_attachment_event.get_hookimpls():
        try:
            impl.function(*(kwargs[name] for name in impl.argnames))
        except Exception:
            log.exception("asynctc: the asynctc_attachment_event implementation of %s raised", impl.plugin_name)
