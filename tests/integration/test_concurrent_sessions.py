"""Two asynctc sessions on one device, in one process or two, with different owners, never delete each
other's filters or the clsact qdisc under them (the device lock every asynctc process honours), and a
foreign filter on the device is never touched."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import trio
import trio.lowlevel

import asynctc
from asynctc import programs
from asynctc.testing import VethPair, tc

pytestmark = pytest.mark.kernel

CYCLES = 25


def u32_present(netns: str) -> bool:
    out = tc("-j", "filter", "show", "dev", "veth0", "ingress", netns=netns).stdout
    return any(f.get("kind") == "u32" for f in json.loads(out or "[]"))


async def hammer(netns: str, owner: str, keep: bool = False) -> None:
    """Attach and detach on one hook, over and over: each session's last detach deletes the clsact qdisc
    it created when nothing else is on it, while the other session attaches. Every attach must succeed
    and, with `keep`, an attachment kept for the whole run is never severed."""
    async with asynctc.open_session("netlink", netns=netns, owner=owner) as s:
        kept = await s.attach("veth0", "ingress", programs.constant("pass")) if keep else None
        for _ in range(CYCLES):
            att = await s.attach("veth0", "ingress", programs.constant("pass"))
            await trio.lowlevel.checkpoint()  # let the other session run between our steps
            await att.detach()
            if kept is not None:
                assert kept.state is asynctc.State.ATTACHED, kept.sever_reason
        if kept is not None:
            hook = await s.query("veth0", "ingress")
            assert [e.prog_id for e in hook.entries if e.owned] == [kept.info.prog_id]
            await kept.detach()


@pytest.mark.parametrize("keep", [False, True])
async def test_two_sessions_in_one_process_keep_each_others_filters(veth: VethPair, keep: bool) -> None:
    ns = veth.netns_a
    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            n.start_soon(hammer, ns, "alpha", keep)
            n.start_soon(hammer, ns, "beta", False)
    # Nothing of either session is left. (The clsact qdisc may stay: it is deleted only by the session that
    # created it, and only when it is empty then; the other session's last filter may have kept it.)
    assert json.loads(tc("-j", "filter", "show", "dev", "veth0", "ingress", netns=ns).stdout or "[]") == []


SCRIPT = textwrap.dedent("""
    import sys, trio
    sys.path.insert(0, {testdir!r})
    from test_concurrent_sessions import hammer
    trio.run(hammer, {netns!r}, {owner!r}, {keep!r})
    print("ok")
""")


@pytest.mark.parametrize("foreign", [False, True])
async def test_two_processes_keep_each_others_filters(veth: VethPair, foreign: bool) -> None:
    ns = veth.netns_a
    if foreign:
        tc("qdisc", "add", "dev", "veth0", "clsact", netns=ns)
        tc("filter", "add", "dev", "veth0", "ingress", "prio", "7", "u32", "match", "u32", "0", "0", netns=ns)
    testdir = os.path.dirname(os.path.abspath(__file__))
    procs = [
        subprocess.Popen([sys.executable, "-X", "faulthandler", "-c",
                          SCRIPT.format(testdir=testdir, netns=ns, owner=owner, keep=owner == "alpha")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for owner in ("alpha", "beta")
    ]
    for p in procs:
        out, err = await trio.to_thread.run_sync(functools.partial(p.communicate, timeout=120))
        assert p.returncode == 0 and out.strip() == "ok", err
    assert u32_present(ns) is foreign  # a foreign filter is untouched, and its clsact with it
