"""Events per second decoded and delivered by session.open_monitor() during an interface storm, against the
rate the kernel produces them, in one run.

    python benchmarks/bench_events.py [--quick]

The storm (one `ip -n NS -batch` process): N interface creations (N/2 veth pairs: two interfaces each), then
their N deletions, then a few survivor pairs that stay (so the final-state check is not an empty set).
The kernel's own rate is counted by a raw NETLINK_ROUTE socket subscribed to RTNLGRP_LINK with a 64 MiB
buffer, read in a tight loop in a separate process during the same storm, which that process also runs (a thread of
this process would compete with the trio thread for the GIL, and a fork of it stalls its threads: either
would show up as asynctc's loop lag): every RTM_NEWLINK/RTM_DELLINK
message the kernel multicasts. asynctc turns those messages into DeviceAdded / DeviceRemoved events (a
RTM_NEWLINK that only changes flags is not a new device, so it delivers fewer events than messages).

Two runs: the default event buffer (the target: no loss, no resync) and a forced tiny one
(backend_options={"event_rcvbuf": 4096}: the kernel drops messages, the monitor must resync and end with
the kernel's exact set of devices).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

import asynctc
from asynctc.events import DeviceAdded, DeviceRemoved, EventsDropped, Resynced

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    LagProbe,
    bench_netns,
    in_netns,
    machine_line,
    print_lag_verdicts,
    run_script,
    verdict,
)

RTNLGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
SO_RCVBUFFORCE = 33
QUIET = 1.0  # seconds without a message that end a run once the storm process has exited
SURVIVOR_PAIRS = 25
STORM_GROUP = 7


class EventLike(Protocol):
    def is_set(self) -> bool: ...
    def set(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class QueueLike(Protocol):
    def put(self, obj: Any) -> None: ...


@dataclass
class KernelCount:
    messages: int = 0
    first: float = 0.0
    last: float = 0.0
    lost: bool = False

    @property
    def rate(self) -> float:
        return self.messages / (self.last - self.first) if self.last > self.first else 0.0


def storm_helper(netns: str, batch: str, ready: EventLike, go: EventLike, storm_done: EventLike,
                 results: QueueLike) -> None:
    """The helper process: counts every RTM_NEWLINK/RTM_DELLINK the kernel multicasts in `netns` (tight
    loop; perf_counter is CLOCK_MONOTONIC, comparable across processes) and, once `go` is set, runs the
    storm (`ip -batch`) from a thread of its own, so that the benchmark process never forks during a run.
    Puts (KernelCount, storm seconds, storm error or "") in `results`."""
    out = KernelCount()
    stop = threading.Event()
    storm: list[tuple[float, str]] = []

    def run_storm() -> None:
        go.wait()
        t0 = time.perf_counter()
        proc = subprocess.run(["ip", "-n", netns, "-batch", batch], capture_output=True, check=False)
        storm.append((time.perf_counter() - t0, proc.stderr.decode()[:300] if proc.returncode else ""))
        stop.set()
        storm_done.set()

    thread = threading.Thread(target=run_storm, daemon=True)
    thread.start()
    try:
        _count(netns, ready, stop, out)
    finally:
        thread.join(120)
        secs, error = storm[0] if storm else (0.0, "the storm did not run")
        results.put((out, secs, error))


def _count(netns: str, ready: EventLike, stop: EventLike, out: KernelCount) -> None:
    with in_netns(netns):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        s.bind((0, 1 << (RTNLGRP_LINK - 1)))
        s.settimeout(0.1)
        ready.set()
        buf = bytearray(1 << 20)
        while True:
            try:
                n = s.recv_into(buf)
            except TimeoutError:
                if stop.is_set() and time.perf_counter() - max(out.last, out.first) > QUIET:
                    return
                continue
            except OSError as exc:  # ENOBUFS: even this reader fell behind
                out.lost = True
                if stop.is_set():
                    return
                del exc
                continue
            now = time.perf_counter()
            off = 0
            while off + 16 <= n:
                length, mtype = struct.unpack_from("=IH", buf, off)
                if length < 16:
                    break
                if mtype in (RTM_NEWLINK, RTM_DELLINK):
                    if out.messages == 0:
                        out.first = now
                    out.messages += 1
                    out.last = now
                off += (length + 3) & ~3
    finally:
        s.close()


def storm_lines(pairs: int) -> tuple[list[str], set[str]]:
    names = [f"st{i}" for i in range(pairs)]
    survivors = [f"sv{i}" for i in range(SURVIVOR_PAIRS)]
    # The creations are paced by the kernel (an RCU grace period per device); the deletion is one
    # `link del group` (one batch in the kernel): a burst of RTM_DELLINK messages, the hard part for a reader.
    lines = [f"link add {n} group {STORM_GROUP} type veth peer name {n}p" for n in names]
    lines += [f"link del group {STORM_GROUP}"]
    lines += [f"link add {n} type veth peer name {n}p" for n in survivors]
    return lines, {x for n in survivors for x in (n, f"{n}p")}


def kernel_devices(netns: str) -> dict[int, str]:
    out = subprocess.run(["ip", "-n", netns, "-j", "link", "show"], capture_output=True, text=True, check=True)
    return {d["ifindex"]: d["ifname"] for d in json.loads(out.stdout)}


@dataclass
class MonitorRun:
    label: str
    storm_secs: float = 0.0
    kernel: KernelCount = field(default_factory=KernelCount)
    events: int = 0
    added: int = 0
    removed: int = 0
    resynced: int = 0
    dropped: int = 0
    first: float = 0.0
    last: float = 0.0
    state_ok: bool = False
    state_note: str = ""
    lag: LagProbe = field(default_factory=LagProbe)

    @property
    def rate(self) -> float:
        return self.events / (self.last - self.first) if self.last > self.first else 0.0


async def monitor_run(netns: str, label: str, pairs: int, rcvbuf: int | None) -> MonitorRun:
    run = MonitorRun(label)
    lines, survivors = storm_lines(pairs)
    model = kernel_devices(netns)  # what exists before the storm (the monitor reports only changes)
    options = {} if rcvbuf is None else {"event_rcvbuf": rcvbuf}
    mp = multiprocessing.get_context("spawn")  # no fork of a process running trio and threads
    ready, go, storm_done, results = mp.Event(), mp.Event(), mp.Event(), mp.Queue()
    with tempfile.NamedTemporaryFile("w", prefix="asynctc-storm-", suffix=".batch") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        helper = mp.Process(target=storm_helper, args=(netns, f.name, ready, go, storm_done, results), daemon=True)
        helper.start()
        if not await trio.to_thread.run_sync(ready.wait, 30):
            raise RuntimeError("the storm helper process did not start")
        async with asynctc.open_session("bpf_link", netns=netns, backend_options=options) as session, \
                session.open_monitor(buffer=1 << 16) as monitor, trio.open_nursery() as nursery:
            await nursery.start(run.lag.run)
            go.set()
            while True:
                timeout = QUIET if storm_done.is_set() else 30.0
                with trio.move_on_after(timeout):
                    ev = await monitor.receive()
                    now = time.perf_counter()
                    if run.events == 0:
                        run.first = now
                    run.events += 1
                    run.last = now
                    if isinstance(ev, DeviceAdded):
                        run.added += 1
                        model[ev.ifindex] = ev.name
                    elif isinstance(ev, DeviceRemoved):
                        run.removed += 1
                        model.pop(ev.ifindex, None)
                    elif isinstance(ev, Resynced):
                        run.resynced += 1
                    elif isinstance(ev, EventsDropped):
                        run.dropped += ev.count
                    continue
                if storm_done.is_set():
                    break
                raise RuntimeError("no event for 30 s during the storm")
            nursery.cancel_scope.cancel()
        run.kernel, run.storm_secs, error = await trio.to_thread.run_sync(results.get, True, 120)
        await trio.to_thread.run_sync(helper.join, 10)
    if error:
        raise RuntimeError(f"storm failed: {error}")
    kernel = kernel_devices(netns)
    run.state_ok = model == kernel and survivors <= set(kernel.values())
    missing = sorted(set(kernel.values()) - set(model.values()))
    extra = sorted(set(model.values()) - set(kernel.values()))
    run.state_note = "exact" if run.state_ok else f"missing {missing[:5]} extra {extra[:5]}"
    # remove the survivors (by name) so the next run starts from the same state
    cleanup = [f"link del {n}" for n in sorted(survivors) if not n.endswith("p")]
    await trio.to_thread.run_sync(lambda: subprocess.run(
        ["ip", "-n", netns, "-batch", "-"], input="\n".join(cleanup) + "\n", capture_output=True, text=True))
    return run


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run (200 interfaces)")
    args = p.parse_args()
    interfaces = 200 if args.quick else 1000
    pairs = interfaces // 2
    print(f"bench_events: {machine_line()}")
    print(f"storm: {interfaces} interface creations ({pairs} veth pairs), their {interfaces} deletions in one "
          f"`link del group`, then {2 * SURVIVOR_PAIRS} survivors; one `ip -batch` process")
    runs: list[MonitorRun] = []
    with bench_netns("atcev") as ns:
        for label, rcvbuf in (("default buffer", None), ("event_rcvbuf=4096", 4096)):
            r = trio.run(monitor_run, ns, label, pairs, rcvbuf)
            runs.append(r)
            print(f"  {label}: kernel {r.kernel.messages} msgs at {r.kernel.rate:.0f}/s, asynctc {r.events} events "
                  f"at {r.rate:.0f}/s, resyncs {r.resynced}, final state {r.state_note}")

    headers = ["run", "storm s", "kernel msgs", "kernel msgs/s", "events", "events/s", "x kernel rate",
               "added", "removed", "resynced", "dropped", "tail ms", "final state", "step max ms", "lag max ms",
               "lag p99 ms", "gc max ms"]
    body = []
    for r in runs:
        tail = (r.last - r.kernel.last) * 1000 if r.kernel.last else 0.0
        body.append([r.label, f"{r.storm_secs:.2f}", str(r.kernel.messages), f"{r.kernel.rate:.0f}",
                     str(r.events), f"{r.rate:.0f}", f"{r.rate / r.kernel.rate:.2f}" if r.kernel.rate else "-",
                     str(r.added), str(r.removed), str(r.resynced), str(r.dropped), f"{tail:.1f}", r.state_note,
                     f"{r.lag.step_max_ms:.2f}", f"{r.lag.max_ms:.2f}", f"{r.lag.p99_ms:.2f}",
                     f"{r.lag.gc_max_ms:.1f}"])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    print("\nnetlink link events during the storm ('tail ms': last asynctc event after the kernel's last message)")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))

    d, t = runs
    expected_added = interfaces + 2 * SURVIVOR_PAIRS
    lossless = d.resynced == 0 and d.dropped == 0 and d.added == expected_added and d.removed == interfaces
    print(f"\nkernel reference counter lost messages itself: {any(r.kernel.lost for r in runs)}")
    print(f"target: default buffer keeps up without loss or resync ({d.added}/{expected_added} added, "
          f"{d.removed}/{interfaces} removed, {d.resynced} resyncs, {d.dropped} dropped): {verdict(lossless)}")
    print(f"target: tiny buffer resyncs and ends with the kernel's exact state ({t.resynced} resyncs, "
          f"final state {t.state_note}): {verdict(t.resynced > 0 and t.state_ok)}")
    print_lag_verdicts({r.label: r.lag for r in runs})
    return 0


if __name__ == "__main__":
    run_script(main)
