"""Small lowlevel building blocks of the hot path, without privileges: `held` (taking a free trio lock
without a scheduler round trip) and `NonblockingReceiver` (non-blocking recv that keeps the GIL)."""

from __future__ import annotations

import errno
import socket

import pytest
import trio
import trio.testing

from asynctc.lowlevel.locks import held
from asynctc.lowlevel.nlsock import NonblockingReceiver


async def test_held_takes_a_free_lock_without_yielding() -> None:
    lock = trio.Lock()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        async with held(lock):  # free: no schedule point, so the other task has not run yet
            assert lock.locked() and ran == []
        assert not lock.locked()
    assert ran == ["other"]


async def test_held_waits_for_a_taken_lock_and_releases_on_error() -> None:
    sem = trio.Semaphore(1)
    order: list[str] = []

    async def holder(task_status: trio.TaskStatus[None]) -> None:
        async with held(sem):
            task_status.started()
            await trio.sleep(0.01)
            order.append("holder done")

    async def waiter() -> None:
        async with held(sem):
            order.append("waiter in")
            raise KeyError("boom")

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        with pytest.raises(KeyError, match="boom"):
            await waiter()
    assert order == ["holder done", "waiter in"]
    assert sem.value == 1


async def test_held_is_a_cancellation_point_for_a_cancelled_task() -> None:
    lock = trio.Lock()
    with trio.CancelScope() as scope:
        scope.cancel()
        async with held(lock):
            pytest.fail("a cancelled task must not take the lock")
    assert scope.cancelled_caught and not lock.locked()


def test_nonblocking_receiver_reads_datagrams_and_says_when_empty() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        rx = NonblockingReceiver(b)
        with pytest.raises(BlockingIOError):
            rx.recv()
        a.send(b"first")
        a.send(b"x" * 5000)
        assert rx.recv() == b"first"
        assert rx.recv() == b"x" * 5000
        with pytest.raises(BlockingIOError):
            rx.recv()
        b.setblocking(True)  # MSG_DONTWAIT: never waits, whatever the socket's mode
        with pytest.raises(BlockingIOError):
            rx.recv()
    with pytest.raises(OSError, match="Bad file descriptor") as exc:
        rx.recv()  # closed: fileno() is -1
    assert exc.value.errno == errno.EBADF


async def test_held_takes_and_releases_ki_protected() -> None:
    """A Ctrl-C between taking the lock and entering the block must not leave the lock taken: like
    trio's own lock context managers, held() takes and releases with KeyboardInterrupt deferred."""
    seen: list[tuple[str, bool]] = []

    class Spy:
        def acquire_nowait(self) -> None:
            seen.append(("take", trio.lowlevel.currently_ki_protected()))

        async def acquire(self) -> None:  # pragma: no cover - never contended here
            raise AssertionError

        def release(self) -> None:
            seen.append(("release", trio.lowlevel.currently_ki_protected()))

    async with held(Spy()):
        pass
    assert seen == [("take", True), ("release", True)]
