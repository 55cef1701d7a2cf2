"""asynctc.run_until_interrupted: SIGINT and SIGTERM become a cancellation of the work, whose cleanup
completes (further signals are absorbed); results and errors come back as themselves."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import pytest
import trio

import asynctc
from asynctc_mock import MockKernel


async def attach_and_wait(kernel: MockKernel, signum: int) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        await session.attach("eth0", "ingress", kernel.program())
        async with session.open_attachment("eth0", "egress", kernel.program()):
            os.kill(os.getpid(), signum)
            await trio.sleep_forever()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_cancels_the_work_and_its_cleanup_completes(mock_kernel: MockKernel, signum: int) -> None:
    with pytest.raises(asynctc.Interrupted) as info:
        await asynctc.run_until_interrupted(attach_and_wait, mock_kernel, signum)
    assert info.value.signum == signum
    assert info.value.exit_code == 128 + signum
    assert signal.Signals(signum).name in str(info.value)
    for direction in ("ingress", "egress"):
        assert mock_kernel.hook("eth0", direction).entries == ()


async def test_the_previous_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)

    async def work() -> int:
        assert signal.getsignal(signal.SIGTERM) is not before
        return 1

    assert await asynctc.run_until_interrupted(work) == 1
    assert signal.getsignal(signal.SIGTERM) is before


async def test_a_second_signal_during_the_cleanup_is_absorbed(mock_kernel: MockKernel) -> None:
    mock_kernel.set_latency(0.05, "link_detach")  # a detach slow enough for the second signal to land in it

    async def work() -> None:
        async with asynctc.open_session("mock", kernel=mock_kernel) as session:
            async with session.open_attachment("eth0", "ingress", mock_kernel.program()):
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    await trio.sleep_forever()
                finally:
                    os.kill(os.getpid(), signal.SIGINT)  # pressed again while the detach is under way

    with pytest.raises(asynctc.Interrupted) as info:
        await asynctc.run_until_interrupted(work)
    assert info.value.signum == signal.SIGINT
    assert mock_kernel.hook("eth0", "ingress").entries == ()
    assert mock_kernel.calls["link_detach"] == 1


async def test_the_result_and_the_arguments() -> None:
    async def add(a: int, b: int) -> int:
        await trio.lowlevel.checkpoint()
        return a + b

    assert await asynctc.run_until_interrupted(add, 2, 3) == 5


async def test_an_error_of_the_work_comes_back_unwrapped(mock_kernel: MockKernel) -> None:
    async def work() -> None:
        async with asynctc.open_session("mock", kernel=mock_kernel) as session:
            await session.attach("eth0", "ingress", mock_kernel.program())
            raise ValueError("the work's own error")

    with pytest.raises(ValueError, match="the work's own error"):
        await asynctc.run_until_interrupted(work)
    assert mock_kernel.hook("eth0", "ingress").entries == ()


async def test_only_the_given_signals_stop_it() -> None:
    async def work() -> str:
        os.kill(os.getpid(), signal.SIGUSR1)
        with trio.fail_after(10):
            await trio.sleep_forever()
        return "not reached"

    with pytest.raises(asynctc.Interrupted) as info:
        await asynctc.run_until_interrupted(work, signals=[signal.SIGUSR1])
    assert info.value.signum == signal.SIGUSR1


async def test_no_signals_is_a_clear_error() -> None:
    async def work() -> None:
        raise AssertionError("must not run")

    with pytest.raises(ValueError, match="at least one signal"):
        await asynctc.run_until_interrupted(work, signals=())


async def test_a_cancellation_from_outside_propagates(mock_kernel: MockKernel) -> None:
    with trio.move_on_after(0.05) as scope:
        await asynctc.run_until_interrupted(attach_and_wait, mock_kernel, 0)
    assert scope.cancelled_caught
    assert mock_kernel.hook("eth0", "ingress").entries == ()


async def test_cancellations_grouped_by_a_nursery_in_the_work_are_a_cancellation() -> None:
    async def work() -> None:
        async with trio.open_nursery() as nursery:  # its two tasks' cancellations come out as a group
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(trio.sleep_forever)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(asynctc.Interrupted):
        await asynctc.run_until_interrupted(work)


async def test_an_error_beside_the_cancellations_comes_back_with_a_note() -> None:
    async def fail_on_cancel() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise OSError("cleanup failed")  # a failing cleanup, on purpose

    async def work() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(fail_on_cancel)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(BaseExceptionGroup) as info:
        await asynctc.run_until_interrupted(work)
    assert info.value.subgroup(trio.Cancelled) is None
    assert [type(e) for e in info.value.exceptions] == [OSError]
    assert any("SIGTERM had cancelled the work" in n for n in info.value.__notes__)


def test_the_command_absorbs_a_second_signal_during_its_cleanup() -> None:
    # `asynctc monitor` runs its job under run_until_interrupted: Ctrl-C then SIGTERM right after it (an
    # impatient operator, a service manager) still ends with the first signal's code and no traceback.
    proc = subprocess.Popen([sys.executable, "-m", "asynctc.cli", "monitor", "--backend", "mock"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 60)
        assert ready and "watching" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err
