"""cls_bpf attach+detach cycles per second: asynctc's netlink backend against pyroute2 and the tc command.

    python benchmarks/bench_netlink.py [--quick] [--duration SECONDS]

Each lifecycle loops attach -> detach on its own veth device (64 devices in a private namespace, no qdisc
on them beforehand) for a fixed duration. On a device without a clsact qdisc, one asynctc cycle is, on
the wire: clsact add, cls_bpf filter add (direct action, program by fd), filter delete, clsact delete
(the session created the qdisc and nothing else is on it, so it removes it). The anchors do the same four
kernel operations per cycle, measured in the same run:
  pyroute2     its synchronous IPRoute (in a plain thread that entered the namespace), sequentially:
               tc("add", "clsact"), tc("add-filter", "bpf", fd=...), tc("del-filter"), tc("del", "clsact");
  tc command   four `tc -n NS ...` processes per cycle; tc cannot take an fd, so the program is pinned in a
               private bpffs and added with `bpf da pinned PATH`.
A ticker task measures the trio loop lag during every asynctc run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable

import trio

import asynctc
from asynctc.lowlevel import bpf
from asynctc.testing import bpffs_mount

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
INGRESS_PARENT = 0xFFFFFFF2


def pyroute2_factory(prog_fd: int, devs: list[str]) -> Callable[[int], Callable[[], None]]:
    """worker_setup for run_threads: thread i cycles clsact add, filter add, filter del, clsact del on devs[i]
    with its own synchronous IPRoute (created inside the namespace, so its socket is bound there)."""
    from pyroute2 import IPRoute

    def setup(i: int) -> Callable[[], None]:
        ipr = IPRoute()
        ifindex = socket.if_nametoindex(devs[i])

        def cycle() -> None:
            ipr.tc("add", "clsact", ifindex)
            ipr.tc("add-filter", "bpf", ifindex, ":1", fd=prog_fd, name="p2bench", parent=INGRESS_PARENT,
                   classid=1, direct_action=True, prio=1)
            ipr.tc("del-filter", "bpf", ifindex, ":1", parent=INGRESS_PARENT, prio=1)
            ipr.tc("del", "clsact", ifindex)

        return cycle

    return setup


def tc_factory(netns: str, pinned: str, devs: list[str]) -> Callable[[int], Callable[[], None]]:
    def setup(i: int) -> Callable[[], None]:
        dev = devs[i]
        cmds = [
            ["tc", "-n", netns, "qdisc", "add", "dev", dev, "clsact"],
            ["tc", "-n", netns, "filter", "add", "dev", dev, "ingress", "prio", "1", "handle", "1", "bpf", "da",
             "pinned", pinned],
            ["tc", "-n", netns, "filter", "del", "dev", dev, "ingress", "prio", "1"],
            ["tc", "-n", netns, "qdisc", "del", "dev", dev, "clsact"],
        ]

        def cycle() -> None:
            for cmd in cmds:
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")

        return cycle

    return setup


async def asynctc_run(netns: str, devs: list[str], concurrency: int, duration: float,
                      program: asynctc.Program, freeze: bool = False) -> tuple[int, float, LagProbe]:
    """`concurrency` lifecycles, each looping open_attachment (attach, then detach on exit) on its own device
    (`freeze`: see open_attachment_cycles)."""
    async with asynctc.open_session("netlink", netns=netns, max_workers=max(8, concurrency)) as session:
        return await open_attachment_cycles(session, devs, concurrency, duration, program, freeze=freeze)


def check_clean(netns: str, devs: list[str]) -> None:
    """Every device must be back to no clsact qdisc and no filter (the cycles left nothing behind)."""
    out = subprocess.run(["tc", "-n", netns, "qdisc", "show"], capture_output=True, text=True).stdout
    left = [line for line in out.splitlines() if "clsact" in line]
    if left:
        raise RuntimeError(f"clsact qdiscs left behind: {left[:3]}")


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], default_duration=6.0, quick_duration=1.0)
    duration: float = args.duration
    print(f"bench_netlink: {machine_line()}")
    print(f"{N_DEVICES} veth devices, {duration:g} s per configuration, clsact + cls_bpf ingress, direct action")
    rows: list[Row] = []
    program = asynctc.programs.constant("pass", name="bench_pass")
    try:
        with bench_netns("atcnl") as ns, bpffs_mount() as fs:
            devs = make_veths(ns, N_DEVICES)
            pinned = f"{fs}/bench_pass"
            bpf.obj_pin(program.fd, pinned)
            print(f"namespace {ns}: {len(devs)} veth pairs ready; program pinned at {pinned} for tc")

            p2 = run_threads(ns, 1, duration, pyroute2_factory(program.fd, devs))
            rows.append(Row("pyroute2 IPRoute, sequential", "1", p2.cycles, p2.seconds, p2.rate))
            print(f"  pyroute2 sequential: {p2.rate:.1f}/s")
            check_clean(ns, devs)
            tc = run_threads(ns, 1, duration, tc_factory(ns, pinned, devs))
            rows.append(Row("tc command (4 processes/cycle)", "1", tc.cycles, tc.seconds, tc.rate))
            print(f"  tc command: {tc.rate:.1f}/s")
            check_clean(ns, devs)

            results: dict[str, tuple[float, LagProbe]] = {}
            for conc, freeze in [(c, False) for c in ASYNCTC_CONCURRENCY] + [(64, True)]:
                cycles, secs, lag = trio.run(asynctc_run, ns, devs, conc, duration, program, freeze)
                label = f"{conc}, gc.freeze()" if freeze else str(conc)
                results[label] = (cycles / secs, lag)
                rows.append(Row.measured("asynctc netlink", label, cycles, secs, lag))
                print(f"  asynctc x{label}: {cycles / secs:.1f}/s, {lag.summary()}")
                check_clean(ns, devs)
    finally:
        program.close()

    for r in rows:
        if r.rate is not None:
            r.ratios = {"pyroute2": r.rate / p2.rate, "tc": r.rate / tc.rate}
    print_table("clsact + cls_bpf attach+detach cycles per second (higher is better)", rows, ["pyroute2", "tc"])
    rate64, _ = results["64"]
    r_p2, r_tc = rate64 / p2.rate, rate64 / tc.rate
    print(f"\ntarget: asynctc at 64 concurrent lifecycles >= 2x pyroute2 sequential: {r_p2:.2f}x -> "
          f"{verdict(r_p2 >= 2)}")
    print(f"target: asynctc at 64 concurrent lifecycles >= 10x the tc command: {r_tc:.2f}x -> {verdict(r_tc >= 10)}")
    print_lag_verdicts({label: lag for label, (_, lag) in results.items()})
    return 0


if __name__ == "__main__":
    run_script(main)
