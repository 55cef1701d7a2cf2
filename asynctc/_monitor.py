"""Monitors: async iterators of events, each with its own bounded buffer, fed by a session's `Fanout`.

Policy for slow consumers: each Monitor has its own bounded buffer. When it is full, events for that
monitor alone are dropped and counted; once the consumer has read what was buffered, it receives
`EventsDropped(count)`, before any later event. The fan-out never waits for a consumer, so one slow
monitor cannot stall the others, the severing logic or the session.
"""

from __future__ import annotations

import trio

from .events import Event, EventsDropped

__all__ = ["Fanout", "Monitor", "Subscription"]


class Subscription:
    """The sending side of one monitor: its buffer and the count of events dropped for it."""

    def __init__(self, buffer: int) -> None:
        if buffer < 1:
            raise ValueError(f"buffer must be >= 1, got {buffer}")
        self.send, self.recv = trio.open_memory_channel[Event](buffer)
        self.dropped = 0  # dropped since the consumer last heard of it
        self.dropped_total = 0

    def offer(self, ev: Event) -> None:
        """Queue `ev` without waiting; count it as dropped if the buffer is full."""
        try:
            if self.dropped:
                self.send.send_nowait(EventsDropped(self.dropped))
                self.dropped = 0
            self.send.send_nowait(ev)
        except trio.WouldBlock:
            self.dropped += 1
            self.dropped_total += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def close(self) -> None:
        self.send.close()


class Monitor:
    """An async iterator of events (see `asynctc.events`), from `Session.open_monitor()`.

    `async for event in monitor:` ends when the monitor's block or the session closes.
    """

    def __init__(self, subscription: Subscription) -> None:
        self._sub = subscription

    @property
    def dropped_total(self) -> int:
        """How many events were dropped for this monitor since it opened (its buffer was full)."""
        return self._sub.dropped_total

    async def receive(self) -> Event:
        """The next event; raises trio.EndOfChannel once the monitor is closed.

        When events were dropped for this monitor, `EventsDropped(count)` comes as soon as the consumer has
        read what was buffered before the loss (and before any later event)."""
        sub = self._sub
        try:
            ev = sub.recv.receive_nowait()
        except trio.WouldBlock:
            if sub.dropped:
                count, sub.dropped = sub.dropped, 0
                await trio.lowlevel.checkpoint()
                return EventsDropped(count)
            return await sub.recv.receive()
        await trio.lowlevel.checkpoint()
        return ev

    def __aiter__(self) -> Monitor:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None


class Fanout:
    """Every open monitor of a session; `publish` offers an event to each."""

    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._subs)

    def subscribe(self, buffer: int) -> Subscription:
        sub = Subscription(buffer)
        if self._closed:
            sub.close()
        else:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        sub.close()

    def publish(self, ev: Event) -> None:
        for sub in list(self._subs):
            sub.offer(ev)

    def end_all(self) -> None:
        """End every monitor's stream (their iterators stop once they read what is buffered)."""
        for sub in list(self._subs):
            sub.close()

    def close(self) -> None:
        self._closed = True
        self.end_all()
        self._subs.clear()
