"""The session's event watcher: one event source per session namespace, fanned out to every open monitor,
and the severing detection driven by it.

The watcher task starts with the session but opens its event source only once it is wanted (the session
holds an attachment, a monitor is open, or someone waits for a severing). Backends without an event source
fall back to polling `is_attached` every `POLL_INTERVAL` seconds; monitors then deliver only
AttachmentSevered events. When the session's namespace is deleted, everything the session held there is
severed at once and the session lets the namespace go.
"""

from __future__ import annotations

import dataclasses
import logging

import trio

from ._backends import BackendSet
from ._errors import BackendUnavailable
from ._lifecycle import Lifecycle
from ._monitor import Fanout
from ._registry import Registry
from .events import DeviceRemoved, FilterAdded, FilterRemoved, KernelEvent, QdiscRemoved, Resynced
from .lowlevel.netns import NetnsNameWatch, NetnsRunner

__all__ = ["POLL_INTERVAL", "Watcher"]

log = logging.getLogger("asynctc")

POLL_INTERVAL = 1.0
# How long a FilterAdded event may wait for an attach in flight on its device to register what it made.
OWNERSHIP_WAIT = 5.0


class Watcher:
    """Runs in the session's nursery (`nursery.start_soon(watcher.run)`) until the session closes."""

    def __init__(self, backends: BackendSet, lifecycle: Lifecycle, registry: Registry, fanout: Fanout,
                 runner: NetnsRunner) -> None:
        self._backends = backends
        self._lifecycle = lifecycle
        self._registry = registry
        self._fanout = fanout
        self._runner = runner
        self.netns_gone: str | None = None  # why, once the session's namespace was deleted
        self.let_go = trio.Event()  # set once the session let go of its deleted namespace

    @trio.lowlevel.enable_ki_protection
    async def run(self) -> None:
        # KI-protected, as every background task of the session: trio then delivers a Ctrl-C to the main
        # task at its next checkpoint instead of raising it inside the watcher, whose death would take the
        # session's nursery (and the cleanup under way in it) down with it.
        demand = self._lifecycle.demand
        try:
            await demand.wanted.wait()
            async with trio.open_nursery() as nursery:
                if self._runner.netns is not None and self._runner.ns_inode is not None:
                    nursery.start_soon(self._watch_netns, nursery.cancel_scope)
                await self._run_events()
        except BaseException as exc:
            # While the session closes, its runner and sockets go away under the watcher: whatever that
            # makes the watcher raise (a TCError beside the Cancelled, in a group) ends it quietly rather
            # than failing the session's nursery. Otherwise errors were handled below; only
            # cancellation gets here.
            if self._lifecycle.closed:
                return
            raise exc
        finally:
            demand.ready.set()

    async def _watch_netns(self, stop: trio.CancelScope) -> None:
        """When the session's namespace is deleted by name, let go of it so the kernel can destroy it,
        severing what the session held there."""
        netns, ino = self._runner.netns, self._runner.ns_inode
        assert netns is not None and ino is not None
        try:
            watch = NetnsNameWatch(netns, ino)
        except OSError as exc:
            log.warning("asynctc: cannot watch namespace %r for deletion: %r", netns, exc)
            return
        try:
            await watch.wait_gone()
        finally:
            watch.close()
        stop.cancel()  # the event source's socket holds the namespace too
        reason = f"network namespace {netns!r} was deleted"
        self.netns_gone = reason
        try:
            with trio.CancelScope(shield=True):
                await self._lifecycle.sever_all(reason)
                for err in await self._backends.aclose():
                    log.warning("asynctc: closing a backend after %s failed: %r", reason, err)
            self._runner.close(reason)
            self._fanout.end_all()
        finally:
            self.let_go.set()

    async def _run_events(self) -> None:
        ready = self._lifecycle.demand.ready
        try:
            try:
                cm = self._backends.primary.open_event_source()
            except BackendUnavailable:
                await self._poll()
                return
            async with cm as source:
                # Anything severed before the subscription took effect is found now, before monitors
                # subscribe: what they receive then follows the kernel's order.
                await self._lifecycle.check_alive(self._registry.records(), None)
                ready.set()
                while True:
                    for ev in await source.receive():
                        await self._dispatch(ev)
        except trio.Cancelled:
            raise
        except Exception as exc:
            if self._lifecycle.closed:
                return
            # The event source broke (its socket failed...): say so, and keep severing detection alive
            # by polling rather than letting the session die.
            log.error("asynctc: the event source of the session failed (%r); falling back to polling", exc)
            await self._poll()
        finally:
            ready.set()

    async def _poll(self) -> None:
        self._lifecycle.demand.ready.set()
        while True:
            await self._lifecycle.check_alive(self._registry.records(), None)
            await trio.sleep(POLL_INTERVAL)

    async def _dispatch(self, ev: KernelEvent | Resynced) -> None:
        registry = self._registry
        if isinstance(ev, FilterAdded):
            # The kernel may report our new filter before the attach that made it has registered it.
            with trio.move_on_after(OWNERSHIP_WAIT):
                await registry.settled(ev.ifindex)
            owned = registry.owns_filter(ev.ifindex, ev.direction, ev.priority, ev.handle)
            if owned != ev.owned:
                ev = dataclasses.replace(ev, owned=owned)
        elif isinstance(ev, FilterRemoved):
            owned = registry.owned_removal(ev.ifindex, ev.direction, ev.priority, ev.handle)
            if owned != ev.owned:
                ev = dataclasses.replace(ev, owned=owned)
        self._fanout.publish(ev)
        if isinstance(ev, Resynced):
            await self._lifecycle.check_alive(registry.records(), f"found severed after a resync ({ev.reason})")
            return
        if not isinstance(ev, DeviceRemoved | QdiscRemoved | FilterRemoved):
            return
        live = [rec for rec in registry.on_device(ev.ifindex) if rec.live]
        if not live:
            return
        if isinstance(ev, DeviceRemoved):
            await self._lifecycle.check_alive(live, f"device {ev.name} (ifindex {ev.ifindex}) was deleted")
        elif isinstance(ev, QdiscRemoved):
            hit = [rec for rec in live if rec.info.handle is not None]
            await self._lifecycle.check_alive(hit, f"the {ev.kind} qdisc of ifindex {ev.ifindex} was deleted")
        else:
            hit = [
                rec for rec in live
                if rec.info.handle is not None
                and (ev.direction is None or rec.info.direction is ev.direction)
                and (ev.priority == 0 or rec.info.priority == ev.priority)
                and (ev.handle == 0 or rec.info.handle == ev.handle)
            ]
            await self._lifecycle.check_alive(hit, "its filter was deleted by someone else")
