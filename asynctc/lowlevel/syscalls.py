"""Blocking system calls of one session, run by a few long-lived threads inside its network namespace.

Why: a `trio.to_thread` hop per call (`NetnsRunner.run`) costs more than the call itself once the kernel is
fast (a tcx link create or detach takes ~0.1 ms with expedited RCU grace periods): the limiter, a thread
hand-off, two setns() calls to enter and leave the namespace, and one wake-up of the trio thread per
result. `SyscallThreads` keeps the rules of the runner and drops that cost, on the model of the netlink
transport's I/O thread (`asynctc.lowlevel.transport`):

- A few threads of its own (at most `max_threads`), started lazily with `_thread.start_new_thread` (the
  trio thread does not wait until a new thread runs, as `threading.Thread.start()` would): the first
  EAGER_THREADS (4) as soon as calls are waiting, more only while calls are waiting AND the calls take
  long (a moving average of their durations over `slow` seconds): the threads are then blocked in the
  kernel, and more of them overlap the waits (a tcx attach or detach that waits for an RCU grace period:
  8-28 ms). Fast calls are run by a few threads: more would only contend for the GIL (each system call
  gives it up and takes it back, and a thread that wants it back can wait up to the interpreter's switch
  interval; measured with expedited grace periods: up to 16 threads gave fewer cycles than 4, and trio
  task steps up to 4.7 ms instead of 2.6, the trio thread waiting longer for the GIL).
- Each thread enters the session's namespace ONCE, when it starts (`NetnsRunner.call_in_netns` around
  its whole loop), and then takes calls from one shared queue, one at a time. If the namespace cannot be
  entered, the thread runs nothing and fails the calls it takes with the runner's error. A thread that
  leaves the namespace ends (its namespace is restored, or the process is ended if that fails, by
  `call_in_netns`); it never runs anything else afterwards.
- Results go back to trio in batches: a finished call is put on a shared list, and only the call that finds
  the list empty asks the trio thread to deliver it (one `TrioToken.run_sync_soon`); by the time the trio
  thread runs the delivery, the other threads' results have joined the list, and every waiting task is
  rescheduled in that one step. Nothing runs on the trio thread but the bookkeeping.

Cancellation (the contract of `run`): a call that no thread has started yet is withdrawn and never runs
(the caller gets Cancelled). A call already running is waited for and its result returned, the
cancellation being delivered at the caller's next checkpoint, exactly as with `NetnsRunner.run`; unless
the caller gave `discard=`: then the caller leaves at once and the thread hands the result, when it comes,
to `discard` (for example to close an fd the call made, that its caller no longer wants: nothing is lost). A call
made with `must_run=True` is never withdrawn (for a call that releases something the caller gave up
already, such as closing a link fd). Calls are bounded by the kernel, as before: nothing here times out.

`aclose()` (the owner's close, at the end of the session) lets every queued call run, then stops the
threads and waits for them (bounded by CLOSE_WAIT); later calls raise `trio.ClosedResourceError`.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import ctypes.util
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import outcome
import trio

from .netns import NetnsRunner, release_thread_home

__all__ = ["CLOSE_WAIT", "DEFAULT_MAX_THREADS", "SyscallThreads"]

T = TypeVar("T")

log = logging.getLogger("asynctc")

DEFAULT_MAX_THREADS: Final = 16
"""As the session's default max_workers. With the default RCU settings a tcx attach or detach blocks its
thread for 8-28 ms, mostly waiting for grace periods that concurrent calls share: the more calls in flight,
the closer to the kernel's ceiling (raw C loops: ~23 cycles/s with one thread, ~40 with many)."""
CLOSE_WAIT: Final = 30.0
SLOW: Final = 0.002
EAGER_THREADS: Final = 4

# job states (changed under SyscallThreads._lock)
_QUEUED: Final = 0
_RUNNING: Final = 1
_DONE: Final = 2  # the result is on its way to the caller
_WITHDRAWN: Final = 3  # the caller left before a thread took it: never runs
_ABANDONED: Final = 4  # the caller left while it ran: the thread discards the result

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_PR_SET_NAME: Final = 15


class _Job(Generic[T]):
    __slots__ = ("args", "discard", "fn", "must_run", "result", "state", "task")

    def __init__(self, fn: Callable[..., T], args: tuple[object, ...], task: trio.lowlevel.Task,
                 discard: Callable[[T], object] | None, must_run: bool) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.discard = discard
        self.must_run = must_run
        self.state = _QUEUED
        self.result: outcome.Outcome[T] | None = None


_STOP: Final = object()


class SyscallThreads:
    """Runs blocking calls for one session in a few threads that live in its namespace. See the module
    docstring. Call `run` from trio tasks of one trio run; close with `aclose`.

    Args:
        runner: the session's runner: its namespace is the threads' (entered once per thread).
        max_threads: how many threads at most (started as calls need them).
        name: a short label for the threads' names (shown by top -H, py-spy: "atc-" + name, 15 characters).
        slow: past EAGER_THREADS threads, another starts (while calls wait) only when the calls' average duration
            is over this many seconds; 0 starts one whenever more calls wait or run than there are threads.
    """

    def __init__(self, runner: NetnsRunner, *, max_threads: int = DEFAULT_MAX_THREADS, name: str = "sys",
                 slow: float = SLOW) -> None:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        if not slow >= 0:
            raise ValueError(f"slow must be >= 0 seconds, got {slow!r}")
        self.runner = runner
        self.max_threads = max_threads
        self.slow = slow
        self._name = name
        self._queue: queue.SimpleQueue[_Job[Any] | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._threads = 0  # started and not yet ended
        self._exits: list[threading.Lock] = []  # one per started thread, released when it ends
        self._queued = 0  # calls queued that no thread has taken (nor were withdrawn)
        self._running = 0  # calls being run now
        self._done: list[_Job[Any]] = []  # results waiting for the trio thread
        self._duration = 0.0  # moving average of the calls' durations (seconds)
        self._closed = False

    # -- state ----------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def threads(self) -> int:
        """How many threads are alive now."""
        return self._threads

    # -- calls ----------------------------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection  # a Ctrl-C between queueing and waiting would orphan the result
    async def run(self, fn: Callable[..., T], *args: object, discard: Callable[[T], object] | None = None,
                  must_run: bool = False) -> T:
        """Run `fn(*args)` in one of the threads, inside the namespace, and return its result (or raise its
        exception, as is).

        Cancellation: see the module docstring. `discard`, if given, receives the result of a call whose
        caller was cancelled while it ran (in the thread; its exceptions are logged). `must_run=True`: the
        call runs and is waited for even if the caller is cancelled before it started.
        Raises trio.ClosedResourceError once `aclose()` was called.
        """
        if self._closed:
            raise trio.ClosedResourceError("the session's syscall threads are closed (its session has ended)")
        token = trio.lowlevel.current_trio_token()
        if self._token is None:
            self._token = token
        elif token is not self._token:
            raise RuntimeError("these syscall threads belong to another trio.run; make new ones in this run")
        job: _Job[T] = _Job(fn, args, trio.lowlevel.current_task(), discard, must_run)
        with self._lock:
            self._queued += 1
            start = self._threads == 0 or (
                self._threads < self.max_threads
                and self._queued + self._running > self._threads
                and (self._threads < EAGER_THREADS or self._duration > self.slow)
            )
            if start:
                self._threads += 1
        if start:
            try:
                self._start_thread()
            except BaseException:
                with self._lock:
                    self._queued -= 1
                raise
        self._queue.put(job)

        def abort(raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            with self._lock:
                if job.state == _QUEUED and not job.must_run:
                    job.state = _WITHDRAWN
                    self._queued -= 1
                    return trio.lowlevel.Abort.SUCCEEDED
                if job.state == _RUNNING and job.discard is not None:
                    job.state = _ABANDONED
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED  # running, or its result is on its way: wait for it

        return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]

    def _start_thread(self) -> None:
        exited = threading.Lock()
        exited.acquire()
        try:
            _thread.start_new_thread(self._thread_main, (exited,))
        except BaseException:
            with self._lock:
                self._threads -= 1
            if self._threads == 0:
                raise  # nobody would ever run the call: the caller hears of it
            log.warning("asynctc: could not start another syscall thread; going on with %d", self._threads)
            return
        self._exits.append(exited)

    # -- the threads ----------------------------------------------------------------------------------

    def _thread_main(self, exited: threading.Lock) -> None:
        try:
            with contextlib.suppress(Exception):
                label = f"atc-{self._name}"[:15].encode()
                _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(label), 0, 0, 0)
            try:
                self.runner.call_in_netns(self._loop)
            except BaseException as exc:  # the namespace could not be entered (gone, closed): run nothing
                self._fail_loop(exc)
        finally:
            release_thread_home()
            with self._lock:
                self._threads -= 1
            exited.release()

    def _take(self) -> _Job[Any] | None:
        """The next call to run (marked running), or None at a stop."""
        while True:
            job = self._queue.get()
            if job is _STOP:
                return None
            assert isinstance(job, _Job)
            with self._lock:
                if job.state != _QUEUED:
                    continue  # withdrawn
                job.state = _RUNNING
                self._queued -= 1
                self._running += 1
            return job

    def _loop(self) -> None:
        clock = time.monotonic
        while (job := self._take()) is not None:
            t0 = clock()
            try:
                job.result = outcome.Value(job.fn(*job.args))
            except BaseException as exc:
                job.result = outcome.Error(exc)
            self._finish(job, clock() - t0)

    def _fail_loop(self, exc: BaseException) -> None:
        while (job := self._take()) is not None:
            job.result = outcome.Error(exc)
            self._finish(job, 0.0)

    def _finish(self, job: _Job[Any], duration: float) -> None:
        with self._lock:
            self._running -= 1
            self._duration += (duration - self._duration) * 0.2
            abandoned = job.state == _ABANDONED
            if not abandoned:
                job.state = _DONE
                self._done.append(job)
                report = len(self._done) == 1
        if abandoned:
            self._discard(job)
        elif report:
            token = self._token
            assert token is not None
            try:
                token.run_sync_soon(self._deliver)
            except trio.RunFinishedError:  # nobody left to hand results to: release what they hold
                with self._lock:
                    done, self._done = self._done, []
                for j in done:
                    self._discard(j)

    @staticmethod
    def _discard(job: _Job[Any]) -> None:
        result, job.result = job.result, None
        if job.discard is None or not isinstance(result, outcome.Value):
            return
        try:
            job.discard(result.value)
        except BaseException as exc:
            log.error("asynctc: releasing the result of a cancelled %s call failed: %r",
                      getattr(job.fn, "__qualname__", job.fn), exc)

    def _deliver(self) -> None:
        """On the trio thread (KI-protected, as every run_sync_soon callback): wake every task whose call
        finished since the last delivery, in one step."""
        with self._lock:
            done, self._done = self._done, []
        for job in done:
            result, job.result = job.result, None
            assert result is not None
            trio.lowlevel.reschedule(job.task, result)

    # -- closing --------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the threads once every call queued so far has run, and wait for them to end (shielded,
        bounded by CLOSE_WAIT). Idempotent; later `run` calls raise trio.ClosedResourceError."""
        if not self._closed:
            self._closed = True
            for _ in range(len(self._exits)):
                self._queue.put(_STOP)
        exits, self._exits = self._exits, []
        if exits:
            def join() -> None:
                deadline = time.monotonic() + CLOSE_WAIT
                for exited in exits:
                    if exited.acquire(timeout=max(0.0, deadline - time.monotonic())):
                        exited.release()

            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(join)
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._threads} threads"
        return f"<SyscallThreads netns={self.runner.netns!r} {state}>"
