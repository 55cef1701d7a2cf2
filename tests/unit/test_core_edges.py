"""Core behaviour at the edges, on the mock: pins held by another session, slow monitors, registries."""

from __future__ import annotations

import pytest
import trio

import asynctc
from asynctc import events as ev
from asynctc._plugins import collect_backends, get_plugin_manager
from asynctc_mock import MockKernel


async def test_adopting_a_pin_held_by_another_open_session_is_not_owned() -> None:
    kernel = MockKernel()
    async with asynctc.open_session("mock", kernel=kernel) as a:
        att = await a.attach("eth0", "ingress", kernel.program("pass"))
        await att.pin("/sys/fs/bpf/held")
        async with asynctc.open_session("mock", kernel=kernel) as b:
            with pytest.raises(asynctc.NotOwned, match="held by a live asynctc session"):
                await b.adopt_pinned("/sys/fs/bpf/held")
            assert b.attachments == ()
    # once the holder closed (the pin kept the attachment), a new session adopts it
    async with asynctc.open_session("mock", kernel=kernel) as c:
        adopted = await c.adopt_pinned("/sys/fs/bpf/held")
        assert adopted.info.prog_id == att.info.prog_id
        await adopted.unpin()
        await adopted.detach()


async def test_a_slow_monitor_learns_of_dropped_events_when_it_drains() -> None:
    kernel = MockKernel()
    async with asynctc.open_session("mock", kernel=kernel) as s, s.open_monitor(buffer=2) as mon:
        for i in range(5):
            await trio.to_thread.run_sync(kernel.add_device, f"d{i}")
        got: list[ev.Event] = []

        def lost() -> int:
            return sum(e.count for e in got if isinstance(e, ev.EventsDropped))

        with trio.fail_after(10):
            while lost() < 3:  # the hub may still be delivering when the consumer drains: then in parts
                got.append(await mon.receive())
        # what was buffered first, then the loss, with no later event needed to reveal it
        assert [type(e) for e in got[:2]] == [ev.DeviceAdded, ev.DeviceAdded]
        assert all(isinstance(e, ev.EventsDropped) for e in got[2:]) and lost() == 3


def test_backends_are_registered_once_per_plugin_manager() -> None:
    pm = get_plugin_manager()
    assert collect_backends(pm) is collect_backends(pm)


async def test_the_session_watcher_is_ki_protected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C must be delivered to the main task, never raised inside the session's background watcher
    (its death would fail the nursery that the main task's cleanup runs in)."""
    from asynctc._watcher import Watcher

    protected: list[bool] = []
    real = Watcher._dispatch

    async def spy(self: Watcher, event: object) -> None:
        protected.append(trio.lowlevel.currently_ki_protected())
        await real(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(Watcher, "_dispatch", spy)
    kernel = MockKernel()
    async with asynctc.open_session("mock", kernel=kernel) as s, s.open_monitor() as mon:
        await trio.to_thread.run_sync(kernel.add_device, "kp0")
        with trio.fail_after(10):
            await mon.receive()
    assert protected and all(protected)


def test_an_operation_is_an_op_and_a_misspelt_one_is_refused() -> None:
    """from_errno chooses the class by errno refined by the operation: the operation is an Op (or its value),
    so a misspelt name fails loudly instead of silently losing its meaning."""
    err = asynctc.from_errno(1, op=asynctc.Op.LINK_UPDATE_CAS)
    assert isinstance(err, asynctc.Conflict)
    assert isinstance(asynctc.from_errno(1, op="link_update_cas"), asynctc.Conflict)
    with pytest.raises(ValueError, match="link_updat_cas"):
        asynctc.from_errno(1, op="link_updat_cas")


async def test_an_attach_that_ends_after_the_session_closed_is_detached_again() -> None:
    """An attach still under way when its session closes (started from a task outside the session's block)
    must not leave an attachment nobody owns."""
    kernel = MockKernel()
    kernel.set_latency(0.2, op="link_create")
    outcome: list[BaseException | asynctc.Attachment] = []
    async with trio.open_nursery() as outer:
        async with asynctc.open_session("mock", kernel=kernel) as s:

            async def attach() -> None:
                try:
                    outcome.append(await s.attach("eth0", "ingress", kernel.program()))
                except asynctc.TCError as exc:
                    outcome.append(exc)

            outer.start_soon(attach)
            await trio.sleep(0.05)  # the attach is in the kernel now; the session closes meanwhile
    assert len(outcome) == 1 and isinstance(outcome[0], asynctc.TCError), outcome
    assert "closed while the attach was under way" in str(outcome[0])
    assert kernel.hook("eth0", "ingress").entries == ()
