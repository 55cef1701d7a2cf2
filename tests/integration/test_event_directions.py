"""Filter events of a legacy `ingress` qdisc on the real kernel: their direction is the ingress hook whatever
parent spelling the kernel reports, and a foreign `tc filter del` spelled otherwise than the filter was
added still severs the attachment it removes. One fresh namespace (and veth pair) per test.

The kernel reports a filter message's parent as its request spelled it (`ffff:`, `ffff:fff1`, `ffff:fff2`,
`ffff:fff3` all reach an `ingress` qdisc's one block), and a dump reports the spelling last used on the
block; a dump at ffff:fff3 returns that block too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from _netlinkutil import raw_netlink

import asynctc
from asynctc import events as ev
from asynctc import programs
from asynctc.lowlevel import codec
from asynctc.lowlevel.events import open_netlink_event_source
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.testing import VethPair, compile_bpf, compile_bpf_skip_reason, ip, tc

pytestmark = pytest.mark.kernel

IN = asynctc.Direction.INGRESS
CLASSIFIER_C = """
#include <linux/bpf.h>
__attribute__((section("classifier"), used)) int pass(void *skb) { return 0; }
char _license[] __attribute__((section("license"), used)) = "GPL";
"""


@pytest.fixture
def classifier(tmp_path: Path) -> Path:
    """A BPF object with a direct-action `classifier` section, for `tc filter add ... bpf da obj`."""
    reason = compile_bpf_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    src = tmp_path / "pass.c"
    src.write_text(CLASSIFIER_C)
    return compile_bpf(src, tmp_path / "pass.o")


def ifindex_of(netns: str, dev: str) -> int:
    return int(json.loads(ip("-j", "link", "show", "dev", dev, netns=netns).stdout)[0]["ifindex"])




async def collect(mon: asynctc.Monitor, count: int, pred: Callable[[ev.Event], bool],
                  timeout: float = 10) -> list[ev.Event]:
    got: list[ev.Event] = []
    with trio.fail_after(timeout):
        async for event in mon:
            if pred(event):
                got.append(event)
                if len(got) == count:
                    return got
    raise AssertionError(f"the monitor ended after {got}")


def filter_events(event: ev.Event) -> bool:
    return isinstance(event, ev.FilterAdded | ev.FilterRemoved)


def tc_bpf(verb: str, ns: str, parent: str, prio: int, obj: Path | None = None) -> None:
    tail = ["bpf", "da", "obj", str(obj), "sec", "classifier"] if obj is not None else ["bpf"]
    tc("filter", verb, "dev", "veth0", "parent", parent, "prio", str(prio), "handle", "1", *tail, netns=ns)


# --------------------------------------------------------------------------------------------------------


async def test_every_filter_event_of_an_ingress_qdisc_says_ingress(veth: VethPair, classifier: Path) -> None:
    ns = veth.netns_a
    tc("qdisc", "add", "dev", "veth0", "ingress", netns=ns)
    ifx = ifindex_of(ns, "veth0")
    added_with = {10: "ffff:", 11: "ffff:fff1", 12: "ffff:fff2", 13: "ffff:fff3"}
    deleted_with = {10: "ffff:fff2", 11: "ffff:fff3", 12: "ffff:", 13: "ffff:fff1"}
    async with asynctc.open_session("netlink", netns=ns) as s, s.open_monitor() as mon:
        for prio, parent in added_with.items():
            tc_bpf("add", ns, parent, prio, classifier)
        tc("filter", "add", "dev", "veth0", "parent", "ffff:", "prio", "15", "u32", "match", "u32", "0", "0",
           netns=ns)
        added = await collect(mon, 5, filter_events)
        assert all(isinstance(e, ev.FilterAdded) for e in added), added
        assert [(e.ifindex, e.direction, e.priority, e.handle, e.kind) for e in added  # type: ignore[union-attr]
                ] == [(ifx, IN, p, 1, "bpf") for p in added_with] + [(ifx, IN, 15, 0x80000800, "u32")]

        # what a session's own baseline makes of the same block: every filter once, ingress, and a resync
        # over it finds nothing changed
        async with open_netlink_event_source(NetnsRunner(ns, trio.CapacityLimiter(2))) as source:
            assert sorted((k[1], k[3], k[4]) for k in source.filters if k[0] == ifx) == sorted(
                [(IN, p, 1) for p in added_with] + [(IN, 15, 0x80000800)])
            assert await source.resync("a test") == [ev.Resynced("a test")]

        for prio, parent in deleted_with.items():
            tc_bpf("del", ns, parent, prio)
        tc("filter", "del", "dev", "veth0", "parent", "ffff:fff3", "prio", "15", "handle", "800::800", "u32",
           netns=ns)
        removed = await collect(mon, 5, filter_events)
        assert all(isinstance(e, ev.FilterRemoved) for e in removed), removed
        assert [(e.ifindex, e.direction, e.priority, e.handle, e.kind) for e in removed  # type: ignore[union-attr]
                ] == [(ifx, IN, p, 1, "bpf") for p in deleted_with] + [(ifx, IN, 15, 0x80000800, "u32")]
        assert (await s.query("veth0", "ingress")).entries == ()


@pytest.mark.parametrize("spelling", ["ffff:", "ffff:fff1", "ffff:fff3"])
async def test_a_foreign_delete_spelled_otherwise_severs_the_attachment(
    veth: VethPair, bpffs: str, spelling: str
) -> None:
    """A netlink attachment on an `ingress` qdisc (pinned on clsact, its filter put back on an `ingress`
    qdisc at ffff:fff2, adopted), removed by `tc filter del` with another parent spelling: the session
    reports the removal as its own, on ingress, and severs the attachment."""
    ns = veth.netns_a
    ifx = ifindex_of(ns, "veth0")
    pin = os.path.join(bpffs, "att")
    prog = programs.constant("pass")
    async with asynctc.open_session("netlink", netns=ns) as s:
        att = await s.attach("veth0", "ingress", prog)
        await att.pin(pin)
        prio, handle = att.info.priority, att.info.handle
    assert prio is not None and handle is not None
    async with raw_netlink(ns) as nl:
        msgs = await nl.dump(lambda seq: codec.encode_dump_request(seq, codec.RTM_GETTFILTER, ifx,
                                                                   codec.INGRESS_PARENT))
        (ours,) = [m for m in msgs if isinstance(m, codec.FilterMsg) and m.handle == handle and m.priority == prio]
        assert ours.bpf_name is not None and ours.bpf_name.endswith(":pinned")
        tc("qdisc", "del", "dev", "veth0", "clsact", netns=ns)
        tc("qdisc", "add", "dev", "veth0", "ingress", netns=ns)
        flags = codec.NLM_F_REQUEST | codec.NLM_F_ACK | codec.NLM_F_CREATE | codec.NLM_F_EXCL
        await nl.request(lambda seq: codec.encode_filter(
            seq, codec.RTM_NEWTFILTER, flags, ifx, codec.INGRESS_PARENT, prio, handle, prog_fd=prog.fd,
            name=ours.bpf_name, gen_flags=codec.TCA_CLS_FLAGS_SKIP_HW), op="filter_add")

    async with asynctc.open_session("netlink", netns=ns) as s, s.open_monitor() as mon:
        adopted = await s.adopt_pinned(pin)
        assert (adopted.info.direction, adopted.info.priority, adopted.info.handle) == (IN, prio, handle)
        assert [(e.prog_id, e.owned) for e in (await s.query("veth0", "ingress")).entries] == [(prog.id, True)]
        tc("filter", "del", "dev", "veth0", "parent", spelling, "prio", str(prio), "handle", hex(handle), "bpf",
           netns=ns)
        with trio.fail_after(10):
            await adopted.wait_severed()
        assert adopted.state is asynctc.State.SEVERED
        (removed,) = await collect(mon, 1, lambda e: isinstance(e, ev.FilterRemoved))
        assert isinstance(removed, ev.FilterRemoved)
        assert (removed.direction, removed.priority, removed.handle, removed.owned) == (IN, prio, handle, True)
        (severed,) = await collect(mon, 1, lambda e: isinstance(e, ev.AttachmentSevered))
        assert isinstance(severed, ev.AttachmentSevered) and severed.attachment is adopted
