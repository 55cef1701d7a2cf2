"""A plain trio application with cls_bpf filters (netlink backend), stopped by SIGTERM or Ctrl-C: with
asynctc.run_until_interrupted it removes its filters and its clsact qdisc before exiting (checked with
`tc`); without it, SIGTERM kills it and the filters stay (legacy filters outlive their process)."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import textwrap

import pytest
from _children import default_sigint

from asynctc.testing import VethPair, tc

pytestmark = pytest.mark.kernel

APP = """
import sys
import trio
import asynctc
from asynctc import programs

async def main(netns, dev):
    async with asynctc.open_session("netlink", netns=netns) as session:
        await session.attach(dev, "ingress", programs.constant("pass"))
        async with session.open_attachment(dev, "egress", programs.constant("pass")):
            print("attached", flush=True)
            await trio.sleep_forever()

if sys.argv[1] == "helper":
    try:
        trio.run(asynctc.run_until_interrupted, main, sys.argv[2], sys.argv[3])
    except asynctc.Interrupted as exc:
        print(f"interrupted {exc.signum}", flush=True)
        sys.exit(exc.exit_code)
else:
    trio.run(main, sys.argv[2], sys.argv[3])
"""


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"the application printed nothing within {timeout} s")
    return proc.stdout.readline().strip()


def start(mode: str, veth: VethPair) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(APP), mode, veth.netns_a, veth.a],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        assert read_line(proc, 60) == "attached", (
            proc.stderr.read() if proc.stderr is not None and proc.poll() is not None else "")
    except BaseException:
        proc.kill()
        proc.communicate(timeout=30)
        raise
    return proc


def filters(veth: VethPair) -> str:
    return "".join(tc("filter", "show", "dev", veth.a, d, netns=veth.netns_a).stdout for d in ("ingress", "egress"))


def qdisc_kinds(veth: VethPair) -> list[str]:
    return [q["kind"] for q in json.loads(tc("-j", "qdisc", "show", "dev", veth.a, netns=veth.netns_a).stdout)]


def stop(proc: subprocess.Popen[str], signum: int) -> tuple[str, str]:
    try:
        proc.send_signal(signum)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_helper_removes_the_filters_on_a_signal(veth: VethPair, signum: int) -> None:
    # The child gets SIGINT's default disposition even when this run ignores it (a background job), as a
    # program started from a terminal has.
    proc = start("helper", veth)
    assert "bpf" in filters(veth) and "clsact" in qdisc_kinds(veth)
    out, err = stop(proc, signum)
    assert proc.returncode == 128 + signum, err
    assert out.strip() == f"interrupted {signum}"
    assert "Traceback" not in err
    assert filters(veth).strip() == ""
    assert "clsact" not in qdisc_kinds(veth)


def test_without_the_helper_sigterm_leaves_the_filters_behind(veth: VethPair) -> None:
    # Why the helper exists: SIGTERM's default action ends the process with no cleanup at all.
    proc = start("plain", veth)
    stop(proc, signal.SIGTERM)
    assert proc.returncode == -signal.SIGTERM
    assert "bpf" in filters(veth)  # the namespace (and these filters) go when the fixture removes it
