"""Bounded handling of the child processes tests start.

Every wait on a child has a timeout. Python children run with faulthandler on (PYTHONFAULTHANDLER=1,
set in conftest.py), so a child the test gives up on is stopped with SIGABRT: faulthandler writes every
thread's stack to its stderr, which `stop` prints (pytest shows it with the failure) before reaping it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import IO

# How long a test waits for a child (or one line from it) before it calls the child hung.
CHILD_TIMEOUT = 30.0


def default_sigint() -> None:
    """preexec_fn for a child the test interrupts with SIGINT: give it SIGINT's default disposition, so a
    Python child gets KeyboardInterrupt even when the tests run with SIGINT ignored (a background job),
    which a child would otherwise inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def readline(stream: IO[str], timeout: float = CHILD_TIMEOUT) -> str:
    """One line from a child's pipe ("" at its end), or AssertionError after `timeout` seconds without one.

    The read runs in a thread (a select() on the pipe would miss lines already in the stream's buffer); one
    that times out ends when the test stops the child and the pipe closes."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        raise AssertionError(f"no line within {timeout}s")
    if not lines:
        raise AssertionError("reading a line from the child failed (the reader's error is printed above)")
    return lines[0]


def stop(proc: subprocess.Popen[str]) -> None:
    """Reap `proc` if it still runs (the test failed or gave up on it), with SIGABRT so a Python child
    dumps its stacks (printed here), SIGKILL if that does not end it; then close its pipes."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGABRT)
        try:
            _, err = proc.communicate(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate(timeout=CHILD_TIMEOUT)
        if err:
            print(f"stderr of the stopped child {proc.args!r}:\n{err}", file=sys.stderr)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def run(
    args: list[str], *, timeout: float = CHILD_TIMEOUT, env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run(args, capture_output=True, text=True, env=env) for a Python child; one still running
    after `timeout` seconds is stopped (its stacks printed) and the test fails."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{args!r} did not finish within {timeout}s (its stacks are in the captured "
                             f"stderr)") from None
    finally:
        stop(proc)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
