"""`asynctc monitor` on the real kernel: device names and tc's parents and handles, unprivileged as `ip monitor`
is, and a reader that goes away (`asynctc monitor | head -1`) ends it quietly."""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from typing import IO

import pytest

from asynctc.lowlevel.netns import netns_path
from asynctc.testing import ip, tc

pytestmark = pytest.mark.kernel

UNPRIVILEGED = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]


class Lines:
    """The lines of a stream, read by a thread so that every wait has a deadline (a select on a buffered
    stream would miss lines already in its buffer)."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                self._queue.put(line)
        except (OSError, ValueError):  # closed by the test
            pass

    def next(self, timeout: float) -> str:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s") from None


def _monitor(netns: str, *, privileged: bool, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "asynctc.cli", "monitor", "--json"]
    if not privileged:  # root without any capability, inside the namespace, as run_without_capabilities does
        cmd = ["nsenter", f"--net={netns_path(netns)}", *UNPRIVILEGED, *cmd]
    else:
        cmd += ["--netns", netns]
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, bufsize=1)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.mark.parametrize("privileged", [True, False], ids=["root", "unprivileged"])
def test_monitor_names_devices_and_writes_tcs_parents(netns: str, privileged: bool) -> None:
    ip("link", "add", "mon0", "type", "veth", "peer", "name", "mon1", netns=netns)
    proc = _monitor(netns, privileged=privileged)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        assert "watching" in err.next(60)  # subscribed: later changes are reported
        tc("qdisc", "add", "dev", "mon0", "clsact", netns=netns)
        tc("filter", "add", "dev", "mon0", "ingress", "prio", "7", "u32", "match", "u32", "0", "0", netns=netns)
        events: list[dict[str, object]] = []
        while not any(e["event"] == "FilterAdded" and e["handle_tc"] == "800::800" for e in events):
            events.append(json.loads(out.next(30)))
        qdisc = next(e for e in events if e["event"] == "QdiscAdded" and e["kind"] == "clsact")
        assert qdisc["dev"] == "mon0" and qdisc["parent_tc"] == "ffff:fff1" and qdisc["handle_tc"] == "ffff:"
        flt = events[-1]
        assert flt["dev"] == "mon0" and flt["direction"] == "ingress" and flt["parent_tc"] == "ffff:fff2"
        assert flt["priority"] == 7 and flt["kind"] == "u32" and flt["owned"] is False
    finally:
        _stop(proc)


def test_monitor_in_tcs_words_for_people(netns: str) -> None:
    ip("link", "add", "mon0", "type", "veth", "peer", "name", "mon1", netns=netns)
    proc = subprocess.Popen([sys.executable, "-m", "asynctc.cli", "monitor", "--netns", netns],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = Lines(proc.stdout), Lines(proc.stderr)
        assert "watching" in err.next(60)
        tc("qdisc", "add", "dev", "mon0", "clsact", netns=netns)
        line = out.next(30)
        ifindex = json.loads(ip("-j", "link", "show", "mon0", netns=netns).stdout)[0]["ifindex"]
        assert line.split("  ", 1)[1].strip() == (
            f"QdiscAdded       dev mon0 ifindex {ifindex} qdisc clsact handle ffff: parent ffff:fff1")
    finally:
        _stop(proc)


@pytest.mark.parametrize("privileged", [True, False], ids=["root", "unprivileged"])
def test_a_reader_that_goes_away_ends_the_monitor_quietly(netns: str, privileged: bool) -> None:
    """`asynctc monitor | head -1`: the reader closes the pipe after one line; the monitor's next write fails
    and it ends with status 0 and nothing on stderr but its greeting."""
    r, w = os.pipe()
    proc = _monitor(netns, privileged=privileged, stdout=w)
    os.close(w)
    try:
        assert proc.stderr is not None
        err = Lines(proc.stderr)
        assert "watching" in err.next(60)
        ip("link", "add", "gone0", "type", "veth", "peer", "name", "gone1", netns=netns)
        first = b""
        while not first.endswith(b"\n"):  # one line, read as `head -1` does
            ready, _, _ = select.select([r], [], [], 30)
            assert ready, "no event within 30s"
            first += os.read(r, 1)
        assert json.loads(first)["event"] == "DeviceAdded"
    finally:
        os.close(r)
    try:
        deadline = time.monotonic() + 60
        n = 0
        while proc.poll() is None and time.monotonic() < deadline:
            ip("link", "add", f"x{n}", "type", "veth", "peer", "name", f"y{n}", netns=netns)
            ip("link", "del", f"x{n}", netns=netns)
            n += 1
        assert proc.wait(timeout=30) == 0
        with pytest.raises(AssertionError, match="no line within"):
            err.next(1)  # nothing after the greeting: no traceback, no complaint
    finally:
        _stop(proc)
