"""The shape of asynctc.lowlevel: what it may import, the names kept where callers find them, and the
bpf(2) system call number by architecture."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

import asynctc.backend
from asynctc import _types
from asynctc.lowlevel import bpf, multicast, netlink, nlsock, transport

LOWLEVEL = Path(__file__).resolve().parents[2] / "asynctc" / "lowlevel"
# lowlevel is the bottom layer: it may use the value types (those of hooks and of events) and the errors,
# never the core or the backend contract built on it.
ALLOWED_PARENT_MODULES = {"_errors", "_types", "events"}


@pytest.mark.parametrize("path", sorted(LOWLEVEL.glob("*.py")), ids=lambda p: p.name)
def test_lowlevel_imports_only_values_errors_and_itself(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 2:  # from ..x import y
                assert node.module in ALLOWED_PARENT_MODULES, f"{path.name}: from ..{node.module}"
            elif node.level == 0 and node.module is not None and node.module.startswith("asynctc"):
                raise AssertionError(f"{path.name}: from {node.module} (use relative imports within lowlevel)")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not alias.name.startswith("asynctc"), f"{path.name}: import {alias.name}"


def test_the_netlink_module_re_exports_the_split_modules_names() -> None:
    assert netlink.NetlinkTransport is transport.NetlinkTransport
    assert netlink.open_transport is transport.open_transport
    assert netlink.start_transport is transport.start_transport
    assert netlink.MulticastSocket is multicast.MulticastSocket
    assert netlink.EventsLost is multicast.EventsLost
    assert netlink.open_multicast_socket is multicast.open_multicast_socket
    assert netlink.NonblockingReceiver is nlsock.NonblockingReceiver
    assert netlink.open_netlink_socket is nlsock.open_netlink_socket
    for name in netlink.__all__:
        assert hasattr(netlink, name), name


def test_placement_is_a_value_type_still_found_in_the_backend_module() -> None:
    assert asynctc.backend.Placement is _types.Placement
    assert _types.Placement("after", prog_id=3).prog_id == 3


@pytest.mark.parametrize(
    ("machine", "number"),
    [("x86_64", 321), ("aarch64", 280), ("i386", 357), ("armv7l", 386), ("ppc64le", 361), ("s390x", 351),
     ("riscv64", 280)],
)
def test_the_bpf_syscall_number_follows_the_architecture(machine: str, number: int) -> None:
    assert bpf.bpf_syscall_number(machine) == number


def test_an_unknown_architecture_is_refused_by_name() -> None:
    with pytest.raises(OSError, match="'vax' architecture") as info:
        bpf.bpf_syscall_number("vax")
    assert info.value.errno == errno.ENOSYS
