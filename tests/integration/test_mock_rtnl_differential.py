"""MockKernel's rtnetlink against the real kernel: one seeded random sequence of tc operations, sent through
the real transport to a fresh namespace and to a MockKernel with the same devices, every answer compared.

Compared: each request's errno and extended-ACK text and the messages it was answered with (NLM_F_ECHO,
RTM_GETTFILTER), every dump's messages in order, and the RTNLGRP_TC notifications each operation caused.
Sequence numbers and port ids differ by nature and are left out; program ids and tags are the real ones on
both sides (the mock holds the real programs). u32 filters are added with `tc` on the kernel and with
`MockKernel.add_foreign_filter` on the mock. `ASYNCTC_DIFF_OPS` sets the length (default 300),
`ASYNCTC_DIFF_SEED` the seed (default: random, printed on failure).
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trio
from _children import CHILD_TIMEOUT
from _netlinkutil import veth_pair_netns

import asynctc
from asynctc.lowlevel import codec as c
from asynctc.lowlevel.kernel import LINUX, Kernel, NetlinkSocket
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.lowlevel.nlsock import nonblocking_receiver
from asynctc.lowlevel.transport import NetlinkError, NetlinkTransport, open_transport
from asynctc_mock import KernelError, MockKernel

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, tc and BPF programs"),
]

OPS = int(os.environ.get("ASYNCTC_DIFF_OPS", "300"))
SEED = int(os.environ.get("ASYNCTC_DIFF_SEED", str(random.randrange(1 << 32))))

CREATE, EXCL, REPLACE, ECHO = c.NLM_F_CREATE, c.NLM_F_EXCL, c.NLM_F_REPLACE, c.NLM_F_ECHO
REQ = c.NLM_F_REQUEST | c.NLM_F_ACK
INGRESS_Q = 0xFFFFFFF1
PARENTS = [c.INGRESS_PARENT, c.EGRESS_PARENT, INGRESS_Q, 0xFFFF0000]
PRIOS = [0, 1, 2, 3, 7, 0x8000, 0xBFFF, 0xC000]
HANDLES = [0, 1, 2, 3, 0x80000000, 0x80000800, 0x80000801, 0x80100800]


@dataclass(frozen=True)
class Side:
    name: str
    nl: NetlinkTransport
    events: NetlinkSocket

    def drain(self) -> list[Any]:
        out: list[Any] = []
        receiver = nonblocking_receiver(self.events)
        while True:
            try:
                data = receiver.recv()
            except BlockingIOError:
                return out
            out.extend(_norm(m) for m in c.decode_messages(data))


def _norm(m: c.Message) -> Any:
    """A decoded message without what differs by nature (seq, portid)."""
    if isinstance(m, (c.FilterMsg, c.QdiscMsg, c.LinkMsg, c.ChainMsg, c.NlError, c.NlDone)):
        return replace(m, seq=0, portid=0)
    return (m.type, m.flags)


async def _answer(nl: NetlinkTransport, build: Callable[[int], bytes]) -> Any:
    try:
        return ("ok", [_norm(m) for m in await nl.request(build)])
    except NetlinkError as exc:
        return ("error", errno.errorcode.get(exc.errno or 0, exc.errno), exc.extack)


async def _dump(nl: NetlinkTransport, build: Callable[[int], bytes]) -> Any:
    try:
        return ("ok", [_norm(m) for m in await nl.dump(build)])
    except NetlinkError as exc:
        return ("error", errno.errorcode.get(exc.errno or 0, exc.errno), exc.extack)


@pytest.fixture
def diff_netns() -> Iterator[str]:
    with veth_pair_netns("atcd") as name:
        yield name


def _links(ns: str) -> list[tuple[int, str]]:
    out = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], check=True, capture_output=True, text=True,
                         timeout=CHILD_TIMEOUT).stdout
    return sorted((int(x["ifindex"]), str(x["ifname"])) for x in json.loads(out))


@pytest.fixture
async def sides(diff_netns: str) -> AsyncIterator[tuple[Side, Side, MockKernel, str]]:
    links = _links(diff_netns)
    assert [i for i, _n in links] == list(range(1, len(links) + 1)), links
    mock = MockKernel(devices=[n for _i, n in links])
    # MockKernel answers Kernel's netlink calls; it becomes a Kernel subclass with the bpf side's change.
    mock_kernel: Kernel = mock
    real_runner = NetnsRunner(diff_netns, trio.CapacityLimiter(4))
    mock_runner = NetnsRunner(None, trio.CapacityLimiter(4))
    kernels: list[tuple[str, NetnsRunner, Kernel]] = [
        ("kernel", real_runner, LINUX), ("mock", mock_runner, mock_kernel)]
    try:
        async with open_transport(real_runner) as real_nl, open_transport(mock_runner, kernel=mock_kernel) as mock_nl:
            socks = [await r.run(k.open_netlink_socket, (c.RTNLGRP_TC,), 4 << 20) for _n, r, k in kernels]
            try:
                yield (Side("kernel", real_nl, socks[0]), Side("mock", mock_nl, socks[1]), mock, diff_netns)
            finally:
                for s in socks:
                    s.close()
    finally:
        real_runner.close()
        mock_runner.close()
        mock.close()


def _tc_u32(ns: str, dev: str, prio: int) -> bool:
    proc = subprocess.run(["tc", "-n", ns, "filter", "add", "dev", dev, "ingress", "prio", str(prio), "u32",
                           "match", "u32", "0", "0"], capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    return proc.returncode == 0


@pytest.mark.timeout(3600)
async def test_mock_rtnl_matches_the_kernel(sides: tuple[Side, Side, MockKernel, str]) -> None:
    real, mock_side, mock, ns = sides
    rng = random.Random(SEED)
    progs = [asynctc.programs.constant(v, name=f"atcd_{v}") for v in ("pass", "drop", "next")]
    devs = {name: ifindex for name, ifindex in mock.devices().items() if name != "lo"}
    log: list[str] = []
    seen = {"ok": 0, "filters dumped": 0, "events": 0}
    try:
        for step in range(OPS):
            dev = rng.choice(sorted(devs))
            ifindex = devs[dev]
            kind_of_op = rng.choices(
                ["qadd", "qdel", "fadd", "fdel", "fget", "u32", "fdump", "qdump", "ldump"],
                [8, 4, 30, 14, 6, 4, 10, 3, 1])[0]
            what: str
            if kind_of_op == "u32":
                prio = rng.choice([p for p in PRIOS if p] + [5, 6])
                what = f"u32 dev {dev} prio {prio}"
                got_real: Any = _tc_u32(ns, dev, prio)
                try:
                    mock.add_foreign_filter(dev, "ingress", priority=prio, create_qdisc=False)
                    got_mock: Any = True
                except KernelError:
                    got_mock = False
            elif kind_of_op in ("fdump", "qdump", "ldump"):
                parent = rng.choice(PARENTS)
                what, dump_build = _dump_request(kind_of_op, dev, ifindex, parent)
                got_real, got_mock = await _dump(real.nl, dump_build), await _dump(mock_side.nl, dump_build)
                if kind_of_op == "ldump":  # the mock knows a device's name and index, not all its state
                    got_real = [(m.ifindex, m.name, m.flags) for m in got_real[1]]
                    got_mock = [(m.ifindex, m.name, m.flags) for m in got_mock[1]]
            else:
                build = _random_request(rng, kind_of_op, ifindex, [p.fd for p in progs])
                what = _describe(build(0))
                got_real, got_mock = await _answer(real.nl, build), await _answer(mock_side.nl, build)
            log.append(f"{step}: {what} -> {got_real}")
            if isinstance(got_real, tuple) and got_real[0] == "ok":
                seen["ok"] += 1
                if kind_of_op == "fdump" and got_real[1]:
                    seen["filters dumped"] += 1
            assert got_mock == got_real, f"step {step}: {what}\nkernel: {got_real}\nmock:   {got_mock}"
            ev_real, ev_mock = real.drain(), mock_side.drain()
            assert ev_mock == ev_real, f"step {step}: {what} notified\nkernel: {ev_real}\nmock:   {ev_mock}"
            seen["events"] += len(ev_real)
        # The sequence must have exercised the kernel, not only its refusals.
        assert seen["ok"] > OPS // 5 and seen["filters dumped"] > 0 and seen["events"] > OPS // 10, seen
    except AssertionError as exc:
        exc.add_note(f"seed {SEED} (ASYNCTC_DIFF_SEED), {OPS} operations; the last steps:\n" + "\n".join(log[-15:]))
        raise
    finally:
        for p in progs:
            p.close()


def _dump_request(op: str, dev: str, ifindex: int, parent: int) -> tuple[str, Callable[[int], bytes]]:
    if op == "fdump":
        return (f"filter dump dev {dev} parent {parent:#x}",
                lambda seq: c.encode_dump_request(seq, c.RTM_GETTFILTER, ifindex, parent))
    if op == "qdump":
        return "qdisc dump", lambda seq: c.encode_dump_request(seq, c.RTM_GETQDISC)
    return "link dump", lambda seq: c.encode_dump_request(seq, c.RTM_GETLINK)


def _random_request(rng: random.Random, op: str, ifindex: int, fds: list[int]) -> Callable[[int], bytes]:
    if op == "qadd":
        parent = rng.choice([INGRESS_Q] * 6 + [c.INGRESS_PARENT, 0xFFFF0000, 0xFFFFFFFF])
        handle = rng.choice([c.CLSACT_HANDLE] * 3 + [0, 0x10000])
        flags = REQ | rng.choice([CREATE | EXCL] * 3 + [CREATE, 0])
        kind = rng.choice(["clsact"] * 3 + ["ingress", None])
        attrs = [["TCA_KIND", kind]] if kind else []
        return lambda seq: c._encode_tc(seq, c.RTM_NEWQDISC, flags, ifindex, parent, handle, 0, attrs)
    if op == "qdel":
        parent = rng.choice([INGRESS_Q] * 4 + [c.INGRESS_PARENT, 0xFFFF0000, 0xFFFFFFFF, 0])
        handle = rng.choice([c.CLSACT_HANDLE, 0])
        qkind = rng.choice([None, None, "clsact", "ingress"])
        return lambda seq: c.encode_qdisc_del(seq, ifindex, parent, handle, kind=qkind)
    parent = rng.choice([c.INGRESS_PARENT] * 4 + [c.EGRESS_PARENT] * 3 + [INGRESS_Q, 0xFFFF0000])
    prio = rng.choice(PRIOS)
    handle = rng.choice(HANDLES[:4] * 3 + HANDLES[4:])
    if op == "fadd":
        flags = REQ | rng.choice([CREATE | EXCL] * 4 + [CREATE | REPLACE, REPLACE, CREATE]) | rng.choice([0, ECHO])
        fd = rng.choice(fds)
        gen = rng.choice([0] * 6 + [c.TCA_CLS_FLAGS_SKIP_HW, c.TCA_CLS_FLAGS_SKIP_SW])
        name = rng.choice(["a", "b", None])
        direct = rng.random() < 0.9
        return lambda seq: c.encode_filter(seq, c.RTM_NEWTFILTER, flags, ifindex, parent, prio, handle,
                                           prog_fd=fd, name=name, direct_action=direct, gen_flags=gen)
    kind = rng.choice(["bpf", None, None, "u32"])
    if op == "fdel":
        if rng.random() < 0.1:
            return lambda seq: c.encode_filter(seq, c.RTM_DELTFILTER, REQ, ifindex, parent, 0, 0, 0, kind=None)
        return lambda seq: c.encode_filter(seq, c.RTM_DELTFILTER, REQ, ifindex, parent, prio, handle, kind=kind)
    return lambda seq: c.encode_filter_get(seq, ifindex, parent, prio, handle, kind=kind)


def _describe(msg: bytes) -> str:
    import struct

    _l, mtype, flags, _s, _p = struct.unpack_from("=IHHII", msg)
    _f, ifindex, handle, parent, info = struct.unpack_from("=BxxxiIII", msg, 16)
    return (f"type {mtype} flags {flags:#x} ifindex {ifindex} parent {parent:#x} handle {handle:#x} "
            f"prio {info >> 16} raw {msg.hex()}")
