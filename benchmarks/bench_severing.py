"""How fast a session marks its attachments SEVERED when their namespace or device is deleted.

    python benchmarks/bench_severing.py [--quick]

For 1, 12 and 50 attachments on each real backend: the time from starting the deletion (an `ip netns del`
or `ip link del` process) to the last attachment's `wait_severed()` returning, median and worst over
several rounds. Target: every attachment SEVERED within 100 ms of the deletion, however many. The anchor is
the deletion command itself (measured in the same round): it bounds when the kernel did the deletion.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import trio

import asynctc
from asynctc import programs
from asynctc.testing import create_netns, delete_netns, ip, unique_name

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trio.lowlevel
from _common import machine_line, parse_args, run_script, verdict

COUNTS = (1, 12, 50)
TARGET_MS = 100.0


async def one_round(backend: str, count: int, cause: str) -> tuple[float, float]:
    """(milliseconds from the start of the deletion command to the last SEVERED, milliseconds the command
    took: a process start and the kernel's work, an upper bound on when the deletion happened)."""
    name = create_netns(unique_name("atcbs"))
    try:
        devs = [f"bs{i}" for i in range((count + 1) // 2)]
        for d in devs:
            ip("link", "add", d, "type", "veth", "peer", "name", d + "p", netns=name)
        async with asynctc.open_session(backend, netns=name) as s:
            atts = [await s.attach(devs[i // 2], ("ingress", "egress")[i % 2], programs.constant("pass"))
                    for i in range(count)]
            cmd = ["ip", "netns", "del", name] if cause == "netns" else ["ip", "-n", name, "link", "del", devs[0]]
            watched = atts if cause == "netns" else [a for a in atts if a.info.dev == devs[0]]
            for a in watched:  # the event watcher runs already (it starts with the first attachment)
                assert a.state is asynctc.State.ATTACHED
            last = 0.0
            async with trio.open_nursery() as n:

                async def wait(a: asynctc.Attachment) -> None:
                    nonlocal last
                    await a.wait_severed()
                    last = max(last, time.perf_counter())

                for a in watched:
                    n.start_soon(wait, a)
                await trio.lowlevel.checkpoint()
                t0 = time.perf_counter()
                await trio.to_thread.run_sync(lambda: subprocess.run(cmd, check=True))
                t1 = time.perf_counter()
            return (last - t0) * 1000, (t1 - t0) * 1000
    finally:
        delete_netns(name)


async def main_async(rounds: int) -> int:
    print(machine_line())
    ok = True
    print(f"{'backend':9} {'cause':6} {'count':>5} {'deletion ms (med)':>18} {'start to SEVERED ms med':>24} "
          f"{'worst':>7}  target <= {TARGET_MS:.0f} ms")
    for backend in ("bpf_link", "netlink"):
        for cause in ("netns", "device"):
            for count in COUNTS:
                lat, dele = [], []
                for _ in range(rounds):
                    a, b = await one_round(backend, count, cause)
                    lat.append(a)
                    dele.append(b)
                worst = max(lat)
                good = worst <= TARGET_MS
                ok &= good
                print(f"{backend:9} {cause:6} {count:5} {statistics.median(dele):18.1f} "
                      f"{statistics.median(lat):24.1f} {worst:7.1f}  {verdict(good)}")
    return 0 if ok else 1


def main() -> int:
    args = parse_args(__doc__ or "", default_duration=5, quick_duration=2)
    return trio.run(main_async, int(args.duration))


if __name__ == "__main__":
    run_script(main)
