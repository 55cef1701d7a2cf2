"""The session's event hub: one event source per session namespace, fanned out to every open monitor,
and the severed-attachment detection driven by it.

Policy for slow consumers: each Monitor has its own bounded buffer. When it is full, events for that
monitor alone are dropped and counted; once the consumer has read what was buffered, it receives
`EventsDropped(count)`, before any later event.
The hub never waits for a consumer, so one slow monitor cannot stall the others, the severing logic or
the session.

Backends without an event source fall back to polling `is_attached` (every `POLL_INTERVAL` seconds)
for severing; monitors then deliver only AttachmentSevered events.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import trio

from ._errors import BackendUnavailable
from ._types import State
from .events import (
    DeviceRemoved,
    Event,
    EventsDropped,
    FilterAdded,
    FilterRemoved,
    KernelEvent,
    QdiscRemoved,
    Resynced,
)
from .lowlevel.netns import NetnsNameWatch

if TYPE_CHECKING:
    from ._session import Session

__all__ = ["Monitor"]

log = logging.getLogger("asynctc")

POLL_INTERVAL = 1.0


class Monitor:
    """An async iterator of events (see `asynctc.events`), from `Session.open_monitor()`.

    `async for event in monitor:` ends when the monitor's block or the session closes.
    """

    def __init__(self, buffer: int) -> None:
        if isinstance(buffer, bool) or not isinstance(buffer, int):
            raise TypeError(f"buffer must be an int (events), got {type(buffer).__name__} {buffer!r}")
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        self._send, self._recv = trio.open_memory_channel[Event](buffer)
        self._dropped = 0
        self.dropped_total = 0

    def _offer(self, ev: Event) -> None:
        try:
            if self._dropped:
                self._send.send_nowait(EventsDropped(self._dropped))
                self._dropped = 0
            self._send.send_nowait(ev)
        except trio.WouldBlock:
            self._dropped += 1
            self.dropped_total += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def receive(self) -> Event:
        """The next event; raises trio.EndOfChannel once the monitor is closed.

        When events were dropped for this monitor, `EventsDropped(count)` comes as soon as the consumer has
        read what was buffered before the loss (and before any later event)."""
        try:
            ev = self._recv.receive_nowait()
        except trio.WouldBlock:
            if self._dropped:
                count, self._dropped = self._dropped, 0
                await trio.lowlevel.checkpoint()
                return EventsDropped(count)
            return await self._recv.receive()
        await trio.lowlevel.checkpoint()
        return ev

    def __aiter__(self) -> Monitor:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    def _close(self) -> None:
        self._send.close()


class _Hub:
    def __init__(self, session: Session) -> None:
        self._session = session
        self._subs: set[Monitor] = set()
        self._ready: trio.Event | None = None
        self._closed = False
        self.polling = False

    # -- lifecycle -----------------------------------------------------------------------------------
    def _start(self) -> trio.Event | None:
        """Start the watcher in the session's nursery unless it runs already; its readiness event."""
        if self._ready is None and self._session._nursery is not None and not self._closed:
            self._ready = trio.Event()
            self._session._nursery.start_soon(self._run, self._ready)
        return self._ready

    def attachment_added(self) -> None:
        """Start watching (in the background) once the session has something to lose."""
        self._start()

    async def ensure_started(self) -> None:
        """Start watching if not yet, and wait until the event source is subscribed."""
        ready = self._start()
        if ready is not None:
            await ready.wait()

    async def aclose(self) -> None:
        self._closed = True
        for m in list(self._subs):
            m._close()
        self._subs.clear()

    # -- subscribers ---------------------------------------------------------------------------------
    def subscribe(self, buffer: int) -> Monitor:
        m = Monitor(buffer)
        self._subs.add(m)
        return m

    def unsubscribe(self, m: Monitor) -> None:
        self._subs.discard(m)
        m._close()

    def publish(self, ev: Event) -> None:
        for m in list(self._subs):
            m._offer(ev)

    # -- the watcher ---------------------------------------------------------------------------------
    @trio.lowlevel.enable_ki_protection
    async def _run(self, ready: trio.Event) -> None:
        # KI-protected, as every background task of the session: trio then delivers a Ctrl-C to the main
        # task at its next checkpoint instead of raising it inside the watcher, whose death would take the
        # session's nursery (and the cleanup under way in it) down with it.
        session = self._session
        try:
            async with trio.open_nursery() as nursery:
                if session.netns is not None and session.runner.ns_inode is not None:
                    nursery.start_soon(self._watch_netns, nursery.cancel_scope)
                await self._run_events(ready)
        except BaseException as exc:
            # While the session closes, its runner and sockets go away under the watcher: whatever that
            # makes the watcher raise (a TCError beside the Cancelled, in a group) ends it quietly rather
            # than failing the session's nursery. Otherwise errors were handled below; only
            # cancellation gets here.
            if session._closed or self._closed:
                return
            raise exc
        finally:
            ready.set()

    async def _watch_netns(self, stop: trio.CancelScope) -> None:
        """When the session's namespace is deleted by name, let go of it so the kernel can destroy it,
        severing what the session held there."""
        session = self._session
        assert session.netns is not None and session.runner.ns_inode is not None
        try:
            watch = NetnsNameWatch(session.netns, session.runner.ns_inode)
        except OSError as exc:
            log.warning("asynctc: cannot watch namespace %r for deletion: %r", session.netns, exc)
            return
        try:
            await watch.wait_gone()
        finally:
            watch.close()
        stop.cancel()  # the event source's socket holds the namespace too
        with trio.CancelScope(shield=True):
            await session._on_netns_gone(f"network namespace {session.netns!r} was deleted")
        for m in list(self._subs):
            m._close()

    async def _run_events(self, ready: trio.Event) -> None:
        session = self._session
        assert session._primary is not None
        try:
            try:
                cm = session._primary.open_event_source()
            except BackendUnavailable:
                await self._poll(ready)
                return
            async with cm as source:
                ready.set()
                # Anything severed before the subscription took effect is found now.
                await session._check_alive(session.attachments, "severed before events were watched")
                while True:
                    for ev in await source.receive():
                        await self._dispatch(ev)
        except trio.Cancelled:
            raise
        except Exception as exc:
            if session._closed or self._closed:
                return
            # The event source broke (its socket failed...): say so, and keep severing detection alive
            # by polling rather than letting the session die.
            log.error("asynctc: the event source of %r failed (%r); falling back to polling", session, exc)
            await self._poll(ready)
        finally:
            ready.set()

    async def _poll(self, ready: trio.Event) -> None:
        self.polling = True
        ready.set()
        while True:
            await self._session._check_alive(self._session.attachments, "found severed (polled)")
            await trio.sleep(POLL_INTERVAL)

    async def _dispatch(self, ev: KernelEvent | Resynced) -> None:
        session = self._session
        if isinstance(ev, FilterAdded | FilterRemoved):
            owned = session.owns_filter(ev.ifindex, ev.direction, ev.priority, ev.handle)
            if owned != ev.owned:
                ev = dataclasses.replace(ev, owned=owned)
        self.publish(ev)
        if isinstance(ev, Resynced):
            live = [a for a in session.attachments if a.state is State.ATTACHED]
            await session._check_alive(live, f"found severed after a resync ({ev.reason})")
            return
        if not isinstance(ev, DeviceRemoved | QdiscRemoved | FilterRemoved):
            return
        live = [a for a in session._on_device(ev.ifindex) if a.state is State.ATTACHED]
        if not live:
            return
        if isinstance(ev, DeviceRemoved):
            await session._check_alive(live, f"device {ev.name} (ifindex {ev.ifindex}) was deleted")
        elif isinstance(ev, QdiscRemoved):
            hit = [a for a in live if a.info.handle is not None]
            await session._check_alive(hit, f"the {ev.kind} qdisc of ifindex {ev.ifindex} was deleted")
        else:
            hit = [
                a for a in live
                if a.info.handle is not None
                and (ev.direction is None or a.info.direction is ev.direction)
                and (ev.priority == 0 or a.info.priority == ev.priority)
                and (ev.handle == 0 or a.info.handle == ev.handle)
            ]
            await session._check_alive(hit, "its filter was deleted by someone else")
