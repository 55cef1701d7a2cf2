"""Ownership is proven, never assumed from a path: adopting a pin needs asynctc's own record naming the
session's owner, and no other live session may hold it (in this process or another)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import trio

import asynctc
from asynctc import programs
from asynctc.lowlevel import bpf
from asynctc.testing import VethPair

pytestmark = pytest.mark.kernel

BACKENDS = ["bpf_link", "netlink"]


def pins_in(bpffs: str) -> list[str]:
    """What is pinned in a bpffs directory (the mount's own progs.debug and maps.debug are not pins)."""
    return sorted(n for n in os.listdir(bpffs) if not n.endswith(".debug"))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_pin_of_another_owner_is_not_adopted(veth: VethPair, bpffs: str, backend: str) -> None:
    path = os.path.join(bpffs, "theirs")
    async with asynctc.open_session(backend, netns=veth.netns_a, owner="alpha") as s:
        att = await s.attach(veth.a, "ingress", programs.constant("pass"))
        await att.pin(path)
    async with asynctc.open_session(backend, netns=veth.netns_a, owner="beta") as s:
        with pytest.raises(asynctc.NotOwned, match=r"owner 'alpha'.*foreign=True"):
            await s.adopt_pinned(path)
        assert s.attachments == ()
        # the explicit opt-in of recovery tools
        took = await s.adopt_pinned(path, foreign=True)
        await took.unpin()  # ours now: detached when the session closes
    async with asynctc.open_session(backend, netns=veth.netns_a) as s:
        assert (await s.query(veth.a, "ingress")).entries == ()
    assert pins_in(bpffs) == []


async def test_a_link_pinned_outside_asynctc_is_not_adopted(veth: VethPair, bpffs: str) -> None:
    """A tcx link another program created and pinned: listed, never taken over (nor unpinned, nor
    detached) without the opt-in."""
    path = os.path.join(bpffs, "foreign")
    prog = programs.constant("pass")

    def make() -> int:
        from asynctc.lowlevel.netns import NetnsRunner

        runner = NetnsRunner(veth.netns_a, trio.CapacityLimiter(1))
        try:
            def create() -> int:
                import socket

                fd = bpf.link_create_tcx(prog.fd, socket.if_nametoindex(veth.a), bpf.BPF_TCX_INGRESS)
                bpf.obj_pin(fd, path)
                return fd

            return runner.call_in_netns(create)
        finally:
            runner.close()

    fd = await trio.to_thread.run_sync(make)
    try:
        async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
            with pytest.raises(asynctc.NotOwned, match="not pinned by asynctc"):
                await s.adopt_pinned(path)
            hook = await s.query(veth.a, "ingress")
            assert [(e.prog_id, e.owned) for e in hook.entries] == [(prog.id, False)]
        assert os.path.exists(path)  # untouched
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_two_live_sessions_cannot_both_hold_one_pin(veth: VethPair, bpffs: str, backend: str) -> None:
    path = os.path.join(bpffs, "held")
    async with asynctc.open_session(backend, netns=veth.netns_a) as s1:
        att = await s1.attach(veth.a, "ingress", programs.constant("pass"))
        await att.pin(path)
        async with asynctc.open_session(backend, netns=veth.netns_a) as s2:
            with pytest.raises(asynctc.NotOwned, match=r"held by a live asynctc session \(pid"):
                await s2.adopt_pinned(path)
        # another process with the same owner is refused too
        script = textwrap.dedent(f"""
            import trio, asynctc
            async def main():
                async with asynctc.open_session({backend!r}, netns={veth.netns_a!r}) as s:
                    try:
                        await s.adopt_pinned({path!r})
                    except asynctc.NotOwned as exc:
                        print("refused:", exc)
            trio.run(main)
        """)
        proc = await trio.to_thread.run_sync(functools.partial(
            subprocess.run, [sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
            timeout=60))
        assert proc.returncode == 0, proc.stderr
        assert f"pid {os.getpid()}" in proc.stdout, proc.stdout
    # once the holder closed, adoption works
    async with asynctc.open_session(backend, netns=veth.netns_a) as s3:
        again = await s3.adopt_pinned(path)
        await again.detach()
    assert pins_in(bpffs) == []


async def test_a_record_left_without_its_link_is_reported_and_removed(veth: VethPair, bpffs: str) -> None:
    """A pin interrupted after asynctc's record was written and before the link was pinned: the link died
    with its process, the record is stale."""
    from asynctc_bpf_link import RECORD_SUFFIX, LinkRecord, write_record

    path = os.path.join(bpffs, "half")
    record = LinkRecord("asynctc:1.1.1", 1, bpf.BPF_TCX_INGRESS)
    await trio.to_thread.run_sync(write_record, path + RECORD_SUFFIX, record.encode())
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        with pytest.raises(asynctc.PinError, match="interrupted.*removed"):
            await s.adopt_pinned(path)
    assert pins_in(bpffs) == []


async def test_a_record_left_behind_never_vouches_for_another_link(veth: VethPair, bpffs: str) -> None:
    """A record a crash left at a path (its link died with its process), then another program's link pinned
    there: the record names a link id and hook, so the foreign link is not adopted (nor detached)."""
    from asynctc_bpf_link import RECORD_SUFFIX, LinkRecord, write_record

    path = os.path.join(bpffs, "reused")
    prog = programs.constant("pass")

    def foreign_link_under_a_stale_record() -> int:
        from asynctc.lowlevel.netns import NetnsRunner

        runner = NetnsRunner(veth.netns_a, trio.CapacityLimiter(1))
        try:
            def make() -> int:
                import socket

                ifindex = socket.if_nametoindex(veth.a)
                stale = LinkRecord("asynctc:1.1.1", ifindex, bpf.BPF_TCX_INGRESS, link_id=1)
                write_record(path + RECORD_SUFFIX, stale.encode())
                fd = bpf.link_create_tcx(prog.fd, ifindex, bpf.BPF_TCX_INGRESS)
                bpf.obj_pin(fd, path)
                return fd

            return runner.call_in_netns(make)
        finally:
            runner.close()

    fd = await trio.to_thread.run_sync(foreign_link_under_a_stale_record)
    try:
        async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
            with pytest.raises(asynctc.NotOwned, match="not the one asynctc's record"):
                await s.adopt_pinned(path)
            hook = await s.query(veth.a, "ingress")
            assert [(e.prog_id, e.owned) for e in hook.entries] == [(prog.id, False)]
    finally:
        os.close(fd)
        os.unlink(path)
        os.unlink(path + RECORD_SUFFIX)
