"""Shared fixtures: a fresh MockKernel and a mock session over it (no privileges needed).

Also the suite's deadlines (see [tool.pytest.ini_options] in pyproject.toml): every trio test runs under a
soft deadline, a trio cancel scope, so a test stuck at a checkpoint fails with its cleanup done and the
suite goes on; pytest-timeout's hard deadline is the backstop for what trio cannot cancel.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path

import pytest
import trio

import asynctc
from asynctc_mock import MockKernel

# Python children of the tests dump every thread's stack on a fatal signal; a test that gives up on a
# hung child sends it SIGABRT (see _children.py), so the hang shows where the child was.
os.environ["PYTHONFAULTHANDLER"] = "1"

# The share of a test's hard deadline (pytest-timeout's) after which a trio test is cancelled.
SOFT_DEADLINE_SHARE = 0.75


def _hard_deadline(item: pytest.Item) -> float:
    """The test's pytest-timeout deadline in seconds (0: none): its timeout marker, else --timeout,
    PYTEST_TIMEOUT or the ini value, in pytest-timeout's order."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
        if value is not None:
            return float(value)
    for value in (item.config.getoption("timeout", None), os.environ.get("PYTEST_TIMEOUT"),
                  item.config.getini("timeout")):
        if value not in (None, ""):
            return float(value)
    return 0.0


Run = Callable[..., object]


def _run_with_deadline(
    seconds: float, nodeid: str, run: Run, afn: Callable[[], Awaitable[object]], *,
    clock: trio.abc.Clock | None, instruments: Sequence[trio.abc.Instrument],
) -> object:
    """pytest-trio's `run` for one test: `run` (trio.run) with the test and its trio fixtures in a cancel
    scope that expires after `seconds`."""
    if clock is not None:  # a mock clock's deadlines are not wall time; the hard deadline still holds
        return run(afn, clock=clock, instruments=instruments)
    message = (f"{nodeid} did not finish within its soft deadline of {seconds:g} s and was cancelled; if it "
               f"legitimately needs longer, raise its deadline with @pytest.mark.timeout(seconds)")

    async def bounded() -> object:
        scope = trio.move_on_after(seconds)
        try:
            with scope:
                return await afn()
        except BaseException as exc:
            if scope.cancel_called:
                exc.add_note(message)
            raise
        pytest.fail(message)  # the scope absorbed the cancellation: the test was cut short

    return run(bounded, clock=None, instruments=instruments)


@pytest.hookimpl(trylast=True)  # after pytest-trio has marked the async tests (trio_mode)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        runs = [m.kwargs["run"] for m in item.iter_markers("trio") if m.kwargs.get("run") is not None]
        hard = _hard_deadline(item)
        if runs and hard > 0:  # pytest-trio uses the first trio marker that names a `run`
            soft = partial(_run_with_deadline, hard * SOFT_DEADLINE_SHARE, item.nodeid, runs[0])
            item.add_marker(pytest.mark.trio(run=soft), append=False)


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
