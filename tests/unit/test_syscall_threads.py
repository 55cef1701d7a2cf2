"""SyscallThreads without a kernel: what a cancelled caller gets, what runs, what is handed back, closing.

The runner has no namespace here (the threads run in the process's own); the namespace behaviour and the
real bpf(2) path are tested in tests/integration/test_syscalls.py.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from asynctc.lowlevel import bpf
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.lowlevel.syscalls import SyscallThreads

DEADLINE = 10


@pytest.fixture
async def pool() -> AsyncIterator[SyscallThreads]:
    threads = SyscallThreads(NetnsRunner(None, trio.CapacityLimiter(4)), max_threads=1)
    try:
        yield threads
    finally:
        await threads.aclose()


class Gate:
    """A call that blocks its thread until opened: `started` tells the test that a thread runs it."""

    def __init__(self, value: object = "gated") -> None:
        self.started = threading.Event()
        self.opened = threading.Event()
        self.value = value

    def __call__(self) -> object:
        self.started.set()
        if not self.opened.wait(DEADLINE):
            raise TimeoutError("the test never opened the gate")
        return self.value

    async def wait_started(self) -> None:
        assert await trio.to_thread.run_sync(self.started.wait, DEADLINE)


def recorder(log: list[str], name: str) -> Callable[[], str]:
    def fn() -> str:
        log.append(name)
        return name

    return fn


async def test_results_and_exceptions_come_back_as_they_are(pool: SyscallThreads) -> None:
    with trio.fail_after(DEADLINE):
        assert await pool.run(lambda a, b: a + b, 2, 3) == 5

        def refuse() -> None:
            raise bpf.BpfError(errno.EEXIST, "link_create")

        with pytest.raises(bpf.BpfError) as exc:
            await pool.run(refuse)
        assert exc.value.errno == errno.EEXIST and exc.value.op == "link_create"


async def test_many_concurrent_calls_each_get_their_own_result() -> None:
    pool = SyscallThreads(NetnsRunner(None, trio.CapacityLimiter(4)), max_threads=4, slow=0)
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await pool.run(lambda x: x * x, i)

    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as n:
                for i in range(300):
                    n.start_soon(one, i)
        assert results == {i: i * i for i in range(300)}
        assert 1 <= pool.threads <= 4
    finally:
        await pool.aclose()
    assert pool.threads == 0


async def test_a_call_cancelled_before_it_started_never_runs(pool: SyscallThreads) -> None:
    gate = Gate()
    ran: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(pool.run, gate)
            await gate.wait_started()  # the only thread is busy: the next call waits in the queue
            with trio.CancelScope() as scope:
                scope.cancel()  # cancelled while queued
                await pool.run(recorder(ran, "withdrawn"))
            assert scope.cancelled_caught
            gate.opened.set()
        assert await pool.run(recorder(ran, "after")) == "after"
    assert ran == ["after"]


async def test_a_running_call_is_waited_for_and_its_result_returned(pool: SyscallThreads) -> None:
    gate = Gate("result")
    got: list[object] = []

    async def caller(scope: trio.CancelScope) -> None:
        with scope:
            got.append(await pool.run(gate))  # no checkpoint between the result and recording it
            await trio.lowlevel.checkpoint()
            got.append("not reached: the cancellation comes at the next checkpoint")

    with trio.fail_after(DEADLINE):
        scope = trio.CancelScope()
        async with trio.open_nursery() as n:
            n.start_soon(caller, scope)
            await gate.wait_started()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # still waiting: the call runs
            gate.opened.set()
    assert got == ["result"]
    assert scope.cancelled_caught


async def test_discard_receives_the_result_of_an_abandoned_call(pool: SyscallThreads) -> None:
    gate = Gate("link fd")
    discarded: list[object] = []
    with trio.fail_after(DEADLINE):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:

                async def cancel_once_running() -> None:
                    await gate.wait_started()
                    scope.cancel()

                n.start_soon(cancel_once_running)
                await pool.run(gate, discard=discarded.append)
        assert scope.cancelled_caught
        assert discarded == []  # the caller left while the call still ran
        gate.opened.set()
        await pool.aclose()  # every queued and running call ends first
    assert discarded == ["link fd"]


async def test_a_must_run_call_runs_even_when_cancelled_in_the_queue(pool: SyscallThreads) -> None:
    gate = Gate()
    ran: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(pool.run, gate)
            await gate.wait_started()
            with trio.CancelScope() as scope:
                scope.cancel()
                n.start_soon(lambda: trio.to_thread.run_sync(gate.opened.set))
                assert await pool.run(recorder(ran, "close"), must_run=True) == "close"
    assert ran == ["close"]


async def test_closed_threads_refuse_calls_and_end() -> None:
    pool = SyscallThreads(NetnsRunner(None, trio.CapacityLimiter(4)), max_threads=3, slow=0)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            for _ in range(10):
                n.start_soon(pool.run, lambda: None)
        assert pool.threads >= 1
        await pool.aclose()
        await pool.aclose()  # idempotent
    assert pool.threads == 0 and pool.closed
    with pytest.raises(trio.ClosedResourceError):
        await pool.run(lambda: None)


async def test_close_lets_queued_calls_run_first() -> None:
    pool = SyscallThreads(NetnsRunner(None, trio.CapacityLimiter(4)), max_threads=1)
    gate = Gate()
    ran: list[str] = []
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as n:
            n.start_soon(pool.run, gate)
            await gate.wait_started()
            for i in range(5):
                n.start_soon(pool.run, recorder(ran, str(i)))
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(pool.aclose)
            await trio.testing.wait_all_tasks_blocked()
            gate.opened.set()
    assert sorted(ran) == ["0", "1", "2", "3", "4"] and pool.threads == 0


def test_a_pool_belongs_to_one_trio_run() -> None:
    pool = SyscallThreads(NetnsRunner(None, trio.CapacityLimiter(4)))

    async def use() -> None:
        assert await pool.run(lambda: 1) == 1

    async def use_elsewhere() -> None:
        with pytest.raises(RuntimeError, match="another trio.run"):
            await pool.run(lambda: 1)
        await pool.aclose()

    trio.run(use)
    trio.run(use_elsewhere)


def test_bad_arguments_are_refused() -> None:
    runner = NetnsRunner(None, trio.CapacityLimiter(1))
    with pytest.raises(ValueError, match="max_threads"):
        SyscallThreads(runner, max_threads=0)
    with pytest.raises(ValueError, match="slow"):
        SyscallThreads(runner, slow=-1)
