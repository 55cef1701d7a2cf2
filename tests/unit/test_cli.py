"""The `asynctc` command without privileges: the demo on the mock, the backend list, event formatting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _children import run as run_child

from asynctc import Direction, cli
from asynctc import events as ev


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_child([sys.executable, "-m", "asynctc.cli", *args])


def test_demo_on_the_mock_tells_the_whole_story() -> None:
    proc = run("demo", "--backend", "mock")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "backend: mock" in out
    assert "counted 10" in out
    assert "by link_update" in out
    assert "demo_v1 10, demo_v2 5" in out
    assert "now holds 0 program(s)" in out


def test_backends_lists_every_installed_backend_with_a_reason() -> None:
    proc = run("backends", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["backend"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert {"mock", "bpf_link", "netlink"} <= set(rows)
    assert rows["mock"]["available"] is True
    assert all(isinstance(r["reason"], str) and r["reason"] for r in rows.values())


def test_unknown_command_is_a_usage_error() -> None:
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


@pytest.mark.parametrize(("netns", "code", "says"), [
    ("", 2, "netns must be a non-empty name or path"),
    ("/proc/self/ns/uts", 1, "is a uts namespace, not a network namespace"),
])
def test_a_bad_netns_is_one_line_never_a_traceback(netns: str, code: int, says: str) -> None:
    proc = run("backends", "--netns", netns)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_demo_with_an_unknown_backend_says_what_is_installed() -> None:
    proc = run("demo", "--backend", "nope")
    if "real kernel" in proc.stdout:  # without root: the demo says the real kernel is not usable
        assert proc.returncode == 2
    else:
        assert proc.returncode == 1
        assert "no backend named 'nope'" in proc.stderr


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (ev.DeviceAdded(7, "eth9"), "DeviceAdded        ifindex=7 name=eth9"),
        (ev.FilterRemoved(3, Direction.INGRESS, 49152, 1, "bpf", 42, True),
         "FilterRemoved      ifindex=3 direction=ingress priority=49152 handle=0x1 kind=bpf prog_id=42 owned=True"),
        (ev.Resynced("lost"), "Resynced           reason=lost"),
    ],
)
def test_events_read_aligned_for_people(event: ev.Event, text: str) -> None:
    line = cli.format_event(event, as_json=False, now=0.0)
    assert line.split("  ", 1)[1] == text


def test_events_are_one_json_object_for_programs() -> None:
    line = cli.format_event(ev.FilterAdded(3, Direction.EGRESS, 7, 1, "u32", None, False), as_json=True, now=1.5)
    assert json.loads(line) == {
        "time": 1.5, "event": "FilterAdded", "ifindex": 3, "direction": "egress", "priority": 7, "handle": 1,
        "kind": "u32", "prog_id": None, "owned": False,
    }
