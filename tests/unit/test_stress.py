"""The stress harness on the mock kernel: the workload runs, the report is frozen and complete, and the leak
audit, which reads the MockKernel itself and not the sessions' records, catches a backend that leaks."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from _leaky import LeakyPlugin

import asynctc
from asynctc.testing import LatencyStats, stress

QUICK: dict[str, Any] = {"lifecycles": 6, "devices": 3, "duration": 0.4, "seed": 7}


# Faults apart from pins and device deletions: a fault while a failed pin is rolled back, or while a
# severed attachment's resources are released, leaves what nobody knows of any more (the mock backend and
# the session log it), which the audit rightly reports as a leak.
async def test_a_mock_run_with_faults_and_cancellations_leaks_nothing() -> None:
    report = await stress(backend="mock", fault_rate=0.05, delete_rate=0.0, cancel_rate=0.3, pin_rate=0.0,
                          namespaces=2, **QUICK)
    assert report.leaks == (), report.summary()
    assert not report.leaked
    assert (report.backend, report.kernel, report.namespaces, report.seed) == ("mock", "mock", 2, 7)
    assert report.operations["attach"] > 0
    assert report.operations["detach"] > 0
    for op in ("attach", "update", "detach"):
        st = report.latency[op]
        assert st.count == report.operations.get(op, 0)
        assert 0 <= st.p50 <= st.p90 <= st.p99 <= st.max
    assert report.faults_injected > 0
    assert report.elapsed >= 0.4


async def test_a_mock_run_with_pins_cancellations_and_deletions_leaks_nothing() -> None:
    report = await stress(backend="mock", delete_rate=5.0, cancel_rate=0.3, pin_rate=0.5, **QUICK)
    assert report.leaks == (), report.summary()
    assert report.operations["pin"] > 0


async def test_the_report_is_frozen_and_serialisable() -> None:
    report = await stress(backend="mock", **QUICK)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.leaks = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        report.operations["attach"] = 0  # type: ignore[index]
    data = json.loads(json.dumps(report.to_json()))
    assert data["leaks"] == 0 and data["leak_details"] == []
    assert set(data["latency_ms"]) == {"attach", "update", "detach"}
    assert data["operations"]["attach"] == report.operations["attach"]
    assert "leaks: 0" in report.summary()


def test_latency_percentiles_are_nearest_rank() -> None:
    st = LatencyStats.of(i / 1000 for i in range(1, 101))  # 1..100 ms
    assert (st.count, st.p50, st.p90, st.p99, st.max) == (100, 0.05, 0.09, 0.099, 0.1)
    assert LatencyStats.of([]) == LatencyStats(0, 0.0, 0.0, 0.0, 0.0)


async def test_the_audit_catches_a_backend_that_skips_detaching() -> None:
    report = await stress(backend="leaky", plugins=[LeakyPlugin()], cancel_rate=0.0, **QUICK)
    assert report.leaked
    kinds = {leak.kind for leak in report.leaks}
    # the links are still on their hooks, and still exist: both reads of the kernel see them
    assert {"tcx", "link"} <= kinds, report.summary()
    assert all(leak.where == "mock kernel 0" for leak in report.leaks)
    assert report.to_json()["leaks"] == len(report.leaks) > 0


async def test_the_audit_catches_link_fds_that_were_never_closed() -> None:
    report = await stress(backend="fdleak", plugins=[LeakyPlugin()], delete_rate=0.0, **QUICK)
    assert report.leaked
    # nothing is left on any hook: only the kernel's list of links shows the leak
    assert {leak.kind for leak in report.leaks} == {"link"}, report.summary()
    assert all("ifindex 0" in leak.detail for leak in report.leaks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lifecycles": 0}, "lifecycles must be an integer from 1"),
        ({"devices": 2, "namespaces": 3}, "namespaces (3) cannot exceed devices (2)"),
        ({"duration": 0}, "duration must be a positive number"),
        ({"cancel_rate": 1.5}, "cancel_rate must be a probability"),
        ({"delete_rate": -1}, "delete_rate must be >= 0"),
        ({"delete_rate": "often"}, "delete_rate must be >= 0"),
        ({"duration": float("nan")}, "duration must be a positive number"),
        ({"backend": "bpf_link", "fault_rate": 0.1}, "fault injection needs the mock kernel"),
    ],
)
async def test_bad_parameters_are_refused_before_anything_is_made(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"backend": "mock", "duration": 0.1} | kwargs
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        await stress(**args)


async def test_a_seed_must_be_an_integer() -> None:
    with pytest.raises(TypeError, match="seed must be an integer, got 'x'"):
        await stress(backend="mock", duration=0.1, seed="x")  # type: ignore[arg-type]


async def test_an_unknown_backend_says_which_are_installed() -> None:
    with pytest.raises(asynctc.BackendUnavailable, match="no backend named 'nope'"):
        await stress(backend="nope", duration=0.1)
