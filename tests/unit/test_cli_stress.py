"""`asynctc stress`: exit codes, the JSON report, one-line errors; 0 leaks on this kernel."""

from __future__ import annotations

import functools
import json
import os
import select
import subprocess
import sys

import pytest
from _leaky import LeakyPlugin

import asynctc
from asynctc import cli
from asynctc.testing import stress


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asynctc.cli", *args], capture_output=True, text=True, timeout=120)


def test_the_command_prints_a_json_report_and_exits_0_when_nothing_leaked() -> None:
    proc = run("stress", "--backend", "mock", "--duration", "0.4", "--lifecycles", "4", "--fault-rate", "0.05",
               "--pin-rate", "0", "--delete-rate", "0", "--seed", "3", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""  # no progress line when stderr is not a terminal, no log noise
    report = json.loads(proc.stdout)
    assert report["leaks"] == 0 and report["seed"] == 3 and report["backend"] == "mock"


def test_the_command_prints_a_table_for_people() -> None:
    proc = run("stress", "--backend", "mock", "--duration", "0.3", "--lifecycles", "2")
    assert proc.returncode == 0, proc.stderr
    assert "latency (ms)" in proc.stdout and "leaks: 0" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--lifecycles", "0"), "expected a number >= 1"),
        (("--cancel-rate", "2"), "expected a number between 0 and 1"),
        (("--duration", "soon"), "expected seconds"),
        (("--backend", "bpf_link", "--fault-rate", "0.1"), "fault injection needs the mock kernel"),
    ],
)
def test_bad_command_arguments_are_one_line_usage_errors(args: tuple[str, ...], message: str) -> None:
    proc = run("stress", "--duration", "0.1", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_an_unknown_backend_is_a_failed_operation() -> None:
    proc = run("stress", "--backend", "nope", "--duration", "0.1")
    assert proc.returncode == 1
    assert "no backend named 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_the_command_exits_1_when_the_audit_finds_a_leak(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(asynctc.testing, "stress", functools.partial(stress, plugins=[LeakyPlugin()]))
    assert cli.main(["stress", "--backend", "leaky", "--duration", "0.3", "--lifecycles", "3", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["leaks"] == len(report["leak_details"]) > 0



@pytest.mark.kernel
def test_the_command_reports_zero_leaks_on_this_kernel() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "asynctc.cli", "stress", "--lifecycles", "8", "--devices", "2", "--duration", "1",
         "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"leaks": 0' in proc.stdout


def test_progress_is_shown_when_stderr_is_a_terminal() -> None:
    master, slave = os.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "asynctc.cli", "stress", "--backend", "mock", "--duration", "0.8",
                               "--lifecycles", "2", "--json"], stdout=subprocess.PIPE, stderr=slave, text=True,
                              timeout=120)
        os.close(slave)
        slave = -1
        seen = b""
        while select.select([master], [], [], 5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and everything was read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0
    assert b"\r" in seen and b"/0.8 s  attach " in seen
    assert json.loads(proc.stdout)["leaks"] == 0  # stdout carries the report only
