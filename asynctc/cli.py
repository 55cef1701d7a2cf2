"""The `asynctc` command: `demo`, `backends`, `monitor`, `stress`.

Ctrl-C (SIGINT) and SIGTERM become a cancellation of the running job, which runs in a child task, so its
shielded cleanup always completes: nothing is left attached and every namespace the demo made is removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

import trio

import asynctc
from asynctc import events as ev

__all__ = ["main"]


def _say(out: TextIO, text: str = "") -> None:
    out.write(text + "\n")
    out.flush()


async def _run_cancellable(job: Callable[[], Awaitable[int]]) -> int:
    """Run `job` in a child task; SIGINT/SIGTERM cancel it (its cleanup still runs to completion, further
    signals are absorbed) and the exit code is 128 + the signal."""
    try:
        return await asynctc.run_until_interrupted(job)
    except asynctc.Interrupted as exc:
        return exc.exit_code


# ---------------------------------------------------------------------------------------------------------
# demo


def _real_kernel_possible() -> str | None:
    """None if the demo can use the real kernel here, else why not."""
    if sys.platform != "linux":
        return "not Linux"
    from asynctc.testing import kernel_test_skip_reason

    return kernel_test_skip_reason()


async def _demo_real(out: TextIO, backend: str, hold: bool = False) -> int:
    from asynctc import programs
    from asynctc.testing import create_netns, delete_netns, send_frames, unique_name, veth_pair

    created: list[str] = []
    try:
        with trio.CancelScope(shield=True):
            for prefix in ("atcdemo", "atcpeer"):
                created.append(await trio.to_thread.run_sync(create_netns, unique_name(prefix)))
            ns_a, ns_b = created
            pair = await trio.to_thread.run_sync(veth_pair, ns_a, "demo0", ns_b, "demo1")
        _say(out, f"created namespaces {ns_a} and {ns_b}, joined by veth demo0 <-> demo1")

        async def frames(n: int) -> None:
            await trio.to_thread.run_sync(lambda: send_frames(pair.b, n, netns=pair.netns_b))

        async with asynctc.open_session(backend, netns=ns_a, owner="asynctc-demo") as session:
            _say(out, f"backend: {session.backend_name} (real kernel)")
            counter = programs.counting("pass", name="demo_v1")
            async with session.open_attachment("demo0", "ingress", counter) as att:
                i = att.info
                ident = f"link {i.link_id}" if i.link_id else f"prio {i.priority} handle {i.handle:#x}"
                _say(out, f"attached program {i.prog_id} ({counter.name}) to demo0 ingress as {ident}")
                await frames(10)
                _say(out, f"sent 10 frames from demo1: {counter.name} counted {counter.count()}")
                hook = await session.query("demo0", "ingress")
                _say(out, f"hook demo0/ingress revision={hook.revision}:")
                for e in hook.entries:
                    _say(out, f"  {e.kind:8} prog {e.prog_id:<6} {e.prog_name:16} tag {e.prog_tag} "
                              f"owned={e.owned}")
                v2 = programs.counting("pass", name="demo_v2")
                result = await att.update(v2, expected=counter)
                _say(out, f"updated to program {v2.id} ({v2.name}) by {result.method}, "
                          f"revision {result.revision}")
                await frames(5)
                _say(out, f"sent 5 more frames: {counter.name} {counter.count()}, {v2.name} {v2.count()}")
                if hold:
                    _say(out, f"holding: {v2.name} stays attached in namespace {ns_a} until Ctrl-C "
                              f"(try: nsenter --net=/run/netns/{ns_a} bpftool net)")
                    await trio.sleep_forever()
            hook = await session.query("demo0", "ingress")
            _say(out, f"detached; hook demo0/ingress now holds {len(hook.entries)} program(s)")
        return 0
    finally:
        with trio.CancelScope(shield=True):
            for name in reversed(created):
                await trio.to_thread.run_sync(delete_netns, name)
            if created:
                _say(out, f"removed namespaces {', '.join(created)}")


async def _demo_mock(out: TextIO, why: str | None) -> int:
    from asynctc_mock import MockKernel

    kernel = MockKernel()
    if why:
        _say(out, f"no real kernel for the demo here ({why}); using the in-memory mock kernel")
    async with asynctc.open_session("mock", kernel=kernel, owner="asynctc-demo") as session:
        _say(out, f"backend: {session.backend_name} (in-memory kernel model, no privileges needed)")
        counter = kernel.program("pass", name="demo_v1")
        async with session.open_attachment("eth0", "ingress", counter) as att:
            _say(out, f"attached program {att.info.prog_id} ({counter.name}) to eth0 ingress "
                      f"as link {att.info.link_id}")
            await trio.to_thread.run_sync(kernel.send, "eth0", "ingress", 10)
            _say(out, f"sent 10 simulated packets: {counter.name} counted {counter.count()}")
            hook = await session.query("eth0", "ingress")
            _say(out, f"hook eth0/ingress revision={hook.revision}: "
                      + ", ".join(f"{e.kind} prog {e.prog_id} owned={e.owned}" for e in hook.entries))
            v2 = kernel.program("pass", name="demo_v2")
            result = await att.update(v2, expected=counter)
            _say(out, f"updated to program {v2.id} ({v2.name}) by {result.method}, revision {result.revision}")
            await trio.to_thread.run_sync(kernel.send, "eth0", "ingress", 5)
            _say(out, f"sent 5 more packets: {counter.name} {counter.count()}, {v2.name} {v2.count()}")
        hook = await session.query("eth0", "ingress")
        _say(out, f"detached; hook eth0/ingress now holds {len(hook.entries)} program(s)")
    return 0


async def _demo(args: argparse.Namespace, out: TextIO) -> int:
    if args.backend == "mock":
        return await _demo_mock(out, None)
    why = _real_kernel_possible()
    if why is None:
        return await _demo_real(out, args.backend, args.hold)
    if args.backend != "auto":
        _say(out, f"error: backend {args.backend!r} needs the real kernel, which is not usable here: {why}")
        return 2
    return await _demo_mock(out, why)


# ---------------------------------------------------------------------------------------------------------
# backends


async def _backends(args: argparse.Namespace, out: TextIO) -> int:
    from asynctc import _plugins
    from asynctc.backend import BackendContext
    from asynctc.lowlevel.netns import NetnsRunner

    registry = _plugins.collect_backends(_plugins.get_plugin_manager())
    runner = NetnsRunner(args.netns, trio.CapacityLimiter(4))
    ctx = BackendContext(runner=runner, netns=args.netns, owner="asynctc", session_tag="asynctc:probe")
    rows = []
    try:
        for name in registry.names():
            cls = registry.get(name)
            try:
                probe = await cls.probe(ctx)
            except Exception as exc:
                probe = asynctc.Probe(False, f"probe raised {exc!r}")
            rows.append((name, cls.__module__, probe))
    finally:
        runner.close()
    if args.json:
        for name, module, probe in rows:
            _say(out, json.dumps({"backend": name, "module": module, "available": probe.available,
                                  "reason": probe.reason}))
        return 0
    width = max((len(r[0]) for r in rows), default=7)
    for name, module, probe in rows:
        mark = "yes" if probe.available else "no "
        _say(out, f"{name:<{width}}  available: {mark}  {probe.reason}  [{module}]")
    return 0


# ---------------------------------------------------------------------------------------------------------
# monitor


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, asynctc.Attachment):
        return dataclasses.asdict(value.info) | {"state": value.state.value}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def format_event(event: ev.Event, *, as_json: bool, now: float | None = None) -> str:
    """One line for an event: aligned text for people, or one JSON object for programs."""
    now = time.time() if now is None else now
    name = type(event).__name__
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    if as_json:
        return json.dumps({"time": round(now, 6), "event": name}
                          | {k: _jsonable(v) for k, v in fields.items()}, sort_keys=False)
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
    parts = []
    for k, v in fields.items():
        if isinstance(v, enum.Enum):
            v = v.value
        if k == "handle" and isinstance(v, int):
            v = f"{v:#x}"
        parts.append(f"{k}={v}")
    return f"{stamp}  {name:<18} {' '.join(parts)}"


async def _monitor(args: argparse.Namespace, out: TextIO) -> int:
    backend = args.backend
    async with asynctc.open_session(backend, netns=args.netns) as session, session.open_monitor() as mon:
        # Said once the subscription is in place (on stderr: stdout carries only events), so whoever
        # reads it knows that every later change will be reported.
        where = f"namespace {args.netns}" if args.netns else "this namespace"
        _say(sys.stderr, f"watching {where} with the {session.backend_name} backend; Ctrl-C to stop")
        async for event in mon:
            _say(out, format_event(event, as_json=args.json))
    return 0


# ---------------------------------------------------------------------------------------------------------
# stress


def _count_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _rate_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value:g}")
    return value


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


async def _stress(args: argparse.Namespace, out: TextIO) -> int:
    import logging

    from asynctc import testing

    if not args.verbose:  # failed cleanups under injected faults are counted in the report instead
        logging.getLogger("asynctc").addHandler(logging.NullHandler())
    try:
        report = await testing.stress(
            lifecycles=args.lifecycles, devices=args.devices, duration=args.duration, namespaces=args.namespaces,
            backend=args.backend, cancel_rate=args.cancel_rate, fault_rate=args.fault_rate,
            delete_rate=args.delete_rate, pin_rate=args.pin_rate, seed=args.seed,
            progress=sys.stderr if sys.stderr.isatty() else None,
        )
    except ValueError as exc:
        sys.stderr.write(f"asynctc stress: {exc}\n")
        return 2
    except asynctc.TCError as exc:
        sys.stderr.write(f"asynctc stress: {type(exc).__name__}: {exc}\n")
        return 1
    _say(out, json.dumps(report.to_json()) if args.json else report.summary())
    return 1 if report.leaks else 0


# ---------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="asynctc", description="Attach eBPF programs to Linux traffic control.")
    p.add_argument("--version", action="version", version=f"asynctc {asynctc.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="attach a counting program, send packets, update it, detach it")
    d.add_argument("--backend", default="auto",
                   help="auto (real kernel where possible, else mock), bpf_link, netlink or mock")
    d.add_argument("--hold", action="store_true",
                   help="on a real kernel, keep the updated program attached until Ctrl-C, then clean up")
    b = sub.add_parser("backends", help="installed backends and whether each works here")
    b.add_argument("--netns", default=None, help="probe inside this network namespace")
    b.add_argument("--json", action="store_true", help="one JSON object per backend")
    m = sub.add_parser("monitor", help="a live stream of device, qdisc, filter and attachment events")
    m.add_argument("--netns", default=None, help="watch this network namespace (name or path)")
    m.add_argument("--json", action="store_true", help="one JSON object per line")
    m.add_argument("--backend", default="auto", help="backend whose event source to use")
    st = sub.add_parser("stress", help="many concurrent lifecycles with cancellations, then a leak audit "
                                       "(exit 1 if anything leaked)")
    st.add_argument("--lifecycles", type=_count_arg, default=16, help="concurrent lifecycles (default 16)")
    st.add_argument("--devices", type=_count_arg, default=4, help="devices they share (default 4)")
    st.add_argument("--duration", type=_seconds_arg, default=5.0, help="seconds of workload (default 5)")
    st.add_argument("--namespaces", type=_count_arg, default=1,
                    help="network namespaces (mock: kernels) the devices are spread over (default 1)")
    st.add_argument("--backend", default="auto",
                    help="auto, bpf_link or netlink (real kernel, in namespaces it creates; needs root), or mock")
    st.add_argument("--cancel-rate", type=_rate_arg, default=0.2,
                    help="share of lifecycles cancelled at a random instant (default 0.2)")
    st.add_argument("--fault-rate", type=_rate_arg, default=0.0,
                    help="chance of an injected kernel fault before each operation (mock only; default 0)")
    st.add_argument("--delete-rate", type=float, default=1.0,
                    help="device deletions (re-created at once) per second (default 1)")
    st.add_argument("--pin-rate", type=_rate_arg, default=0.1,
                    help="share of lifecycles that pin and unpin their attachment (default 0.1)")
    st.add_argument("--seed", type=int, default=None, help="repeat a run's random choices")
    st.add_argument("--json", action="store_true", help="the report as one JSON object")
    st.add_argument("--verbose", action="store_true", help="also show asynctc's log (failed cleanups...)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout
    jobs = {"demo": _demo, "backends": _backends, "monitor": _monitor, "stress": _stress}
    job = jobs[args.command]

    async def run() -> int:
        return await job(args, out)

    try:
        return trio.run(_run_cancellable, run)
    except asynctc.TCError as exc:
        sys.stderr.write(f"asynctc {args.command}: {type(exc).__name__}: {exc}\n")
        return 1
    except BrokenPipeError:
        # the reader went away (`asynctc monitor | head`): end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
