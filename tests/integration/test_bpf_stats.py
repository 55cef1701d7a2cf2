"""BPF_ENABLE_STATS and the run statistics of bpf_prog_info (`show --stats` is built on them)."""

from __future__ import annotations

import os

import pytest

from asynctc.lowlevel import bpf

pytestmark = pytest.mark.kernel


def test_runs_are_counted_while_statistics_are_on() -> None:
    fd = bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, bpf.asm.mov64_imm(0, 0) + bpf.asm.exit(), name="stats_t")
    try:
        before = bpf.prog_run_stats(fd)
        stats = bpf.enable_stats(bpf.BPF_STATS_RUN_TIME)
        try:
            for _ in range(3):
                bpf.prog_test_run(fd)
            during = bpf.prog_run_stats(fd)
        finally:
            os.close(stats)
        # Only this test runs this program: exactly its three runs were counted, and they took time.
        assert during.run_cnt - before.run_cnt == 3
        assert during.run_time_ns > before.run_time_ns
    finally:
        os.close(fd)


def test_an_unknown_statistics_type_is_refused() -> None:
    with pytest.raises(bpf.BpfError) as info:
        bpf.enable_stats(0xFFFF)
    assert info.value.errno == 22 and info.value.op == "enable_stats"
