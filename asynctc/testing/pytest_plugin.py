"""pytest fixtures for testing code that uses asynctc: a mock kernel and session, and, for real-kernel tests,
a fresh network namespace per test, veth pairs, a private bpffs and a session inside the namespace.

Installing asynctc registers this plugin through the `pytest11` entry point (name "asynctc"); it is inert
until a test uses one of its fixtures or the `kernel` marker. Disable it with `-p no:asynctc`.

Fixtures:
    mock_kernel: a fresh `asynctc_mock.MockKernel` (devices lo, eth0, veth0, veth1).
    mock_session: an open session over `mock_kernel` (async: needs pytest-trio).
    netns, peer_netns: fresh uniquely named network namespaces (lo up), deleted after the test.
    veth: a veth pair between `netns` ("veth0") and `peer_netns` ("veth1").
    bpffs: a private bpffs mount, unmounted after the test.
    kernel_session: an open session (backend "auto") inside `netns` (async: needs pytest-trio).

Tests marked `kernel`, and tests using the real-kernel fixtures, are skipped with the reason where the
machine cannot run them (not root, no BPF, no iproute2).

Options (command line, or the ini file without the leading dashes and with underscores):
    --asynctc-netns-prefix (ini: asynctc_netns_prefix): prefix of `netns` names (default "atct").
    --asynctc-peer-netns-prefix (ini: asynctc_peer_netns_prefix): prefix of `peer_netns` names ("atcp").
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from asynctc import Session
    from asynctc_mock import MockKernel

    from ._netenv import VethPair

__all__ = [
    "bpffs",
    "kernel_session",
    "mock_kernel",
    "mock_session",
    "netns",
    "peer_netns",
    "veth",
]

KERNEL_MARKER = "kernel: needs root, BPF and network namespaces (runs for real; skipped only where the machine cannot)"
_PREFIX_OPTIONS = {
    "asynctc_netns_prefix": ("atct", "name prefix of the namespaces of asynctc's `netns` fixture"),
    "asynctc_peer_netns_prefix": ("atcp", "name prefix of the namespaces of asynctc's `peer_netns` fixture"),
}
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")

_reason: list[str | None] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("asynctc", "asynctc fixtures (real-kernel namespaces)")
    for name, (default, help) in _PREFIX_OPTIONS.items():
        parser.addini(name, help=f"{help} (default {default!r})", default=default)
        group.addoption("--" + name.replace("_", "-"), dest=name, default=None,
                        help=f"{help} (overrides the ini option {name})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", KERNEL_MARKER)
    for name in _PREFIX_OPTIONS:
        _prefix(config, name)  # a bad prefix is a usage error at startup, not a failure in every test


def _prefix(config: pytest.Config, name: str) -> str:
    value = config.getoption(name) or config.getini(name)
    if not isinstance(value, str) or not _PREFIX_RE.fullmatch(value):
        option = "--" + name.replace("_", "-")
        raise pytest.UsageError(
            f"{option} / {name} must be 1 to 32 letters, digits, '_', '.' or '-' (it starts namespace "
            f"names under /run/netns), got {value!r}"
        )
    return value


def _skip_reason() -> str | None:
    if not _reason:
        from ._netenv import kernel_test_skip_reason

        _reason.append(kernel_test_skip_reason())
    return _reason[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("kernel") is not None:
            reason = _skip_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"real-kernel test: {reason}"))


def _require_kernel() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(f"real-kernel test: {reason}")


# -- the mock ---------------------------------------------------------------------------------------------
@pytest.fixture
def mock_kernel() -> Iterator[MockKernel]:
    """A fresh in-memory kernel (devices lo, eth0, veth0, veth1); no privileges needed."""
    from asynctc_mock import MockKernel

    kernel = MockKernel()
    try:
        yield kernel
    finally:
        kernel.close()


@pytest.fixture
async def mock_session(mock_kernel: MockKernel) -> AsyncIterator[Session]:
    """An open session over `mock_kernel`, closed (detaching what it owns) after the test. Async: the test
    runs under pytest-trio (trio_mode, or @pytest.mark.trio)."""
    import asynctc

    async with asynctc.open_session("mock", kernel=mock_kernel) as session:
        yield session


# -- the real kernel --------------------------------------------------------------------------------------
@pytest.fixture
def netns(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, uniquely named network namespace (lo up), deleted after the test."""
    _require_kernel()
    from ._netenv import temp_netns

    with temp_netns(_prefix(request.config, "asynctc_netns_prefix")) as name:
        yield name


@pytest.fixture
def peer_netns(request: pytest.FixtureRequest) -> Iterator[str]:
    """A second fresh namespace, for the far end of a veth pair."""
    _require_kernel()
    from ._netenv import temp_netns

    with temp_netns(_prefix(request.config, "asynctc_peer_netns_prefix")) as name:
        yield name


@pytest.fixture
def veth(netns: str, peer_netns: str) -> VethPair:
    """A veth pair: end `a` ("veth0") in `netns`, end `b` ("veth1") in `peer_netns`, both up.
    Frames sent from b (send_frames("veth1", netns=peer_netns)) arrive at a's ingress hook."""
    from ._netenv import veth_pair

    return veth_pair(netns, "veth0", peer_netns, "veth1")


@pytest.fixture
def bpffs() -> Iterator[str]:
    """A private bpffs mount (a temporary directory), unmounted after the test."""
    _require_kernel()
    from ._netenv import bpffs_mount

    with bpffs_mount() as path:
        yield path


@pytest.fixture
async def kernel_session(netns: str) -> AsyncIterator[Session]:
    """An open session (backend "auto": tcx where the kernel has it, else netlink) inside `netns`, closed
    after the test. Async: the test runs under pytest-trio."""
    import asynctc

    async with asynctc.open_session("auto", netns=netns) as session:
        yield session
