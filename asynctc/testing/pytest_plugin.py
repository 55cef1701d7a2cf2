"""pytest fixtures for real-kernel tests: a fresh namespace per test, veth pairs, a private bpffs.

Enable with `-p asynctc.testing.pytest_plugin` (asynctc's own suite does so in pyproject.toml). Tests
marked `kernel` (or using these fixtures) are skipped, with the reason, only where the machine cannot run
them (not root, no BPF).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._netenv import (
    VethPair,
    bpffs_mount,
    kernel_test_skip_reason,
    temp_netns,
    veth_pair,
)

_reason: list[str | None] = []


def _skip_reason() -> str | None:
    if not _reason:
        _reason.append(kernel_test_skip_reason())
    return _reason[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if item.get_closest_marker("kernel") is not None:
            reason = reason if reason is not None else (_skip_reason() or "")
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"real-kernel test: {reason}"))


def _require_kernel() -> None:
    reason = _skip_reason()
    if reason:
        pytest.skip(f"real-kernel test: {reason}")


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, uniquely named network namespace (lo up), deleted after the test."""
    _require_kernel()
    with temp_netns("atct") as name:
        yield name


@pytest.fixture
def peer_netns() -> Iterator[str]:
    """A second fresh namespace, for the far end of a veth pair."""
    _require_kernel()
    with temp_netns("atcp") as name:
        yield name


@pytest.fixture
def veth(netns: str, peer_netns: str) -> VethPair:
    """A veth pair: end `a` ("veth0") in `netns`, end `b` ("veth1") in `peer_netns`, both up.
    Frames sent from b (send_frames("veth1", netns=peer_netns)) arrive at a's ingress hook."""
    return veth_pair(netns, "veth0", peer_netns, "veth1")


@pytest.fixture
def bpffs() -> Iterator[str]:
    """A private bpffs mount (a temporary directory), unmounted after the test."""
    _require_kernel()
    with bpffs_mount() as path:
        yield path
