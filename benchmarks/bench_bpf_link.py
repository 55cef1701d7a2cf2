"""tcx attach+detach cycles per second: asynctc's bpf_link backend against raw bpf(2) loops, in one run.

    python benchmarks/bench_bpf_link.py [--quick] [--duration SECONDS]

Each lifecycle loops attach -> detach on its own veth device (64 devices in a private namespace) for a fixed
duration. Anchors, measured in the same run:
  raw-seq      one plain thread: lowlevel.bpf.link_create_tcx + os.close (close detaches), the kernel's own
               cost with no framework at all;
  raw-threads  the same loop in N plain threads (N = 8, 16, 32, 64), one device per thread; the best N is
               the target's anchor;
  pyroute2/tc  cannot create tcx links (no BPF_LINK_CREATE in either): skipped; bench_netlink.py compares
               them with asynctc on the cls_bpf path they do support.
A ticker task measures the trio loop lag during every asynctc run.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

import trio

import asynctc
from asynctc.lowlevel import bpf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    LagProbe,
    Row,
    bench_netns,
    machine_line,
    make_veths,
    open_attachment_cycles,
    parse_args,
    print_lag_verdicts,
    print_table,
    run_script,
    run_threads,
    verdict,
)

N_DEVICES = 64
ASYNCTC_CONCURRENCY = (1, 8, 64)
THREAD_COUNTS = (8, 16, 32, 64)
QUICK_THREAD_COUNTS = (8, 64)


def raw_cycle_factory(prog_fd: int, devs: list[str]) -> Callable[[int], Callable[[], None]]:
    """worker_setup for run_threads: thread i cycles tcx attach + close on devs[i]."""

    def setup(i: int) -> Callable[[], None]:
        ifindex = socket.if_nametoindex(devs[i])  # resolved inside the namespace, once

        def cycle() -> None:
            fd = bpf.link_create_tcx(prog_fd, ifindex, bpf.BPF_TCX_INGRESS)
            os.close(fd)  # closing the only fd of an unpinned link detaches it

        return cycle

    return setup


async def asynctc_run(netns: str, devs: list[str], concurrency: int, duration: float,
                      program: asynctc.Program, max_workers: int) -> tuple[int, float, LagProbe]:
    """`concurrency` lifecycles, each looping open_attachment (attach, then detach on exit) on its own device."""
    async with asynctc.open_session("bpf_link", netns=netns, max_workers=max_workers) as session:
        return await open_attachment_cycles(session, devs, concurrency, duration, program)


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], default_duration=6.0, quick_duration=1.0)
    duration: float = args.duration
    thread_counts = QUICK_THREAD_COUNTS if args.quick else THREAD_COUNTS
    print(f"bench_bpf_link: {machine_line()}")
    print(f"{N_DEVICES} veth devices, {duration:g} s per configuration, tcx ingress, a 2-instruction program")
    rows: list[Row] = []
    program = asynctc.programs.constant("pass", name="bench_pass")
    try:
        with bench_netns("atcbl") as ns:
            devs = make_veths(ns, N_DEVICES)
            print(f"namespace {ns}: {len(devs)} veth pairs ready")

            seq = run_threads(ns, 1, duration, raw_cycle_factory(program.fd, devs))
            rows.append(Row("raw-seq (link_create_tcx + close)", "1", seq.cycles, seq.seconds, seq.rate))
            print(f"  raw-seq: {seq.rate:.1f}/s")
            best_mt = 0.0
            best_n = 0
            for n in thread_counts:
                mt = run_threads(ns, n, duration, raw_cycle_factory(program.fd, devs))
                rows.append(Row("raw-threads", str(n), mt.cycles, mt.seconds, mt.rate))
                print(f"  raw-threads x{n}: {mt.rate:.1f}/s")
                if mt.rate > best_mt:
                    best_mt, best_n = mt.rate, n
            rows.append(Row("pyroute2 / tc", "-", "-", None, None,
                            note="skipped: neither can create tcx links (no BPF_LINK_CREATE); see bench_netlink"))

            results: dict[str, tuple[float, LagProbe]] = {}
            configs = [(c, max(8, c)) for c in ASYNCTC_CONCURRENCY] + [(64, 16)]
            for conc, workers in configs:
                cycles, secs, lag = trio.run(asynctc_run, ns, devs, conc, duration, program, workers)
                rate = cycles / secs
                label = f"{conc}" if workers == max(8, conc) else f"{conc} (max_workers={workers})"
                results[label] = (rate, lag)
                rows.append(Row.measured(f"asynctc bpf_link, max_workers={workers}", str(conc), cycles, secs, lag))
                print(f"  asynctc x{conc} (max_workers={workers}): {rate:.1f}/s, {lag.summary()}")
    finally:
        program.close()

    for r in rows:
        if r.rate is not None:
            r.ratios = {"raw-seq": r.rate / seq.rate, "best raw-threads": r.rate / best_mt}
    print_table("tcx attach+detach cycles per second (higher is better)", rows, ["raw-seq", "best raw-threads"])
    rate64, _ = results["64"]
    ratio = rate64 / best_mt
    print(f"\nbest raw-threads: x{best_n} at {best_mt:.1f}/s")
    print(f"target: asynctc at 64 concurrent lifecycles >= 0.9x best raw-threads: {ratio:.2f}x -> "
          f"{verdict(ratio >= 0.9)}")
    print_lag_verdicts({label: lag for label, (_, lag) in results.items()})
    print("pyroute2 / tc: no anchor for tcx (they cannot create tcx links; cls_bpf is compared in bench_netlink)")
    return 0


if __name__ == "__main__":
    run_script(main)
