"""Shared pieces of the benchmarks: throwaway namespaces and veths, thread loops, the loop-lag probe, tables.

Everything a benchmark creates is uniquely named (asynctc.testing.unique_name) and removed by that name in
a `finally:`, so Ctrl-C or a failure leaves nothing behind; nothing else on the machine is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import FrameType

import trio

import asynctc
from asynctc.lowlevel.netns import CLONE_NEWNET, netns_path, setns
from asynctc.testing import create_netns, delete_netns, unique_name

__all__ = [
    "LagProbe",
    "Row",
    "ThreadRun",
    "bench_netns",
    "in_netns",
    "ip_batch",
    "machine_line",
    "make_veths",
    "parse_args",
    "print_table",
    "run_script",
    "run_threads",
    "verdict",
]


# --- arguments ------------------------------------------------------------------------------------------
def parse_args(description: str, *, default_duration: float, quick_duration: float) -> argparse.Namespace:
    """--quick (a short smoke run) and --duration SECONDS (per measured configuration)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short smoke run (well under a minute)")
    p.add_argument("--duration", type=float, default=None,
                   help=f"seconds per measured configuration (default {default_duration}, --quick {quick_duration})")
    args = p.parse_args()
    if args.duration is None:
        args.duration = quick_duration if args.quick else default_duration
    return args


def run_script(main: Callable[[], int]) -> None:
    """Run a benchmark's main() and exit with its status. SIGTERM behaves like Ctrl-C, so the `finally:`
    blocks that remove namespaces run either way; an interrupted run exits 130 saying so."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything created was removed", file=sys.stderr)
        sys.exit(130)


def machine_line() -> str:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        with open("/sys/kernel/rcu_expedited") as f:
            rcu = f.read().strip()
    except OSError:
        rcu = "?"
    return (f"Linux {platform.release()}, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"rcu_expedited={rcu}")


# --- namespaces and devices -----------------------------------------------------------------------------
@contextlib.contextmanager
def bench_netns(prefix: str) -> Iterator[str]:
    """A fresh, uniquely named namespace, deleted by name afterwards (its devices go with it)."""
    name = create_netns(unique_name(prefix))
    try:
        yield name
    finally:
        delete_netns(name)


def ip_batch(netns: str, lines: Sequence[str]) -> float:
    """Run `ip -n NETNS -batch -` with these commands; returns the wall time in seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(lines) + "\n",
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip -batch in {netns} failed: {proc.stderr.strip()[:500]}")
    return time.perf_counter() - t0


def make_veths(netns: str, count: int, prefix: str = "bv") -> list[str]:
    """`count` veth pairs inside `netns`, all up; returns the names of the first ends ({prefix}{i})."""
    names = [f"{prefix}{i}" for i in range(count)]
    lines = [f"link add {n} type veth peer name {n}p" for n in names]
    lines += [f"link set {n} up" for n in names] + [f"link set {n}p up" for n in names]
    ip_batch(netns, lines)
    return names


@contextlib.contextmanager
def in_netns(netns: str) -> Iterator[None]:
    """Run the block on the CURRENT thread inside `netns`, then come back (for our own threads only)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(target, CLONE_NEWNET)
        try:
            yield
        finally:
            setns(home, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(home)


# --- plain threads --------------------------------------------------------------------------------------
@dataclass
class ThreadRun:
    cycles: int
    seconds: float
    errors: list[BaseException] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.cycles / self.seconds if self.seconds > 0 else 0.0


def run_threads(netns: str, n_threads: int, duration: float, worker_setup: Callable[[int], Callable[[], None]],
                ) -> ThreadRun:
    """`n_threads` plain threads, each inside `netns`, each calling its own cycle function (made by
    worker_setup(i) inside the namespace) in a loop until `duration` has passed; counts completed cycles.

    The clock runs from the moment all threads are ready until the last one has finished its last cycle.
    """
    counts = [0] * n_threads
    errors: list[BaseException] = []
    ready = threading.Barrier(n_threads + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        with in_netns(netns):
            try:
                cycle = worker_setup(i)
            except BaseException as exc:
                errors.append(exc)
                ready.abort()
                return
            try:
                ready.wait()
            except threading.BrokenBarrierError:
                return
            try:
                while time.perf_counter() < deadline[0]:
                    cycle()
                    counts[i] += 1
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n_threads)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + duration + 3600  # set properly once everyone is ready
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    deadline[0] = t0 + duration
    for t in threads:
        t.join()
    run = ThreadRun(sum(counts), time.perf_counter() - t0, errors)
    if errors:
        raise RuntimeError(f"{len(errors)} thread(s) failed; first: {errors[0]!r}") from errors[0]
    return run


# --- the trio loop-lag probe ----------------------------------------------------------------------------
class LagProbe(trio.abc.Instrument):
    """Two measures of how long the trio thread was unavailable, taken during one run:

    - ticker lag: a task sleeps `interval` in a loop and records how late each wake-up was. This is the
      latency another task of the application would see: it includes waiting for every other runnable
      task (with 64 busy lifecycles, a whole round of them), garbage-collector pauses, and the time the
      OS ran other threads on the CPU;
    - longest step: a trio Instrument times every task step (the code between two checkpoints, which
      nothing else can interrupt on the trio thread): how long one piece of code held the thread, i.e.
      blocked it. Two things that are not the code's are taken out and recorded apart:
      garbage-collector pauses inside a step ("gc max ms": a collection stops every thread and scans the
      whole process's heap, so its length is the process's), and steps during which the OS preempted
      the trio thread (an involuntary context switch, from getrusage(RUSAGE_THREAD): the CPU went to
      another thread or to the kernel's own work; these steps are counted apart).
    """

    def __init__(self, interval: float = 0.001, bound_ms: float = 5.0) -> None:
        self.interval = interval
        self.bound = bound_ms / 1000
        self.samples: list[float] = []
        self.gc_pauses: list[float] = []
        self.step_max = 0.0  # wall time, GC taken out, steps the OS did not preempt
        self.step_max_task = ""
        self.preempted_over_bound = 0  # steps preempted by the OS that lasted longer than the bound
        self.preempted_max = 0.0
        self._gc_start = 0.0
        self._step_start = 0.0
        self._step_gc = 0.0
        self._step_rusage = resource.getrusage(resource.RUSAGE_THREAD)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_start
            self.gc_pauses.append(pause)
            self._step_gc += pause

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._step_rusage = resource.getrusage(resource.RUSAGE_THREAD)
        self._step_gc = 0.0
        self._step_start = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        step = time.perf_counter() - self._step_start - self._step_gc
        if resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw != self._step_rusage.ru_nivcsw:
            self.preempted_max = max(self.preempted_max, step)
            self.preempted_over_bound += step > self.bound
        elif step > self.step_max:
            self.step_max = step
            self.step_max_task = task.name

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        gc.callbacks.append(self._on_gc)
        self.before_task_step(trio.lowlevel.current_task())  # this very step ends first: start timing it
        trio.lowlevel.add_instrument(self)
        task_status.started()
        try:
            while True:
                t0 = time.perf_counter()
                await trio.sleep(self.interval)
                self.samples.append(max(0.0, time.perf_counter() - t0 - self.interval))
        finally:
            trio.lowlevel.remove_instrument(self)
            gc.callbacks.remove(self._on_gc)

    @property
    def gc_max_ms(self) -> float:
        return max(self.gc_pauses, default=0.0) * 1000

    @property
    def step_max_ms(self) -> float:
        return self.step_max * 1000

    @property
    def max_ms(self) -> float:
        return max(self.samples, default=0.0) * 1000

    @property
    def p99_ms(self) -> float:
        if not self.samples:
            return 0.0
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(len(s) * 0.99))] * 1000

    def summary(self) -> str:
        return (f"longest step {self.step_max_ms:.2f} ms ({self.step_max_task}; {self.preempted_over_bound} "
                f"preempted steps over {self.bound * 1000:g} ms), ticker lag max {self.max_ms:.2f} ms "
                f"(p99 {self.p99_ms:.2f}), worst GC pause {self.gc_max_ms:.1f} ms")


# --- output ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    concurrency: str
    cycles: int | str
    seconds: float | None
    rate: float | None
    ratios: dict[str, float | None] = field(default_factory=dict)
    step_max_ms: float | None = None
    lag_max_ms: float | None = None
    lag_p99_ms: float | None = None
    gc_max_ms: float | None = None
    note: str = ""

    @classmethod
    def measured(cls, name: str, concurrency: str, cycles: int, seconds: float, lag: LagProbe,
                 note: str = "") -> Row:
        return cls(name, concurrency, cycles, seconds, cycles / seconds, step_max_ms=lag.step_max_ms,
                   lag_max_ms=lag.max_ms, lag_p99_ms=lag.p99_ms, gc_max_ms=lag.gc_max_ms, note=note)


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(title: str, rows: Sequence[Row], ratio_names: Sequence[str]) -> None:
    headers = ["run", "conc", "cycles", "secs", "cycles/s", *[f"x {r}" for r in ratio_names],
               "step max ms", "lag max ms", "lag p99 ms", "gc max ms", "note"]
    body = [
        [r.name, r.concurrency, str(r.cycles), _fmt(r.seconds, ".2f"), _fmt(r.rate, ".1f"),
         *[_fmt(r.ratios.get(n), ".2f") for n in ratio_names], _fmt(r.step_max_ms, ".2f"), _fmt(r.lag_max_ms, ".2f"),
         _fmt(r.lag_p99_ms, ".2f"), _fmt(r.gc_max_ms, ".1f"), r.note]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))
    sys.stdout.flush()


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def print_lag_verdicts(probes: dict[str, LagProbe], bound_ms: float = 5.0) -> None:
    """The loop-latency target, read two ways (see LagProbe), with the runs each worst figure came from."""
    step_run, step = max(probes.items(), key=lambda kv: kv[1].step_max)
    lag_run, lag = max(probes.items(), key=lambda kv: kv[1].max_ms)
    gc_run, gcp = max(probes.items(), key=lambda kv: kv[1].gc_max_ms)
    preempted = sum(p.preempted_over_bound for p in probes.values())
    print(f"target: the trio thread never blocked > {bound_ms:g} ms: longest task step {step.step_max_ms:.2f} ms "
          f"({step.step_max_task}, run {step_run}) -> {verdict(step.step_max_ms <= bound_ms)}")
    print(f"        taken out of that and shown apart: garbage-collector pauses, worst {gcp.gc_max_ms:.1f} ms (run "
          f"{gc_run}); {preempted} steps over {bound_ms:g} ms during which the OS preempted the trio thread "
          f"(longest {max(p.preempted_max for p in probes.values()) * 1000:.1f} ms)")
    print(f"        ticker lag (latency another task sees, queueing behind runnable tasks included): worst "
          f"{lag.max_ms:.2f} ms (run {lag_run}, p99 {lag.p99_ms:.2f}) -> {verdict(lag.max_ms <= bound_ms)}")


async def open_attachment_cycles(session: asynctc.Session, devs: Sequence[str], concurrency: int, duration: float,
                                 program: asynctc.Program, *, freeze: bool = False,
                                 probe: bool = True) -> tuple[int, float, LagProbe]:
    """`concurrency` lifecycles on `session`, each looping open_attachment (attach, then detach on exit) on
    its own device of `devs` for `duration` seconds, after one warm-up cycle (which starts the session's
    event watcher and threads); the cycles done, the seconds taken, and the trio loop's lag meanwhile.
    `probe=False`: no LagProbe runs (the LagProbe returned is empty): its instrument times every task step
    with two getrusage() calls, which slows a fast loop measurably, so rates are best taken without it.
    `freeze`: gc.freeze() after the warm-up, as a latency-minded application does once it has started
    (the objects alive then are never scanned again by a full collection), gc.unfreeze() afterwards."""
    lag = LagProbe()
    counts = [0] * concurrency
    async with session.open_attachment(devs[0], "ingress", program):
        pass
    await trio.sleep(0.2)
    if freeze:
        gc.collect()
        gc.freeze()

    async def lifecycle(i: int, deadline: float) -> None:
        dev = devs[i]
        while time.perf_counter() < deadline:
            async with session.open_attachment(dev, "ingress", program):
                pass
            counts[i] += 1

    async with trio.open_nursery() as outer:
        if probe:
            await outer.start(lag.run)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(lifecycle, i, t0 + duration)
        elapsed = time.perf_counter() - t0
        outer.cancel_scope.cancel()
    if freeze:
        gc.unfreeze()
    return sum(counts), elapsed, lag
