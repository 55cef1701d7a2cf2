"""Event monitors on the real kernel: every event kind, resync after loss, several namespaces, cleanup."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import trio
from _children import CHILD_TIMEOUT, default_sigint, stop
from _children import readline as _readline

import asynctc
from asynctc import events as ev
from asynctc.testing import create_netns, delete_netns, ip, tc, unique_name

pytestmark = pytest.mark.kernel


async def next_matching(mon: asynctc.Monitor, pred: Callable[[ev.Event], bool], timeout: float = 10) -> ev.Event:
    with trio.fail_after(timeout):
        async for event in mon:
            if pred(event):
                return event
    raise AssertionError("the monitor ended")


def netlink_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


async def test_every_event_kind_from_ip_and_tc(netns: str) -> None:
    async with asynctc.open_session("bpf_link", netns=netns) as s, s.open_monitor() as mon:
        ip("link", "add", "mon0", "type", "veth", "peer", "name", "mon1", netns=netns)
        added = await next_matching(mon, lambda e: isinstance(e, ev.DeviceAdded) and e.name == "mon0")
        assert isinstance(added, ev.DeviceAdded)
        ifindex = added.ifindex
        tc("qdisc", "add", "dev", "mon0", "clsact", netns=netns)
        q = await next_matching(mon, lambda e: isinstance(e, ev.QdiscAdded))
        assert q == ev.QdiscAdded(ifindex, "clsact", 0xFFFF0000, 0xFFFFFFF1)
        tc("filter", "add", "dev", "mon0", "ingress", "prio", "7", "u32", "match", "u32", "0", "0", netns=netns)
        f = await next_matching(mon, lambda e: isinstance(e, ev.FilterAdded))
        assert isinstance(f, ev.FilterAdded)
        assert (f.ifindex, f.direction, f.priority, f.kind, f.owned) == (
            ifindex, asynctc.Direction.INGRESS, 7, "u32", False)
        tc("filter", "del", "dev", "mon0", "ingress", "prio", "7", netns=netns)
        r = await next_matching(mon, lambda e: isinstance(e, ev.FilterRemoved))
        assert isinstance(r, ev.FilterRemoved) and r.priority == 7 and r.direction is asynctc.Direction.INGRESS
        tc("qdisc", "del", "dev", "mon0", "clsact", netns=netns)
        qr = await next_matching(mon, lambda e: isinstance(e, ev.QdiscRemoved))
        assert qr == ev.QdiscRemoved(ifindex, "clsact", 0xFFFF0000, 0xFFFFFFF1)
        ip("link", "del", "mon0", netns=netns)
        gone = await next_matching(mon, lambda e: isinstance(e, ev.DeviceRemoved) and e.ifindex == ifindex)
        assert gone == ev.DeviceRemoved(ifindex, "mon0")


async def test_severed_by_device_removal_reaches_the_monitor(netns: str) -> None:
    ip("link", "add", "sev0", "type", "veth", "peer", "name", "sev1", netns=netns)
    async with asynctc.open_session("bpf_link", netns=netns) as s, s.open_monitor() as mon:
        att = await s.attach("sev0", "egress", asynctc.programs.constant("pass"))
        ip("link", "del", "sev0", netns=netns)
        severed = await next_matching(mon, lambda e: isinstance(e, ev.AttachmentSevered))
        assert isinstance(severed, ev.AttachmentSevered)
        assert severed.attachment is att and "deleted" in severed.reason
        assert att.state is asynctc.State.SEVERED


@pytest.mark.parametrize("backend", ["bpf_link", "netlink"])
async def test_storm_with_a_tiny_buffer_resyncs_to_the_kernel_state(netns: str, backend: str) -> None:
    """1,000 device creations and deletions with a 4 KiB receive buffer (on either real backend: both
    honour backend_options["event_rcvbuf"]): events are lost, the monitor re-dumps, and what it reported
    adds up to exactly the kernel's devices, followed by Resynced."""
    lines = [f"link add st{i} type veth peer name sp{i}" for i in range(250)]  # 500 devices
    lines += [f"link del st{i}" for i in range(0, 250, 2)]  # 250 deleted (a veth takes its peer along)
    lines += [f"link add su{i} type veth peer name sq{i}" for i in range(125)]  # 250 more
    with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
        f.write("\n".join(lines) + "\n")
    try:
        async with asynctc.open_session(backend, netns=netns, backend_options={"event_rcvbuf": 4096}) as s:
            known = {name for name in await trio.to_thread.run_sync(_kernel_devices, netns)}
            async with s.open_monitor(buffer=100_000) as mon:
                # Stall the event loop on purpose while the storm runs (a reader that fell behind): the
                # kernel must drop events for the 4 KiB socket.
                subprocess.run(["ip", "-n", netns, "-batch", f.name], check=True, timeout=CHILD_TIMEOUT)
                ip("link", "add", "marker0", "type", "veth", "peer", "name", "marker1", netns=netns)
                resynced = 0
                with trio.fail_after(60):
                    async for event in mon:
                        if isinstance(event, ev.DeviceAdded):
                            known.add(event.name)
                        elif isinstance(event, ev.DeviceRemoved):
                            known.discard(event.name)
                        elif isinstance(event, ev.Resynced):
                            resynced += 1
                        # the marker may come inside the resync's differences, which end with Resynced
                        if "marker1" in known and "marker0" in known and resynced:
                            break
        assert resynced >= 1, "a 4 KiB buffer should have overflowed during the storm"
        assert known == set(_kernel_devices(netns))
    finally:
        os.unlink(f.name)


def _kernel_devices(netns: str) -> list[str]:
    return [d["ifname"] for d in json.loads(ip("-j", "link", "show", netns=netns).stdout)]


async def test_a_monitor_in_each_of_several_namespaces(netns: str, peer_netns: str) -> None:
    third = create_netns(unique_name("atcm"))
    try:
        names = [netns, peer_netns, third]
        async with trio.open_nursery() as n:
            seen: dict[str, list[str]] = {}

            async def watch(ns: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                async with asynctc.open_session("bpf_link", netns=ns) as s, s.open_monitor() as mon:
                    task_status.started()
                    e = await next_matching(mon, lambda e: isinstance(e, ev.DeviceAdded))
                    assert isinstance(e, ev.DeviceAdded)
                    seen[ns] = [e.name]

            for ns in names:
                await n.start(watch, ns)
            for i, ns in enumerate(names):
                ip("link", "add", f"only{i}", "type", "veth", "peer", "name", f"onlyp{i}", netns=ns)
        assert {ns: seen[ns][0].removeprefix("onlyp") .removeprefix("only") for ns in names} == {
            ns: str(i) for i, ns in enumerate(names)}
    finally:
        delete_netns(third)


async def test_cancelling_a_monitor_mid_stream_leaves_no_socket(netns: str) -> None:
    before = netlink_fds()
    async with asynctc.open_session("bpf_link", netns=netns) as s:
        with trio.move_on_after(30) as outer:
            async with s.open_monitor() as mon:
                with trio.CancelScope() as scope:
                    ip("link", "add", "cx0", "type", "veth", "peer", "name", "cx1", netns=netns)
                    async for _event in mon:
                        scope.cancel()  # cancelled in the middle of the stream
                assert scope.cancelled_caught
        assert not outer.cancelled_caught
        assert s.monitors == 0
        # a new monitor still works after the cancelled one
        async with s.open_monitor() as mon2:
            ip("link", "del", "cx0", netns=netns)
            await next_matching(mon2, lambda e: isinstance(e, ev.DeviceRemoved))
    assert netlink_fds() == before


async def test_slow_consumer_gets_events_dropped_not_the_others(netns: str) -> None:
    async with asynctc.open_session("bpf_link", netns=netns) as s:
        async with s.open_monitor(buffer=2) as slow, s.open_monitor() as fast:
            for i in range(6):
                ip("link", "add", f"sl{i}", "type", "veth", "peer", "name", f"slp{i}", netns=netns)
            names: list[str] = []
            while len(names) < 12:
                e = await next_matching(fast, lambda e: isinstance(e, ev.DeviceAdded))
                assert isinstance(e, ev.DeviceAdded)
                names.append(e.name)
            with trio.fail_after(10):
                got = [await slow.receive(), await slow.receive()]
            assert all(isinstance(e, ev.DeviceAdded) for e in got)
            ip("link", "add", "late0", "type", "veth", "peer", "name", "late1", netns=netns)
            dropped = await next_matching(slow, lambda e: isinstance(e, ev.EventsDropped))
            assert isinstance(dropped, ev.EventsDropped) and dropped.count >= 10


def test_monitor_command_streams_json_and_ends_on_ctrl_c(netns: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "asynctc.cli", "monitor", "--netns", netns, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, preexec_fn=default_sigint,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert "watching" in _readline(proc.stderr, 30)  # subscribed: later changes are reported
        ip("link", "add", "cli0", "type", "veth", "peer", "name", "cli1", netns=netns)
        event = json.loads(_readline(proc.stdout, 30))
        assert event["event"] == "DeviceAdded"
        assert event["name"] in ("cli0", "cli1")
        assert isinstance(event["ifindex"], int) and isinstance(event["time"], float)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 128 + signal.SIGINT
    finally:
        stop(proc)



def _filter_event(kind: type[ev.FilterAdded | ev.FilterRemoved], prio: int | None, handle: int | None,
                  e: ev.Event) -> bool:
    return isinstance(e, kind) and e.priority == prio and (handle is None or e.handle == handle)


@pytest.mark.parametrize("backend", ["netlink", "mock"])
async def test_own_filters_are_reported_owned_when_added_and_removed(netns: str, backend: str) -> None:
    """The kernel reports a new filter before the attach that made it returns, and its removal after the
    detach let go of it: both events still say owned=True; a foreign filter's say owned=False."""
    from asynctc_mock import MockKernel

    kernel = MockKernel() if backend == "mock" else None
    dev = "eth0" if backend == "mock" else "own0"
    if kernel is None:
        ip("link", "add", "own0", "type", "veth", "peer", "name", "own1", netns=netns)
    opts: dict[str, Any] = {"mode": "legacy"} if backend == "mock" else {}
    async with asynctc.open_session(backend, netns=None if kernel else netns, kernel=kernel) as s, \
            s.open_monitor() as mon:
        prog = kernel.program("pass") if kernel else asynctc.programs.constant("pass")
        for _ in range(3):
            att = await s.attach(dev, "ingress", prog, **opts)
            prio, handle = att.info.priority, att.info.handle
            added = await next_matching(mon, functools.partial(_filter_event, ev.FilterAdded, prio, None))
            assert isinstance(added, ev.FilterAdded) and added.owned, added
            await att.detach()
            removed = await next_matching(mon, functools.partial(_filter_event, ev.FilterRemoved, prio, handle))
            assert isinstance(removed, ev.FilterRemoved) and removed.owned, removed
        if kernel is None:
            tc("qdisc", "add", "dev", dev, "clsact", netns=netns)
            tc("filter", "add", "dev", dev, "ingress", "prio", "7", "u32", "match", "u32", "0", "0", netns=netns)
            foreign = await next_matching(mon, lambda e: isinstance(e, ev.FilterAdded) and e.priority == 7)
            assert isinstance(foreign, ev.FilterAdded) and not foreign.owned
            tc("filter", "del", "dev", dev, "ingress", "prio", "7", netns=netns)
            gone = await next_matching(mon, lambda e: isinstance(e, ev.FilterRemoved) and e.priority == 7)
            assert isinstance(gone, ev.FilterRemoved) and not gone.owned


@pytest.mark.parametrize("backend", ["bpf_link", "netlink"])
async def test_a_device_deleted_right_after_the_attach_is_reported_as_deleted(netns: str, backend: str) -> None:
    """The watcher starts with the first attachment; a device deleted before it watched is still reported
    with its real cause, not as 'severed before events were watched'."""
    async with asynctc.open_session(backend, netns=netns) as s:
        for i in range(5):
            ip("link", "add", f"rd{i}", "type", "veth", "peer", "name", f"rp{i}", netns=netns)
            att = await s.attach(f"rd{i}", "ingress", asynctc.programs.constant("pass"))
            ip("link", "del", f"rd{i}", netns=netns)
            with trio.fail_after(10):
                await att.wait_severed()
            assert att.sever_reason is not None and f"rd{i}" in att.sever_reason
            assert "deleted" in att.sever_reason, att.sever_reason
