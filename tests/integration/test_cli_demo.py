"""`asynctc demo` on the real kernel: the whole story, and Ctrl-C in the middle leaves nothing behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from _children import CHILD_TIMEOUT, default_sigint, readline, stop
from _children import run as run_child

from asynctc.testing import ip

pytestmark = pytest.mark.kernel


def _namespaces() -> set[str]:
    return set(ip("netns", "list").stdout.split())


@pytest.mark.parametrize("backend", ["bpf_link", "netlink"])
def test_demo_on_the_real_kernel(backend: str) -> None:
    proc = run_child([sys.executable, "-m", "asynctc.cli", "demo", "--backend", backend])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"backend: {backend} (real kernel)" in out
    assert "counted 10" in out
    assert "demo_v1 10, demo_v2 5" in out
    method = "link_update" if backend == "bpf_link" else "netlink_replace"
    assert f"by {method}" in out
    made = re.search(r"created namespaces (\S+) and (\S+),", out)
    assert made is not None
    assert not {made.group(1), made.group(2)} & _namespaces()


def test_ctrl_c_during_the_demo_removes_everything() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "asynctc.cli", "demo", "--backend", "bpf_link", "--hold"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        assert proc.stdout is not None
        lines = []
        while line := readline(proc.stdout):
            lines.append(line)
            if line.startswith("holding:"):
                break
        made = re.search(r"created namespaces (\S+) and (\S+),", "".join(lines))
        assert made is not None, lines
        assert {made.group(1), made.group(2)} <= _namespaces()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=CHILD_TIMEOUT)
        assert proc.returncode == 128 + signal.SIGINT
        assert f"removed namespaces {made.group(1)}, {made.group(2)}" in rest
        assert not {made.group(1), made.group(2)} & _namespaces()
    finally:
        stop(proc)
