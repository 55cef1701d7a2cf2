"""Stopping a trio program with Ctrl-C or SIGTERM without losing its cleanup.

By default trio turns SIGINT into KeyboardInterrupt in the main task, and SIGTERM kills the process: a
plain trio application stopped by its service manager leaves its legacy filters behind (they outlive the
process), and a second Ctrl-C can interrupt a cleanup running in the main task. `run_until_interrupted`
runs the work in a child task and turns both signals into a cancellation of it, so every shielded cleanup
runs to completion; signals arriving meanwhile are absorbed.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import trio

__all__ = ["Interrupted", "run_until_interrupted"]

T = TypeVar("T")

DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Raised by `run_until_interrupted` when a signal stopped the work, after its cleanup completed.

    Attributes:
        signum: the signal that arrived first (signal.SIGINT, signal.SIGTERM...).
        exit_code: 128 + signum, what shells expect from a program a signal ended (130 for Ctrl-C).
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; the cleanup completed")


async def run_until_interrupted(
    async_fn: Callable[..., Awaitable[T]], *args: object, signals: Iterable[int] = DEFAULT_SIGNALS
) -> T:
    """Run `await async_fn(*args)` in a child task, cancelling it when one of `signals` arrives.

        trio.run(asynctc.run_until_interrupted, main)

    The cancellation reaches the work like any other: `open_session` and `open_attachment` blocks detach
    what they own, shielded, and further signals during that cleanup are absorbed rather than
    interrupting it. Must run in the main thread (signal handlers can only be installed there); the
    previous handlers are restored on return.

    Args:
        async_fn: the work, an async function.
        *args: its positional arguments.
        signals: the signals that stop it (default SIGINT and SIGTERM).

    Returns:
        What `async_fn` returned (also when a signal arrived after it had returned).

    Raises:
        Interrupted: a signal stopped the work; raised once its cleanup completed (`exit_code` is 128 +
            the signal's number, for `sys.exit`).
        Whatever `async_fn` raised, as itself (never wrapped in an ExceptionGroup); when a signal had
            cancelled it, with a note saying so.
    """
    wanted = tuple(signals)
    if not wanted:
        raise ValueError("signals must name at least one signal, e.g. (signal.SIGINT, signal.SIGTERM)")
    result: list[T] = []
    failure: list[BaseException] = []
    received: list[int] = []
    with trio.open_signal_receiver(*wanted) as receiver:
        async with trio.open_nursery() as nursery:
            work_scope = trio.CancelScope()

            async def work() -> None:
                with work_scope:
                    try:
                        result.append(await async_fn(*args))
                    except trio.Cancelled:
                        raise
                    except BaseExceptionGroup as group:
                        # A nursery inside the work (a session's) may group the cancellations of its
                        # tasks: a group of nothing but cancellations is a cancellation.
                        _, rest = group.split(trio.Cancelled)
                        if rest is None:
                            raise
                        failure.append(rest)
                    except BaseException as exc:  # re-raised below, outside the nursery: unwrapped
                        failure.append(exc)
                nursery.cancel_scope.cancel()  # the work and its cleanup are done: stop listening

            async def watch() -> None:
                # Listens until the work's cleanup is over: signals arriving meanwhile are taken here,
                # where they change nothing (trio would re-deliver signals left in the receiver).
                async for signum in receiver:
                    received.append(signum)
                    work_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(work)
    if failure:
        exc = failure[0]
        if received:
            exc.add_note(f"asynctc.run_until_interrupted: {signal.Signals(received[0]).name} had cancelled the work")
        raise exc
    if result:
        return result[0]
    # Only the work's end and a signal cancel the nursery; a cancellation from outside this call
    # propagated out of the nursery above.
    assert received, "run_until_interrupted: the work ended without a result, an error or a signal"
    raise Interrupted(received[0])
