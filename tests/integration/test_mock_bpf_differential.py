"""MockKernel against the real kernel, at the bpf(2) boundary: the same seeded random sequence of tcx
operations (link create with random positions, anchors and expected revisions, update, compare-and-swap
update, detach, close, link-less attach and detach, pins, qdiscs that hold the hook, devices deleted under
their links, queries) runs against both, in lockstep, and every answer is compared: the errno or the
result, the query contents (ids mapped by creation order) and the revisions.

The real side runs in a fresh network namespace with a veth pair (dva, dvb) and lo, through the real
`asynctc.lowlevel.bpf` calls made from a thread inside the namespace; pins go to a private bpffs mount.
The mock side is a MockKernel with devices of the same names and pins at the same paths.

ASYNCTC_DIFF_OPS sets the number of operations (default 300; a long run: 10000), ASYNCTC_DIFF_SEED the
seed (default 1).
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio

from asynctc.lowlevel import bpf
from asynctc.lowlevel.bpf import BPF_F_AFTER, BPF_F_BEFORE, BPF_F_ID, BPF_F_LINK, BPF_F_REPLACE, BpfError
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.testing import bpffs_mount, ip, tc, temp_netns
from asynctc_mock import MockKernel

pytestmark = pytest.mark.kernel

OPS = int(os.environ.get("ASYNCTC_DIFF_OPS", "300"))
SEED = int(os.environ.get("ASYNCTC_DIFF_SEED", "1"))
PROGRAMS = 70  # enough to fill one hook (63) and try a 64th
DEVICES = ("lo", "dva", "dvb")
HOOKS = (bpf.BPF_TCX_INGRESS, bpf.BPF_TCX_EGRESS)
PIN_NAMES = 4
MISSING_ID = 0x7FFF_0000  # an id neither kernel has handed out
BOGUS_IFINDEX = 0xFFFF_FF00
BPF_PROG_ATTACH, BPF_PROG_DETACH = 8, 9

Answer = tuple[str, object]


@dataclass
class Side:
    """One kernel's view: its Bpf, its program fds and ids, and its ifindexes by device name."""

    name: str
    bpf: bpf.Bpf
    prog_fds: list[int] = field(default_factory=list)
    prog_ids: list[int] = field(default_factory=list)
    xdp_fd: int = -1
    xdp_id: int = 0
    ifindex: dict[str, int] = field(default_factory=dict)


@dataclass
class Link:
    """A link both kernels made: its ids and the fds each side holds on it."""

    ids: dict[str, int]
    fds: dict[str, list[int]]


def attempt(fn: Callable[[], object]) -> Answer:
    try:
        return "ok", fn()
    except BpfError as exc:
        return "err", errno.errorcode.get(exc.errno or 0, exc.errno)


def raw_call(side: Side, cmd: int, fmt: str, *values: int, op: str) -> int:
    attr = ctypes.create_string_buffer(bpf.ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    return side.bpf.syscalls.bpf(cmd, attr, op)


class Differential:
    """The lockstep run: `step()` draws one operation, makes it on both sides and compares the answers."""

    def __init__(self, ns: str, bpffs: str, kernel: MockKernel, rng: random.Random) -> None:
        self.ns = ns
        self.bpffs = bpffs
        self.kernel = kernel
        self.rng = rng
        self.real = Side("real", bpf.LINUX)
        self.mock = Side("mock", kernel.bpf)
        self.sides = (self.real, self.mock)
        self.links: list[Link] = []
        self.pins: dict[int, int] = {}  # pin name index -> link index, as both kernels agree
        self.last_rev: dict[tuple[str, int], int] = {}
        self.log: list[str] = []
        self.outcomes: Counter[str] = Counter()
        self.pipe_r, self.pipe_w = os.pipe()  # an open fd that is no BPF object

    # -- setup and teardown ---------------------------------------------------------------------------------
    def setup(self) -> None:
        for i in range(PROGRAMS):
            insns = bpf.asm.mov64_imm(0, (0, 2, -1)[i % 3]) + bpf.asm.exit()
            for side in self.sides:
                fd = side.bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, insns, name=f"d{i}")
                side.prog_fds.append(fd)
                side.prog_ids.append(side.bpf.prog_info(fd).id)
            real, mock = (s.bpf.prog_info(s.prog_fds[-1]) for s in self.sides)
            assert (real.name, real.tag, real.type) == (mock.name, mock.tag, mock.type), (real, mock)
        self.real.xdp_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_XDP, bpf.asm.mov64_imm(0, 2) + bpf.asm.exit())
        self.real.xdp_id = bpf.prog_info(self.real.xdp_fd).id
        self.mock_xdp = self.kernel.program("drop", prog_type=bpf.BPF_PROG_TYPE_XDP)
        self.mock.xdp_fd, self.mock.xdp_id = self.mock_xdp.fd, self.mock_xdp.id
        self.read_ifindexes()

    def read_ifindexes(self) -> None:
        self.real.ifindex = {name: socket.if_nametoindex(name) for name in DEVICES}
        self.mock.ifindex = dict(self.kernel.devices())

    def teardown(self) -> None:
        for link in self.links:
            for side in self.sides:
                for fd in link.fds[side.name]:
                    side.bpf.close(fd)
            link.fds = {"real": [], "mock": []}
        for side in self.sides:
            for fd in side.prog_fds:
                side.bpf.close(fd)
        bpf.LINUX.close(self.real.xdp_fd)
        self.mock_xdp.close()
        os.close(self.pipe_r)
        os.close(self.pipe_w)

    # -- mapping answers to comparable values ---------------------------------------------------------------
    def prog_index(self, side: Side, prog_id: int) -> object:
        if prog_id in side.prog_ids:
            return side.prog_ids.index(prog_id)
        return "xdp" if prog_id == side.xdp_id else ("unknown prog", prog_id)

    def link_index(self, side: Side, link_id: int) -> object:
        if link_id == 0:
            return 0
        for i, link in enumerate(self.links):
            if link.ids[side.name] == link_id:
                return f"L{i}"
        return ("unknown link", link_id)

    def dev_name(self, side: Side, ifindex: int) -> object:
        if ifindex == 0:
            return 0
        names = [n for n, i in side.ifindex.items() if i == ifindex]
        return names[0] if names else ("unknown ifindex", ifindex)

    # -- the random choices (made once, then spelled for each side) -----------------------------------------
    def pick_hook(self) -> tuple[str, int]:
        dev = "BOGUS" if self.rng.random() < 0.02 else self.rng.choice(("dva", "dva", "dvb", "lo"))
        return dev, self.rng.choice(HOOKS)

    def ifindex(self, side: Side, dev: str) -> int:
        return BOGUS_IFINDEX if dev == "BOGUS" else side.ifindex[dev]

    def open_links(self) -> list[int]:
        return [i for i, link in enumerate(self.links) if link.fds["real"] and link.fds["mock"]]

    def pick_relative(self) -> tuple[int, Callable[[Side], int], str]:
        """(flags to add, the relative for a side, description)."""
        rng = self.rng
        kind = rng.choice(("none", "none", "none", "prog_fd", "prog_id", "prog_id", "link_fd", "link_id",
                           "link_id", "missing", "missing_link", "pipe_fd", "xdp_id", "id_zero", "link_zero"))
        if kind in ("prog_fd", "prog_id"):
            p = rng.randrange(PROGRAMS)
            if kind == "prog_fd":
                return 0, lambda s: s.prog_fds[p], f"prog_fd P{p}"
            return BPF_F_ID, lambda s: s.prog_ids[p], f"prog_id P{p}"
        if kind == "link_fd" and self.open_links():
            i = rng.choice(self.open_links())
            return BPF_F_LINK, lambda s: self.links[i].fds[s.name][0], f"link_fd L{i}"
        if kind == "link_id" and self.links:
            i = rng.randrange(len(self.links))
            return BPF_F_LINK | BPF_F_ID, lambda s: self.links[i].ids[s.name], f"link_id L{i}"
        if kind == "missing":
            return BPF_F_ID, lambda s: MISSING_ID, "missing prog id"
        if kind == "missing_link":
            return BPF_F_LINK | BPF_F_ID, lambda s: MISSING_ID, "missing link id"
        if kind == "pipe_fd":
            extra = rng.choice((0, BPF_F_LINK))
            return extra, lambda s: self.pipe_r, f"non-BPF fd {'link' if extra else 'prog'}"
        if kind == "xdp_id":
            return BPF_F_ID, lambda s: s.xdp_id, "xdp prog id"
        if kind == "id_zero":
            return BPF_F_ID, lambda s: 0, "BPF_F_ID with 0"
        if kind == "link_zero":
            return BPF_F_LINK, lambda s: 0, "BPF_F_LINK with 0"
        return 0, lambda s: 0, "no relative"

    def pick_revision(self, dev: str, attach_type: int) -> int:
        last = self.last_rev.get((dev, attach_type), 1)
        return self.rng.choice((0, 0, 0, 0, last, last, last + 1, 1, max(1, last - 1)))

    # -- one operation on both sides ------------------------------------------------------------------------
    def both(self, what: str, fn: Callable[[Side], object], norm: Callable[[Side, object], object] | None = None
             ) -> tuple[Answer, Answer]:
        answers = []
        for side in self.sides:
            status, value = attempt(lambda side=side: fn(side))  # type: ignore[misc]
            if status == "ok" and norm is not None:
                value = norm(side, value)
            answers.append((status, value))
        real, mock = answers
        self.log.append(f"{what}: real {real} mock {mock}")
        kind = what.split()[0]
        self.outcomes[f"{kind} {real[1] if real[0] == 'err' else 'ok'}"] += 1
        return real, mock

    def check(self, real: Answer, mock: Answer) -> None:
        if real != mock:
            recent = "\n  ".join(self.log[-25:])
            raise AssertionError(f"MockKernel differs from the kernel at step {len(self.log)}:\n"
                                 f"  real: {real}\n  mock: {mock}\nlast operations:\n  {recent}")

    def op_create(self) -> None:
        rng = self.rng
        p = rng.randrange(PROGRAMS)
        dev, at = self.pick_hook()
        base = rng.choice((0, 0, BPF_F_BEFORE, BPF_F_AFTER, BPF_F_BEFORE, BPF_F_AFTER, BPF_F_BEFORE | BPF_F_AFTER,
                           BPF_F_REPLACE))
        extra, relative, rdesc = self.pick_relative()
        rev = self.pick_revision(dev, at)
        xdp = rng.random() < 0.02
        flags = base | extra
        desc = f"link_create {'XDP' if xdp else f'P{p}'} {dev}/{at} flags={flags:#x} {rdesc} rev={rev}"
        real, mock = self.both(desc, lambda s: s.bpf.link_create_tcx(
            s.xdp_fd if xdp else s.prog_fds[p], self.ifindex(s, dev), at, flags=flags, relative=relative(s),
            expected_revision=rev))
        self.adopt_link(real, mock)

    def close_and_check(self, real: Answer, mock: Answer) -> None:
        """Answers not kept: close the fd of each side that made one, then compare (failing if they differ)."""
        for side, ans in zip(self.sides, (real, mock), strict=True):
            if ans[0] == "ok":
                side.bpf.close(int(ans[1]))  # type: ignore[call-overload]
        self.check(real, mock)

    def adopt_link(self, real: Answer, mock: Answer) -> None:
        """Record a link both made (compare first; an fd only one side made is closed before failing)."""
        if real[0] == "ok" and mock[0] == "ok":
            fds = {"real": [int(real[1])], "mock": [int(mock[1])]}  # type: ignore[call-overload]
            ids = {s.name: s.bpf.link_info(fds[s.name][0]).id for s in self.sides}
            self.links.append(Link(ids, fds))
            self.log[-1] += f" -> L{len(self.links) - 1}"
            return
        self.close_and_check(real, mock)

    def op_burst(self) -> None:
        """Fill one hook: create links for programs in order until the kernel says no (the 64th: ERANGE)."""
        dev, at = self.rng.choice(("dva", "dvb")), self.rng.choice(HOOKS)
        for p in range(PROGRAMS):

            def create(s: Side, p: int = p) -> int:
                return s.bpf.link_create_tcx(s.prog_fds[p], s.ifindex[dev], at)

            real, mock = self.both(f"link_create P{p} {dev}/{at} (burst)", create)
            self.adopt_link(real, mock)
            if real[0] == "err" and real[1] == "ERANGE":
                break

    def attached_links(self) -> list[int]:
        """The open links that are on a hook now (as the real kernel says; the mock must agree)."""
        return [i for i in self.open_links() if bpf.link_info(self.links[i].fds["real"][0]).ifindex]

    def op_update(self, cas: bool) -> None:
        links = (self.attached_links() if self.rng.random() < 0.8 else []) or self.open_links()
        if not links:
            return
        i, p = self.rng.choice(links), self.rng.randrange(PROGRAMS)
        old = self.rng.randrange(PROGRAMS)
        if cas:
            current = attempt(lambda: bpf.link_info(self.links[i].fds["real"][0]).prog_id)
            if current[0] == "ok" and self.rng.random() < 0.6 and current[1] in self.real.prog_ids:
                old = self.real.prog_ids.index(current[1])
        desc = f"link_update L{i} -> P{p}" + (f" expecting P{old}" if cas else "")
        self.check(*self.both(desc, lambda s: s.bpf.link_update(
            self.links[i].fds[s.name][0], s.prog_fds[p], old_prog_fd=s.prog_fds[old] if cas else None)))

    def op_detach(self) -> None:
        links = (self.attached_links() if self.rng.random() < 0.8 else []) or self.open_links()
        if links:
            i = self.rng.choice(links)
            self.check(*self.both(f"link_detach L{i}", lambda s: s.bpf.link_detach(self.links[i].fds[s.name][0])))

    def op_drain(self) -> None:
        """Empty one hook (detach each link on it, BPF_PROG_DETACH each link-less entry), then query it: the
        revision rules of an emptied hook (reset, or counting on while a qdisc holds it) show."""
        dev, at = self.rng.choice(("dva", "dvb")), self.rng.choice(HOOKS)
        hook = bpf.prog_query(self.real.ifindex[dev], at)
        for prog_id, link_id in zip(hook.prog_ids, hook.link_ids, strict=True):
            i = self.link_index(self.real, link_id)
            if link_id == 0:
                p = self.real.prog_ids.index(prog_id)

                def prog_detach(s: Side, p: int = p) -> int:
                    return raw_call(s, BPF_PROG_DETACH, "=IIIIIIQ", s.ifindex[dev], s.prog_fds[p], at, 0, 0, 0, 0,
                                    op="prog_detach")

                self.check(*self.both(f"prog_detach P{p} {dev}/{at} (drain)", prog_detach))
            elif isinstance(i, str) and self.links[int(i[1:])].fds["real"]:
                link = self.links[int(i[1:])]

                def link_detach(s: Side, link: Link = link) -> None:
                    s.bpf.link_detach(link.fds[s.name][0])

                self.check(*self.both(f"link_detach {i} (drain)", link_detach))
        self.op_query_hook(dev, at)

    def op_close(self) -> None:
        links = self.open_links()
        if links:
            i = self.rng.choice(links)
            link = self.links[i]
            self.log.append(f"close a fd of L{i}")
            for side in self.sides:
                side.bpf.close(link.fds[side.name].pop())

    def op_get_fd_by_id(self) -> None:
        if not self.links:
            return
        i = self.rng.randrange(len(self.links))
        real, mock = self.both(f"link_get_fd_by_id L{i}",
                               lambda s: s.bpf.link_get_fd_by_id(self.links[i].ids[s.name]))
        self.keep_fds(i, real, mock)

    def keep_fds(self, i: int, real: Answer, mock: Answer) -> None:
        if real[0] == "ok" and mock[0] == "ok":
            for side, ans in zip(self.sides, (real, mock), strict=True):
                self.links[i].fds[side.name].append(int(ans[1]))  # type: ignore[call-overload]
            return
        self.close_and_check(real, mock)

    def op_info(self) -> None:
        links = self.open_links()
        if links:
            i = self.rng.choice(links)

            def norm(s: Side, v: object) -> object:
                assert isinstance(v, bpf.LinkInfo)
                return (v.type, self.link_index(s, v.id), self.prog_index(s, v.prog_id), self.dev_name(s, v.ifindex),
                        v.attach_type)

            self.check(*self.both(f"link_info L{i}", lambda s: s.bpf.link_info(self.links[i].fds[s.name][0]), norm))

    def op_query(self) -> None:
        self.op_query_hook(*self.pick_hook())

    def op_query_hook(self, dev: str, at: int) -> None:
        def norm(s: Side, v: object) -> object:
            assert isinstance(v, bpf.HookQuery)
            return (v.revision, tuple(self.prog_index(s, p) for p in v.prog_ids),
                    tuple(self.link_index(s, x) for x in v.link_ids))

        real, mock = self.both(f"prog_query {dev}/{at}", lambda s: s.bpf.prog_query(
            self.ifindex(s, dev), at, capacity=self.rng.choice((1, 64))), norm)
        self.check(real, mock)
        if real[0] == "ok":
            self.last_rev[(dev, at)] = real[1][0]  # type: ignore[index]

    def op_pin(self) -> None:
        links = self.open_links()
        if links:
            i, n = self.rng.choice(links), self.rng.randrange(PIN_NAMES)
            path = f"{self.bpffs}/pin{n}"
            real, mock = self.both(f"obj_pin L{i} pin{n}", lambda s: s.bpf.obj_pin(self.links[i].fds[s.name][0], path))
            self.check(real, mock)
            if real[0] == "ok":
                self.pins[n] = i

    def op_unpin(self) -> None:
        n = self.rng.randrange(PIN_NAMES)
        path = f"{self.bpffs}/pin{n}"

        def unlink() -> bool:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False
            return True

        real, mock = unlink(), self.kernel.pins.unpin(path)
        self.log.append(f"unpin pin{n}: real {real} mock {mock}")
        self.check(("ok", real), ("ok", mock))
        self.pins.pop(n, None)

    def op_obj_get(self) -> None:
        n = self.rng.randrange(PIN_NAMES)
        path = f"{self.bpffs}/pin{n}"
        real, mock = self.both(f"obj_get pin{n}", lambda s: s.bpf.obj_get(path))
        if real[0] == "ok" and mock[0] == "ok" and n not in self.pins:
            for side, ans in zip(self.sides, (real, mock), strict=True):
                side.bpf.close(int(ans[1]))  # type: ignore[call-overload]
            raise AssertionError(f"both kernels have something at pin{n}, which this test never pinned")
        self.keep_fds(self.pins.get(n, -1), real, mock)

    def op_prog_attach(self) -> None:
        rng = self.rng
        p, dev, at = rng.randrange(PROGRAMS), *self.pick_hook()
        base = rng.choice((0, 0, BPF_F_BEFORE, BPF_F_AFTER, BPF_F_REPLACE))
        extra, relative, rdesc = self.pick_relative() if base != BPF_F_REPLACE else (0, lambda s: 0, "")
        old = rng.randrange(PROGRAMS)
        rev = self.pick_revision(dev, at)
        flags = base | extra
        desc = f"prog_attach P{p} {dev}/{at} flags={flags:#x} {rdesc} replace=P{old} rev={rev}"
        self.check(*self.both(desc, lambda s: raw_call(
            s, BPF_PROG_ATTACH, "=IIIIIIQ", self.ifindex(s, dev), s.prog_fds[p], at, flags,
            s.prog_fds[old] if flags & BPF_F_REPLACE else 0, relative(s), rev, op="prog_attach")))

    def op_prog_detach(self) -> None:
        rng = self.rng
        dev, at = self.pick_hook()
        p = rng.choice((None, rng.randrange(PROGRAMS)))
        flags = rng.choice((0, 0, BPF_F_BEFORE, BPF_F_AFTER))
        desc = f"prog_detach {'-' if p is None else f'P{p}'} {dev}/{at} flags={flags:#x}"
        self.check(*self.both(desc, lambda s: raw_call(
            s, BPF_PROG_DETACH, "=IIIIIIQ", self.ifindex(s, dev), 0 if p is None else s.prog_fds[p], at, flags,
            0, 0, 0, op="prog_detach")))

    def op_qdisc(self) -> None:
        dev = self.rng.choice(("dva", "dvb"))
        what = self.rng.choice(("clsact", "ingress", "ingress", "delete", "delete"))
        if what == "delete":
            real_ok = tc("qdisc", "del", "dev", dev, "parent", "ffff:fff1", netns=self.ns, check=False).returncode == 0
            try:
                self.kernel.qdisc_delete(dev)
                mock_ok = True
            except OSError:
                mock_ok = False
        else:
            real_ok = tc("qdisc", "add", "dev", dev, what, netns=self.ns, check=False).returncode == 0
            try:
                self.kernel.qdisc_add(dev, what)
                mock_ok = True
            except OSError:
                mock_ok = False
        self.log.append(f"qdisc {what} {dev}: real {real_ok} mock {mock_ok}")
        self.check(("ok", real_ok), ("ok", mock_ok))

    def op_recreate_devices(self) -> None:
        """Delete the veth pair under its links (they are severed) and make it again (new ifindexes)."""
        ip("link", "del", "dva", netns=self.ns)
        ip("link", "add", "dva", "type", "veth", "peer", "name", "dvb", netns=self.ns)
        self.kernel.remove_device("dva")
        self.kernel.remove_device("dvb")
        self.kernel.add_device("dva")
        self.kernel.add_device("dvb")
        self.read_ifindexes()
        self.last_rev = {k: v for k, v in self.last_rev.items() if k[0] == "lo"}
        self.log.append("devices dva/dvb deleted and made again")

    def step(self) -> None:
        ops: tuple[tuple[Callable[[], None], int], ...] = (
            (self.op_create, 22), (self.op_query, 12), (lambda: self.op_update(False), 7),
            (lambda: self.op_update(True), 7), (self.op_detach, 10), (self.op_close, 12), (self.op_info, 5),
            (self.op_get_fd_by_id, 3), (self.op_pin, 3), (self.op_unpin, 3), (self.op_obj_get, 3),
            (self.op_prog_attach, 4), (self.op_prog_detach, 4), (self.op_qdisc, 5),
            (self.op_recreate_devices, 1), (self.op_burst, 1), (self.op_drain, 3),
        )
        fns, weights = zip(*ops, strict=True)
        self.rng.choices(fns, weights)[0]()


@pytest.mark.timeout(max(120, OPS // 10))
def test_mock_answers_bpf_like_the_kernel() -> None:
    rng = random.Random(SEED)
    with temp_netns("atcdiff") as ns, bpffs_mount() as bpffs:
        ip("link", "add", "dva", "type", "veth", "peer", "name", "dvb", netns=ns)
        kernel = MockKernel(devices=DEVICES)
        runner = NetnsRunner(ns, trio.CapacityLimiter(1))
        diff = Differential(ns, bpffs, kernel, rng)

        def run() -> None:
            diff.setup()
            try:
                for _ in range(OPS):
                    diff.step()
                for dev in DEVICES:  # a final comparison of every hook
                    for at in HOOKS:
                        diff.op_query_hook(dev, at)
            finally:
                diff.teardown()

        try:
            runner.call_in_netns(run)
        finally:
            runner.close()
        print(f"\n{len(diff.log)} operations compared (seed {SEED}); outcomes:")
        for key, count in sorted(diff.outcomes.items()):
            print(f"  {key}: {count}")
        assert kernel.fds() == {}, "the mock side left fds open"
        seen = {key.split()[1] for key in diff.outcomes}
        if OPS >= 300:  # the default run reaches every rule this test is about
            assert {"EEXIST", "ENOENT", "ESTALE", "ERANGE", "EINVAL", "EPERM", "ENOLINK", "ENODEV"} <= seen, seen
