"""tcx attach+detach cycles per second when the kernel is fast: asynctc against raw threads, with and without
expedited RCU grace periods, in one run.

    python benchmarks/bench_tcx_rcu.py [--quick] [--duration SECONDS] [--rounds N]

With the kernel's default settings every tcx attach and detach waits for an RCU grace period under rtnl
(~40 cycles/s whatever the concurrency), which hides asynctc's own cost. /sys/kernel/rcu_expedited=1 makes
those waits short, and then asynctc's own cost is most of what there is. This script sets it for the
expedited half of the run and ALWAYS puts the original value back (on success, failure, Ctrl-C or SIGTERM).

Each configuration (rcu_expedited 1 and 0, 8 and 64 concurrent lifecycles, one veth device each) is
measured in `--rounds` alternating rounds of every contender, so that whatever else the machine does
weighs on all of them alike; rates are total cycles over total time. Contenders:
  raw C        N POSIX threads looping BPF_LINK_CREATE + close() (benchmarks/raw_tcx_cycles.c, compiled
               with cc at start; skipped, saying so, without a C compiler): the anchor of the targets;
  raw Python   the same loop in N Python threads through asynctc.lowlevel.bpf (ctypes): what any Python
               code pays for the GIL and ctypes before doing anything else;
  hand-off     N trio tasks, no session: each cycle hands BPF_LINK_CREATE, then close(), to a SyscallThreads
               (asynctc.lowlevel.syscalls, as the bpf_link backend makes them): two round trips between the
               trio thread and the syscall threads per cycle, as an open_attachment cycle makes, and nothing
               else: what that hand-off costs by itself on this machine;
  asynctc      N tasks looping `session.open_attachment(dev, "ingress", program)` on the bpf_link backend;
  core only    the same asynctc loop on a backend that is bpf_link with resolve_device, attach and detach
               making no kernel call at all (a checkpoint each): the ceiling that asynctc's core (session,
               attachment records, locks, shields, event notification) and trio set by themselves.
Rates are measured without instruments; the longest trio task step is taken from one more asynctc run per
round with the LagProbe (its instrument times every step with two getrusage() calls, which would slow
the rate measured).
Targets: asynctc >= 0.5x raw C at rcu_expedited=1, >= 0.9x at the default, no trio task step over 5 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

import trio

import asynctc
from asynctc import AttachmentInfo
from asynctc.backend import AttachRequest, BackendAttachment, atomic
from asynctc.lowlevel import bpf
from asynctc.lowlevel.kernel import LINUX
from asynctc.lowlevel.netns import NetnsRunner, netns_path
from asynctc.lowlevel.syscalls import DEFAULT_MAX_THREADS, SyscallThreads
from asynctc_bpf_link import BpfLinkBackend, LinkAttachment

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    LagProbe,
    bench_netns,
    machine_line,
    make_veths,
    open_attachment_cycles,
    print_lag_verdicts,
    run_threads,
    verdict,
)
from bench_bpf_link import raw_cycle_factory

RCU_PATH = "/sys/kernel/rcu_expedited"
CONCURRENCY = (8, 64)
N_DEVICES = 64
C_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "raw_tcx_cycles.c")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run (~40 s)")
    p.add_argument("--duration", type=float, default=None, help="seconds per round and contender (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per configuration (default 3)")
    args = p.parse_args()
    if args.duration is None:
        args.duration = 0.5 if args.quick else 2.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    return args


# --- rcu_expedited, always restored ---------------------------------------------------------------------
def read_rcu() -> str:
    with open(RCU_PATH) as f:
        return f.read().strip()


def write_rcu(value: str) -> None:
    with open(RCU_PATH, "w") as f:
        f.write(value)


@contextmanager
def rcu_restored() -> Iterator[str]:
    """Yields the original value of rcu_expedited and writes it back however the block ends: SIGTERM and
    SIGINT are turned into KeyboardInterrupt for the block, and the restore itself cannot be interrupted."""
    original = read_rcu()

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield original
    finally:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the restore
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            write_rcu(original)
            print(f"rcu_expedited restored to {read_rcu()}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)


# --- contenders -----------------------------------------------------------------------------------------
def compile_raw(workdir: str) -> str | None:
    """The raw C anchor, compiled into workdir; None (and why, printed) without a compiler."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        print("raw C: skipped, no C compiler (cc) on this machine; the raw Python threads are the anchor")
        return None
    exe = os.path.join(workdir, "raw_tcx_cycles")
    proc = subprocess.run([cc, "-O2", "-pthread", "-o", exe, C_SOURCE], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"raw C: skipped, compiling {C_SOURCE} failed: {proc.stderr.strip()[:300]}")
        return None
    return exe


def run_raw_c(exe: str, netns: str, devs: list[str], duration: float) -> tuple[int, float]:
    proc = subprocess.run([exe, netns_path(netns), str(duration), *devs], capture_output=True, text=True,
                          timeout=duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"raw C anchor failed: {proc.stderr.strip()[:300]}")
    cycles, seconds = proc.stdout.split()
    return int(cycles), float(seconds)


class CoreOnlyBackend(BpfLinkBackend):
    """bpf_link without its kernel calls on the lifecycle path: what the core and trio cost alone."""

    name = "bench_core_only"

    async def resolve_device(self, dev: str | int) -> tuple[int, str]:
        await trio.lowlevel.checkpoint()
        return (dev, f"if{dev}") if isinstance(dev, int) else (1 + int(dev.lstrip("bv") or 0), dev)

    @atomic  # its one checkpoint cannot be cancelled, as bpf_link's one kernel call
    async def attach(self, request: AttachRequest) -> LinkAttachment:
        await trio.lowlevel.cancel_shielded_checkpoint()
        return LinkAttachment(-1, AttachmentInfo(
            backend=self.name, netns=self.ctx.netns, dev=request.dev, ifindex=request.ifindex,
            direction=request.direction, prog_id=request.program.id, link_id=1, handle=None, priority=None,
            offloaded=False, pinned=None))

    async def detach(self, att: BackendAttachment) -> bool:
        assert isinstance(att, LinkAttachment)
        att.take_fd()
        await trio.lowlevel.checkpoint()
        return True


class CoreOnlyPlugin:
    @asynctc.hookimpl
    def asynctc_register_backends(self, registry: asynctc.BackendRegistry) -> None:
        registry.add(CoreOnlyBackend)


async def asynctc_run(netns: str, devs: list[str], concurrency: int, duration: float, program: asynctc.Program,
                      backend: str = "bpf_link", probe: bool = False) -> tuple[int, float, LagProbe]:
    """`concurrency` lifecycles, each looping open_attachment (attach, then detach on exit) on its own device
    (as bench_bpf_link.py, with the session's default max_workers); `probe`: with the LagProbe."""
    plugins = [CoreOnlyPlugin()] if backend == CoreOnlyBackend.name else None
    async with asynctc.open_session(backend, netns=netns, plugins=plugins) as session:
        return await open_attachment_cycles(session, devs, concurrency, duration, program, probe=probe)


async def handoff_run(netns: str, devs: list[str], concurrency: int, duration: float,
                      program: asynctc.Program) -> tuple[int, float]:
    """`concurrency` trio tasks, each looping a tcx link create and a close() on its own device through one
    SyscallThreads with the session's default limits: the hand-off alone, no asynctc core."""
    runner = NetnsRunner(netns, trio.CapacityLimiter(DEFAULT_MAX_THREADS))
    threads = SyscallThreads(runner, max_threads=DEFAULT_MAX_THREADS, name="bench")
    k = LINUX
    try:
        ifindexes = [await threads.run(k.if_nametoindex, dev) for dev in devs[:concurrency]]
        counts = [0] * concurrency

        async def lifecycle(i: int, deadline: float) -> None:
            ifindex = ifindexes[i]
            while time.perf_counter() < deadline:
                fd = await threads.run(k.bpf.link_create_tcx, program.fd, ifindex, bpf.BPF_TCX_INGRESS)
                await threads.run(k.bpf.close, fd, must_run=True)
                counts[i] += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(lifecycle, i, t0 + duration)
        return sum(counts), time.perf_counter() - t0
    finally:
        await threads.aclose()
        runner.close()


@dataclass
class Tally:
    cycles: int = 0
    seconds: float = 0.0
    lags: list[LagProbe] = field(default_factory=list)

    def add(self, cycles: int, seconds: float) -> None:
        self.cycles += cycles
        self.seconds += seconds

    @property
    def rate(self) -> float:
        return self.cycles / self.seconds if self.seconds else 0.0

    @property
    def step_max_ms(self) -> float:
        return max((lag.step_max_ms for lag in self.lags), default=0.0)


def measure(netns: str, devs: list[str], n: int, duration: float, rounds: int, raw_c: str | None,
            program: asynctc.Program) -> dict[str, Tally]:
    tallies = {"raw C": Tally(), "raw Python": Tally(), "hand-off": Tally(), "asynctc": Tally(),
               "core only": Tally()}
    for _ in range(rounds):
        if raw_c is not None:
            tallies["raw C"].add(*run_raw_c(raw_c, netns, devs[:n], duration))
        py = run_threads(netns, n, duration, raw_cycle_factory(program.fd, devs))
        tallies["raw Python"].add(py.cycles, py.seconds)
        tallies["hand-off"].add(*trio.run(handoff_run, netns, devs, n, duration, program))
        cycles, seconds, _ = trio.run(asynctc_run, netns, devs, n, duration, program)
        tallies["asynctc"].add(cycles, seconds)
        # The task steps are timed in a run of their own: the probe's instrument slows every step.
        tallies["asynctc"].lags.append(trio.run(asynctc_run, netns, devs, n, duration, program, "bpf_link", True)[2])
        cycles, seconds, _ = trio.run(asynctc_run, netns, devs, n, duration, program, CoreOnlyBackend.name)
        tallies["core only"].add(cycles, seconds)
    return tallies


# --- main -----------------------------------------------------------------------------------------------
def main() -> int:
    args = parse()
    if not os.path.exists(RCU_PATH):
        print(f"{RCU_PATH} does not exist on this kernel: nothing to compare")
        return 1
    print(f"bench_tcx_rcu: {machine_line()}")
    print(f"{N_DEVICES} veth devices, {args.rounds} alternating round(s) of {args.duration:g} s per contender "
          "and configuration, tcx ingress, a 2-instruction program")
    results: dict[tuple[str, int], dict[str, Tally]] = {}
    program = asynctc.programs.constant("pass", name="bench_pass")
    try:
        with tempfile.TemporaryDirectory(prefix="atc-bench-") as workdir, rcu_restored() as original, \
                bench_netns("atcrc") as ns:
            raw_c = compile_raw(workdir)
            devs = make_veths(ns, N_DEVICES)
            print(f"namespace {ns}: {len(devs)} veth pairs ready; rcu_expedited was {original}")
            for rcu in ("1", "0"):
                write_rcu(rcu)
                for n in CONCURRENCY:
                    t0 = time.perf_counter()
                    tallies = measure(ns, devs, n, args.duration, args.rounds, raw_c, program)
                    results[(rcu, n)] = tallies
                    parts = ", ".join(f"{name} {t.rate:.0f}/s" for name, t in tallies.items() if t.seconds)
                    print(f"  rcu_expedited={rcu} x{n}: {parts} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        program.close()

    anchor = "raw C" if any(r["raw C"].seconds for r in results.values()) else "raw Python"
    print(f"\ntcx attach+detach cycles per second (higher is better); ratios against {anchor} and raw Python, "
          "same run")
    header = ["rcu_expedited", "conc", "raw C/s", "raw Python/s", "hand-off/s", f"hand-off x {anchor}",
              "asynctc/s", f"x {anchor}", "x raw Python", "core only/s", f"core only x {anchor}", "step max ms"]
    rows = []
    for (rcu, n), t in results.items():
        rows.append([rcu, str(n), f"{t['raw C'].rate:.0f}" if t["raw C"].seconds else "-",
                     f"{t['raw Python'].rate:.0f}", f"{t['hand-off'].rate:.0f}",
                     f"{t['hand-off'].rate / t[anchor].rate:.2f}", f"{t['asynctc'].rate:.0f}",
                     f"{t['asynctc'].rate / t[anchor].rate:.2f}", f"{t['asynctc'].rate / t['raw Python'].rate:.2f}",
                     f"{t['core only'].rate:.0f}", f"{t['core only'].rate / t[anchor].rate:.2f}",
                     f"{t['asynctc'].step_max_ms:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print()
    for (rcu, n), t in results.items():
        need = 0.5 if rcu == "1" else 0.9
        ratio = t["asynctc"].rate / t[anchor].rate
        print(f"target: rcu_expedited={rcu}, {n} lifecycles: asynctc >= {need}x {anchor}: {ratio:.2f}x -> "
              f"{verdict(ratio >= need)}")
    probes = {f"rcu={rcu} x{n} round {i + 1}": lag for (rcu, n), t in results.items()
              for i, lag in enumerate(t["asynctc"].lags)}
    print_lag_verdicts(probes)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything created was removed and rcu_expedited restored", file=sys.stderr)
        sys.exit(130)
