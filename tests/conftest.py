"""Shared fixtures: a fresh MockKernel and a mock session over it (no privileges needed)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

import asynctc
from asynctc_mock import MockKernel


@pytest.fixture
def kernel() -> MockKernel:
    """A fresh in-memory kernel with lo, eth0, veth0 and veth1."""
    return MockKernel()


@pytest.fixture
async def session(kernel: MockKernel) -> AsyncIterator[asynctc.Session]:
    """A mock session over `kernel`."""
    async with asynctc.open_session(backend="mock", kernel=kernel) as s:
        yield s


@pytest.fixture
def root() -> None:
    """Skip unless real BPF programs can be loaded (root)."""
    if os.geteuid() != 0:
        pytest.skip("loading real BPF programs needs root (CAP_BPF)")
