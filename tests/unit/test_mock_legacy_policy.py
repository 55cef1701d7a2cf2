"""The mock's legacy mode follows the netlink backend's policy (asynctc.lowlevel.tcpolicy): priorities,
owner tags in filter names, the default handle, skip_hw for software filters, pinned filters never reaped."""

from __future__ import annotations

import errno

import pytest
import trio

import asynctc
from asynctc import After, Before, Direction, First, Last
from asynctc.lowlevel.tcpolicy import PRIO_BASE, PRIO_STEP, choose_priority, format_tag, parse_tag
from asynctc_mock import MockKernel

IN = Direction.INGRESS


async def test_filters_are_placed_and_named_as_netlink_does(kernel: MockKernel, session: asynctc.Session) -> None:
    a = await session.attach("eth0", IN, kernel.program(name="prog_a"), mode="legacy")
    assert (a.info.priority, a.info.handle) == (PRIO_BASE, 1)  # the default handle is 1, as on netlink
    f = kernel.filters("eth0", IN)[0]
    tag = parse_tag(f.name)
    assert tag is not None and f.name == format_tag(tag.session_tag, "prog_a")
    assert (tag.owner, tag.prog_name, tag.pinned) == ("asynctc", "prog_a", False)
    b = await session.attach("eth0", IN, kernel.program(), mode="legacy", position=Last())
    c = await session.attach("eth0", IN, kernel.program(), mode="legacy", position=First())
    d = await session.attach("eth0", IN, kernel.program(), mode="legacy", position=After(a))
    assert (b.info.priority, c.info.priority) == (PRIO_BASE + PRIO_STEP, PRIO_BASE - PRIO_STEP)
    assert d.info.priority == choose_priority("after", {PRIO_BASE, PRIO_BASE + PRIO_STEP, PRIO_BASE - PRIO_STEP},
                                              PRIO_BASE)


async def test_no_gap_and_tcx_anchors_raise_as_on_netlink(kernel: MockKernel, session: asynctc.Session) -> None:
    await session.attach("eth0", IN, kernel.program(), mode="legacy", priority=4)
    five = await session.attach("eth0", IN, kernel.program(), mode="legacy", priority=5)
    with pytest.raises(asynctc.HookFull, match=r"\[mock backend\].*priority=") as full:
        await session.attach("eth0", IN, kernel.program(), mode="legacy", position=Before(five))
    assert full.value.errno == errno.ERANGE
    link = await session.attach("eth0", IN, kernel.program())
    with pytest.raises(asynctc.AnchorNotFound, match="cls_bpf filter") as missing:
        await session.attach("eth0", IN, kernel.program(), mode="legacy", position=After(link))
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(ValueError, match="handle"):
        await session.attach("eth0", IN, kernel.program(), mode="legacy", handle=0)


async def test_software_filters_skip_the_hardware(kernel: MockKernel, session: asynctc.Session) -> None:
    kernel.add_device("nic0", offload=True)
    att = await session.attach("nic0", IN, kernel.program("drop"), mode="legacy", offload="never")
    f = kernel.filters("nic0", IN)[0]
    assert f.skip_hw and not f.in_hw and not f.skip_sw and not att.info.offloaded
    assert kernel.send("nic0", IN) == "drop"  # in software


async def test_concurrent_attaches_choose_distinct_priorities(kernel: MockKernel) -> None:
    """One session's attaches are serialised per device; two sessions racing for a priority choose again."""
    kernel.set_latency(0.001, "filter_dump")
    async with asynctc.open_session(backend="mock", kernel=kernel) as s1, \
            asynctc.open_session(backend="mock", kernel=kernel) as s2:
        async with trio.open_nursery() as n:
            for i in range(4):  # two each: an attach loses a race at most twice (3 attempts)
                n.start_soon(lambda s: s.attach("eth0", IN, kernel.program(), mode="legacy"), s1 if i % 2 else s2)
        assert len({f.priority for f in kernel.filters("eth0", IN)}) == 4
    assert kernel.filters("eth0", IN) == ()


async def test_pinned_filters_are_never_reaped(kernel: MockKernel) -> None:
    async with asynctc.open_session(backend="mock", kernel=kernel, owner="svc") as dead:
        kept = await dead.attach("eth0", IN, kernel.program(name="kept"), mode="legacy")
        gone = await dead.attach("eth0", IN, kernel.program(name="gone"), mode="legacy")
        await kept.pin("/sys/fs/bpf/kept")
        tags = [parse_tag(f.name) for f in kernel.filters("eth0", IN)]
        names = {t.prog_name: t for t in tags if t is not None}
        assert names["kept"].pinned and not names["gone"].pinned
        kernel.kill_process(names["gone"].session_tag)
        async with asynctc.open_session(backend="mock", kernel=kernel, owner="svc") as live:
            removed = await live.reap_orphans()
            assert [e.priority for e in removed] == [gone.info.priority]
            assert [f.priority for f in kernel.filters("eth0", IN)] == [kept.info.priority]
    async with asynctc.open_session(backend="mock", kernel=kernel, owner="svc") as later:
        adopted = await later.adopt_pinned("/sys/fs/bpf/kept")
        await adopted.unpin()  # the filter is the later session's now, under its own tag
        tag = parse_tag(kernel.filters("eth0", IN)[0].name)
        assert tag is not None and not tag.pinned and tag.prog_name == "kept"
        assert kernel.tag_alive(tag.session_tag) and tag.session_tag != names["kept"].session_tag
    assert kernel.filters("eth0", IN) == ()  # detached with the later session


async def test_a_legacy_attach_refuses_expected_revision(kernel: MockKernel, session: asynctc.Session) -> None:
    """Legacy tc has no revision: an expected_revision is refused, never silently ignored."""
    rev = (await session.query("eth0", IN)).revision
    with pytest.raises(asynctc.TCError, match="expected_revision needs a hook with revisions"):
        await session.attach("eth0", IN, kernel.program(), mode="legacy", expected_revision=rev)
    assert kernel.filters("eth0", IN) == () and kernel.qdisc("eth0") is None

