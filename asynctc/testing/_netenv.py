"""Throwaway network environments for tests and demos: namespaces, veth pairs, bpffs, raw frames.

Everything here is created under a unique name and removed by that name; nothing else is touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import trio

from ..lowlevel.netns import NetnsRunner, netns_path

__all__ = [
    "VethPair",
    "bpffs_mount",
    "can_run_kernel_tests",
    "create_netns",
    "delete_netns",
    "ip",
    "kernel_test_skip_reason",
    "run_without_capabilities",
    "send_frames",
    "tc",
    "temp_netns",
    "unique_name",
    "veth_pair",
]

T = TypeVar("T")
ETH_P_TEST = 0x88B5  # IEEE local experimental ethertype


def unique_name(prefix: str = "atc") -> str:
    """A short unique name usable for namespaces and (<= 15 chars) devices."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def _iproute2(tool: str, args: tuple[str, ...], netns: str | None, check: bool) -> subprocess.CompletedProcess[str]:
    cmd = [tool, *(["-n", netns] if netns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip [-n NETNS] ARGS...`; raise with ip's own message on failure."""
    return _iproute2("ip", args, netns, check)


def tc(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `tc [-n NETNS] ARGS...` (foreign qdiscs and filters for tests); raise with tc's message on failure."""
    return _iproute2("tc", args, netns, check)


def _quiet(name: str) -> None:
    # No IPv6 autoconfiguration (router solicitations, DAD, MLD): the only frames on a test device are
    # the ones the test sends, so packet counts are exact.
    def write() -> None:
        for conf in ("all", "default"):
            with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                f.write("1")

    try:
        _in_netns(name, write)
    except FileNotFoundError:  # a kernel without IPv6
        pass


def create_netns(name: str | None = None) -> str:
    """Create a named network namespace (`ip netns add`) with lo up and IPv6 off; return its name."""
    name = name or unique_name()
    ip("netns", "add", name)
    try:
        ip("link", "set", "lo", "up", netns=name)
        _quiet(name)
    except BaseException:
        delete_netns(name)
        raise
    return name


def delete_netns(name: str) -> None:
    """Delete a namespace this process created (by name); quiet if it is already gone."""
    ip("netns", "del", name, check=False)


@contextmanager
def temp_netns(prefix: str = "atc") -> Iterator[str]:
    """A fresh uniquely named namespace, deleted afterwards."""
    name = create_netns(unique_name(prefix))
    try:
        yield name
    finally:
        delete_netns(name)


@dataclass(frozen=True)
class VethPair:
    """Two ends of a veth pair: `a` in namespace `netns_a`, `b` in `netns_b` (both up)."""

    netns_a: str
    a: str
    netns_b: str
    b: str


def veth_pair(netns_a: str, a: str, netns_b: str | None = None, b: str | None = None) -> VethPair:
    """Create a veth pair with end `a` in netns_a and end `b` in netns_b (default: netns_a), both up."""
    netns_b = netns_b or netns_a
    b = b or f"{a}p"
    ip("link", "add", a, "type", "veth", "peer", "name", b, "netns", netns_b, netns=netns_a)
    ip("link", "set", a, "up", netns=netns_a)
    ip("link", "set", b, "up", netns=netns_b)
    return VethPair(netns_a, a, netns_b, b)


def run_without_capabilities(
    code: str, *, netns: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -c CODE` as a process with no capabilities at all (root with an empty bounding set,
    `setpriv`), inside `netns` if given: how asynctc answers an unprivileged caller. Needs root to start."""
    enter = ["nsenter", f"--net={netns_path(netns)}"] if netns else []
    cmd = [*enter, "setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", sys.executable, "-c", code]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _in_netns(netns: str, fn: Callable[..., T], *args: object) -> T:
    """Run fn(*args) on this thread inside `netns`, then come back (NetnsRunner.call_in_netns)."""
    runner = NetnsRunner(netns, trio.CapacityLimiter(1))
    try:
        return runner.call_in_netns(fn, *args)
    finally:
        runner.close()


def _send(dev: str, count: int) -> int:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
    try:
        s.bind((dev, 0))
        frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ETH_P_TEST) + bytes(50)
        sent = 0
        for _ in range(count):
            s.send(frame)
            sent += 1
        return sent
    finally:
        s.close()


def send_frames(dev: str, count: int = 1, *, netns: str | None = None) -> int:
    """Send `count` 64-byte broadcast frames out of `dev` (AF_PACKET): they cross dev's egress hook and,
    for a veth, arrive at its peer's ingress hook. Blocking; call from a thread in async code."""
    if netns is None:
        return _send(dev, count)
    return _in_netns(netns, _send, dev, count)


@contextmanager
def bpffs_mount() -> Iterator[str]:
    """A private bpffs mounted on a fresh temporary directory, unmounted and removed afterwards."""
    path = tempfile.mkdtemp(prefix="asynctc-bpffs-")
    try:
        proc = subprocess.run(["mount", "-t", "bpf", "bpf", path], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"cannot mount bpffs on {path}: {proc.stderr.strip()}")
        try:
            yield path
        finally:
            subprocess.run(["umount", "-l", path], capture_output=True)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def kernel_test_skip_reason() -> str | None:
    """Why real-kernel tests cannot run here (None when they can): not root, or no BPF/netns support."""
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) to load BPF and create namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` command"
    from ..lowlevel import bpf

    try:
        fd = bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, bpf.asm.mov64_imm(0, 0) + bpf.asm.exit())
    except bpf.BpfError as exc:
        return f"cannot load BPF programs here: {exc.strerror}"
    os.close(fd)
    if not os.path.exists("/proc/self/ns/net"):
        return "no network namespaces"
    return None


def can_run_kernel_tests() -> bool:
    return kernel_test_skip_reason() is None


