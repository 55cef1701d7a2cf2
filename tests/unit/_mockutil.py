"""Helpers for the mock tests: what a MockKernel holds, and whether it matches a session's registry."""

from __future__ import annotations

import asynctc
from asynctc import Direction
from asynctc_mock import MockKernel


def kernel_entries(kernel: MockKernel, *, foreign: frozenset[object] = frozenset()) -> set[tuple[object, ...]]:
    """Everything on every hook of the kernel, as ("tcx", link_id) / ("cls_bpf", ifindex, dir, prio,
    handle) keys, minus `foreign` ones."""
    out: set[tuple[object, ...]] = set()
    for ifindex in kernel.devices().values():
        for d in Direction:
            for e in kernel.hook(ifindex, d).entries:
                out.add(("tcx", e.link_id) if e.link_id else ("tcx-plain", ifindex, d, e.prog_id))
            for f in kernel.filters(ifindex, d):
                out.add(("cls_bpf", ifindex, d, f.priority, f.handle))
    return out - foreign


def session_entries(session: asynctc.Session) -> set[tuple[object, ...]]:
    """The kernel keys of the attachments a session owns."""
    out: set[tuple[object, ...]] = set()
    for att in session.attachments:
        i = att.info
        if i.link_id is not None:
            out.add(("tcx", i.link_id))
        else:
            out.add(("cls_bpf", i.ifindex, i.direction, i.priority, i.handle))
    return out


def qdiscs(kernel: MockKernel) -> dict[str, str | None]:
    """{device: creator} of the devices that have a qdisc."""
    out: dict[str, str | None] = {}
    for name in kernel.devices():
        q = kernel.qdisc(name)
        if q is not None:
            out[name] = q.creator
    return out


def assert_consistent(kernel: MockKernel, session: asynctc.Session,
                      foreign: frozenset[object] = frozenset()) -> None:
    """No leaked attachment, no lost one: the kernel holds exactly what the session knows it owns."""
    assert kernel_entries(kernel, foreign=foreign) == session_entries(session)
    for att in session.attachments:
        assert att.state is asynctc.State.ATTACHED
