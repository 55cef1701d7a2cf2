"""Shared fixtures: a fresh MockKernel and a mock session over it (no privileges needed)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

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


BPF_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "bpf"


@pytest.fixture(scope="session")
def bpf_objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The BPF C fixtures of tests/fixtures/bpf, compiled with clang once per run: name -> object path.

    Skipped, saying why, only where nothing can compile them (no clang or no libbpf headers)."""
    from asynctc.testing import compile_bpf, compile_bpf_skip_reason

    reason = compile_bpf_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bpf")
    objects = {src.stem: compile_bpf(src, out / f"{src.stem}.o") for src in sorted(BPF_FIXTURES.glob("*.c"))}
    # rejected.c with its map pinned by name: a refused load must leave no pin behind
    objects["rejected_pinned"] = compile_bpf(
        BPF_FIXTURES / "rejected.c", out / "rejected_pinned.o", extra_args=("-DPIN_BY_NAME",)
    )
    return objects
