"""MockKernel against the real kernel, through the PUBLIC API: one seeded random sequence of session
operations runs on a real-kernel session and on a session over a MockKernel, with the same backend
("bpf_link", and separately "netlink"), in lockstep, and every answer is compared.

Operations: attach (First, Last, Before/After a program, an attachment or a program id, on the hook or
not; expected_revision right, stale or None), update (plain, and compare-and-swap with the right and a
wrong expected program), detach (also twice), pin and unpin (paths in a private bpffs on the kernel side,
the same strings on the mock), adopt_pinned in a second session (and in the first), foreign entries (a
u32 filter, a foreign cls_bpf filter, a foreign tcx link; removed again), bad inputs (unknown device,
closed program, out-of-range values), and closing the session (whatever it owned unpinned is gone from
the hooks; a new session takes its place).

Compared, after each operation: its answer (the exception class and errno, or the result: AttachmentInfo's
comparable fields, UpdateResult's method and revision), `session.query(dev, direction)` of every hook
(revision, and each entry's kind, program, link, priority, handle, owned), `len(session.attachments)` of
each open session, and the state of every attachment made. Program ids are the same on both sides (the
mock holds the same real programs); link ids are mapped by the order in which they first appear.

The kernel side runs in a fresh uniquely named namespace with a veth pair (dva, dvb) and lo; the mock is
`MockKernel(devices=...)` with the same names in the same ifindex order. ASYNCTC_DIFF_OPS sets the number
of operations per backend (default 200; a long run: 10000), ASYNCTC_DIFF_SEED the seed (default 1).
"""

from __future__ import annotations

import errno
import os
import random
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

import asynctc
from asynctc import After, Attachment, Before, First, Hook, Last, Program, Session, State
from asynctc.lowlevel import bpf, codec
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.lowlevel.transport import NetlinkError, NetlinkTransport, open_transport
from asynctc.programs import Verdict
from asynctc.testing import bpffs_mount, ip, tc, temp_netns
from asynctc_mock import KernelError, MockKernel

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, tc and BPF programs"),
]

OPS = int(os.environ.get("ASYNCTC_DIFF_OPS", "200"))
SEED = int(os.environ.get("ASYNCTC_DIFF_SEED", "1"))
PROGRAMS = 8
VERDICTS: tuple[Verdict, ...] = ("pass", "drop", "next")
HOOK_DEVS = ("dva", "dvb")
DIRECTIONS = ("ingress", "egress")
PIN_NAMES = 4
MISSING_PROG_ID = 0x7FFF_0000  # an id no kernel here has handed out
STATE_WINDOW = 64  # the most recent attachments whose states are compared after every step
FOREIGN_PRIOS = (3, 7, 0x8000, 0xC000)

Answer = tuple[Any, ...]


@dataclass
class Held:
    """A session opened in a task of its own (so that sessions close in any order) and how to close it."""

    session: Session
    close: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


async def _hold(backend: str, netns: str | None, kernel: MockKernel | None, held: list[Held],
                task_status: trio.TaskStatus[Held]) -> None:
    h: Held | None = None
    try:
        async with asynctc.open_session(backend, netns=netns, kernel=kernel, owner="atcdiff") as session:
            h = Held(session)
            held.append(h)
            task_status.started(h)
            await h.close.wait()
    except Exception as exc:
        if h is None:
            raise
        h.error = exc
    finally:
        if h is not None:
            h.closed.set()


@dataclass
class Side:
    """One kernel's half of the run: its sessions, attachments, foreign objects and id labels."""

    name: str
    kernel: MockKernel | None
    netns: str | None
    nursery: trio.Nursery
    bpf: bpf.Bpf
    runner: NetnsRunner
    nl: NetlinkTransport
    ifindex: dict[str, int]
    primary: Held | None = None
    second: Held | None = None
    link_labels: dict[int, str] = field(default_factory=dict)
    foreign_links: list[int] = field(default_factory=list)  # fds of foreign tcx links

    async def open(self, backend: str) -> Held:
        box: list[Held] = []
        return await self.nursery.start(_hold, backend, self.netns, self.kernel, box)  # type: ignore[no-any-return]

    async def close(self, h: Held) -> BaseException | None:
        h.close.set()
        await h.closed.wait()
        return h.error

    def link(self, link_id: int | None) -> object:
        """A link id as a label by order of first appearance (the same on both sides when they agree)."""
        if link_id is None or link_id == 0:
            return link_id
        if link_id not in self.link_labels:
            self.link_labels[link_id] = f"L{len(self.link_labels)}"
        return self.link_labels[link_id]

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A bpf(2) call made as another process on this kernel would (the real one: inside the namespace)."""
        if self.kernel is None:
            return await self.runner.run(fn, *args)
        return fn(*args)


@dataclass
class Pair:
    """An attachment both sides made in the same step."""

    label: str
    real: Attachment
    mock: Attachment

    def of(self, side: Side) -> Attachment:
        return self.real if side.name == "real" else self.mock


class Mismatch(AssertionError):
    pass


async def _request(side: Side, build: Callable[[int], bytes]) -> None:
    """One rtnetlink request of the test's own (a foreign tc user) on `side`; the kernel's refusal as the
    OSError the comparison reads."""
    try:
        await side.nl.request(build)
    except NetlinkError as exc:
        raise OSError(exc.errno, str(exc)) from None


def _exc_answer(exc: BaseException) -> Answer:
    return ("err", type(exc).__name__, errno.errorcode.get(getattr(exc, "errno", None) or 0,
                                                           getattr(exc, "errno", None)))


class Differential:
    def __init__(self, backend: str, rng: random.Random, real: Side, mock: Side, progs: list[Program],
                 closed_prog: Program, bpffs: str) -> None:
        self.backend = backend
        self.rng = rng
        self.real = real
        self.mock = mock
        self.sides = (real, mock)
        self.progs = progs
        self.prog_label = {p.id: f"P{i}" for i, p in enumerate(progs)}
        self.closed_prog = closed_prog
        self.bpffs = bpffs
        self.pairs: list[Pair] = []
        self.pair_sessions: dict[str, str] = {}  # pair label -> "primary" / "second" (which session owns it)
        self.last_rev: dict[tuple[str, str], int | None] = {}
        self.log: list[str] = []
        self.outcomes: Counter[str] = Counter()
        self.foreign_count = 0

    # -- comparing ------------------------------------------------------------------------------------
    def fail(self, what: str, real: object, mock: object) -> None:
        recent = "\n  ".join(self.log[-25:])
        raise Mismatch(f"[{self.backend}] MockKernel differs from the kernel at step {len(self.log)} ({what}):\n"
                       f"  real: {real}\n  mock: {mock}\nlast operations:\n  {recent}\n"
                       f"(ASYNCTC_DIFF_SEED={SEED} ASYNCTC_DIFF_OPS={OPS} reproduce this run)")

    def check(self, what: str, real: object, mock: object) -> None:
        if real != mock:
            self.fail(what, real, mock)

    def prog(self, prog_id: int | None) -> object:
        if prog_id is None:
            return None
        return self.prog_label.get(prog_id, prog_id)

    def info(self, side: Side, att: Attachment) -> Answer:
        i = att.info
        return (i.backend, i.dev, i.ifindex, i.direction.value, self.prog(i.prog_id), side.link(i.link_id),
                i.priority, i.handle, i.offloaded, i.pinned)

    def hook(self, side: Side, hook: Hook) -> Answer:
        return (hook.revision, tuple(
            (e.kind, self.prog(e.prog_id), e.prog_name, e.prog_tag, side.link(e.link_id), e.priority, e.handle,
             e.owned) for e in hook.entries))

    async def both(self, what: str, fn: Callable[[Side], Awaitable[Any]],
                   norm: Callable[[Side, Any], Any] | None = None) -> tuple[Answer, Answer, Any, Any]:
        """Run `fn` on each side (kernel first), compare the normalised answers; return them and the raw
        results."""
        answers: list[Answer] = []
        raws: list[Any] = []
        messages: list[str] = []
        for side in self.sides:
            try:
                raw = await fn(side)
            except (asynctc.TCError, OSError, ValueError, TypeError) as exc:
                answers.append(_exc_answer(exc))
                raws.append(None)
                messages.append(f"{side.name} said: {str(exc).splitlines()[0][:200]}")
            else:
                answers.append(("ok", norm(side, raw) if norm is not None else raw))
                raws.append(raw)
        real, mock = answers
        self.log.append(f"{what}: {real}" + ("" if real == mock else f" | mock {mock}")
                        + "".join(f"\n      {m}" for m in messages))
        self.outcomes[f"{what.split()[0]} {real[1] if real[0] == 'err' else 'ok'}"] += 1
        self.check(what, real, mock)
        return real, mock, raws[0], raws[1]

    async def compare_state(self) -> None:
        """Every hook's query, the attachment counts, the recent attachments' states."""
        for dev in HOOK_DEVS:
            for direction in DIRECTIONS:
                got = []
                for side in self.sides:
                    assert side.primary is not None
                    try:
                        got.append(("ok", self.hook(side, await side.primary.session.query(dev, direction))))
                    except (asynctc.TCError, OSError) as exc:
                        got.append(_exc_answer(exc))
                self.check(f"query {dev} {direction}", *got)
                if got[0][0] == "ok":
                    self.last_rev[(dev, direction)] = got[0][1][0]
        for which in ("primary", "second"):
            counts = []
            for side in self.sides:
                h = getattr(side, which)
                counts.append(None if h is None else len(h.session.attachments))
            self.check(f"{which} session's attachment count", *counts)
        for pair in self.pairs[-STATE_WINDOW:]:
            self.check(f"state of {pair.label}", (pair.real.state, pair.real.info.pinned),
                       (pair.mock.state, pair.mock.info.pinned))

    # -- random choices ---------------------------------------------------------------------------------
    def pick_prog(self) -> int:
        return self.rng.randrange(PROGRAMS)

    def owned_live(self, pair: Pair) -> bool:
        """Attached, and owned by a session that is still open."""
        return pair.real.state is State.ATTACHED and self.pair_sessions[pair.label] != "closed"

    def pick_pair(self, live_bias: float = 0.9) -> Pair | None:
        """Mostly a live attachment of an open session; now and then another one (a detached one, or one
        a closed session left pinned), whose answers are compared too."""
        live = [p for p in self.pairs if self.owned_live(p)]
        if live and self.rng.random() < live_bias:
            return self.rng.choice(live)
        if not self.pairs or (live and self.rng.random() < 0.5) or (not live and self.rng.random() < 0.7):
            return None
        return self.rng.choice(self.pairs[-STATE_WINDOW:])

    def pick_position(self, dev: str, direction: str) -> tuple[str, Callable[[Side], object]]:
        rng = self.rng
        kind = rng.choice(("none", "none", "first", "first", "last", "last", "before", "after", "before", "after",
                           "bogus"))
        if kind == "none":
            return "default", lambda s: None
        if kind == "first":
            return "First()", lambda s: First()
        if kind == "last":
            return "Last()", lambda s: Last()
        if kind == "bogus":
            return "Before('x')", lambda s: Before("x")  # type: ignore[arg-type]
        cls = Before if kind == "before" else After
        here = [p for p in self.pairs if self.owned_live(p)
                and (p.real.info.dev, p.real.info.direction.value) == (dev, direction)]
        anchor = rng.choice(("prog", "att", "att", "att", "id", "id", "missing"))
        if anchor == "att" and self.pairs:
            pair = rng.choice(here) if here and rng.random() < 0.8 else self.pick_pair(0.9)
            if pair is not None:
                return f"{cls.__name__}({pair.label})", lambda s: cls(pair.of(s))
        if anchor == "id":
            p = rng.choice(here).real.info.prog_id if here and rng.random() < 0.7 else self.progs[self.pick_prog()].id
            return f"{cls.__name__}(id {self.prog(p)})", lambda s: cls(p)
        if anchor == "missing":
            return f"{cls.__name__}(missing id)", lambda s: cls(MISSING_PROG_ID)
        p = self.pick_prog()
        return f"{cls.__name__}(P{p})", lambda s: cls(self.progs[p])

    def pick_revision(self, dev: str, direction: str) -> int | None:
        last = self.last_rev.get((dev, direction))
        if last is None:
            return self.rng.choice((None, None, 0, 1))
        return self.rng.choice((None, None, None, last, last, last, last + 1, max(0, last - 1), 0))

    def pin_path(self, n: int) -> str:
        return f"{self.bpffs}/pin{n}"

    # -- operations ---------------------------------------------------------------------------------------
    async def op_attach(self) -> None:
        rng = self.rng
        dev = rng.choice(HOOK_DEVS)
        direction = rng.choice(DIRECTIONS)
        p = self.pick_prog()
        pdesc, position = self.pick_position(dev, direction)
        rev = self.pick_revision(dev, direction) if self.backend == "bpf_link" or rng.random() < 0.1 else None
        options: dict[str, Any] = {}
        if self.backend == "netlink" and rng.random() < 0.25:
            options["priority"] = rng.choice((1, 2, 5, 0x7FFF, 0xFFFF))
            if rng.random() < 0.5:
                options["handle"] = rng.choice((1, 2, 0x10))
        which = "second" if self.real.second is not None and rng.random() < 0.15 else "primary"
        what = f"attach P{p} {dev} {direction} {pdesc} rev={rev} {options or ''} ({which})"

        async def attach(s: Side) -> Attachment:
            session: Session = getattr(s, which).session
            return await session.attach(dev, direction, self.progs[p], position=position(s),  # type: ignore[arg-type]
                                        expected_revision=rev, **options)

        await self.adopt_result(what, attach, which)

    async def adopt_result(self, what: str, fn: Callable[[Side], Awaitable[Attachment]], which: str) -> None:
        real, mock, ra, ma = await self.both(what, fn, self.info)
        if real[0] == "ok" and mock[0] == "ok":
            label = f"A{len(self.pairs)}"
            self.pairs.append(Pair(label, ra, ma))
            self.pair_sessions[label] = which
            self.log[-1] += f" -> {label}"

    async def op_update(self, mode: str) -> None:
        pair = self.pick_pair()
        if pair is None:
            return
        p = self.pick_prog()
        expected: int | None = None
        if mode == "right":
            current = self.prog_label.get(pair.real.info.prog_id)
            expected = int(str(current)[1:]) if current is not None else self.pick_prog()
        elif mode == "wrong":
            expected = self.pick_prog()
        what = f"update {pair.label} -> P{p}" + ("" if expected is None else f" expecting P{expected}")

        async def update(s: Side) -> Any:
            return await pair.of(s).update(self.progs[p], expected=None if expected is None else self.progs[expected])

        await self.both(what, update, lambda s, r: (r.method, r.revision))
        self.log[-1] += f" now {self.info(self.real, pair.real)}"
        self.check(f"info of {pair.label} after the update", self.info(self.real, pair.real),
                   self.info(self.mock, pair.mock))

    async def op_detach(self) -> None:
        pair = self.pick_pair(0.8)
        if pair is None:
            return

        async def detach(s: Side) -> None:
            await pair.of(s).detach()

        await self.both(f"detach {pair.label}", detach)
        if self.rng.random() < 0.2:
            await self.both(f"detach {pair.label} (again)", detach)

    async def op_pin(self) -> None:
        pair = self.pick_pair()
        if pair is None:
            return
        n = self.rng.randrange(PIN_NAMES)

        async def pin(s: Side) -> None:
            await pair.of(s).pin(self.pin_path(n))

        await self.both(f"pin {pair.label} pin{n}", pin)

    async def op_unpin(self) -> None:
        pinned = [p for p in self.pairs[-STATE_WINDOW:] if p.real.info.pinned is not None]
        pair = self.rng.choice(pinned) if pinned and self.rng.random() < 0.8 else self.pick_pair()
        if pair is None:
            return

        async def unpin(s: Side) -> None:
            await pair.of(s).unpin()

        await self.both(f"unpin {pair.label}", unpin)

    async def op_adopt(self) -> None:
        n = self.rng.randrange(PIN_NAMES)
        which = "second" if self.rng.random() < 0.75 else "primary"
        if which == "second" and self.real.second is None:
            for side in self.sides:
                side.second = await side.open(self.backend)
            self.log.append("opened a second session on each side")
        foreign = self.rng.random() < 0.1
        path = self.pin_path(n) if self.rng.random() < 0.95 else self.bpffs + "/nothing/here"

        async def adopt(s: Side) -> Attachment:
            session: Session = getattr(s, which).session
            return await session.adopt_pinned(path, foreign=foreign)

        await self.adopt_result(f"adopt_pinned {path.rsplit('/', 1)[1]} foreign={foreign} ({which})", adopt, which)

    async def op_close_second(self) -> None:
        if self.real.second is None:
            return
        errs = []
        for side in self.sides:
            assert side.second is not None
            errs.append(await side.close(side.second))
            side.second = None
        for label, which in self.pair_sessions.items():
            if which == "second":
                self.pair_sessions[label] = "closed"
        self.log.append(f"closed the second sessions: {errs}")
        self.check("closing the second session", *[None if e is None else _exc_answer(e) for e in errs])

    async def op_close_primary(self) -> None:
        """Close the primary session: what it owned and had not pinned leaves the hooks; a new one opens."""
        owned = [p for p in self.pairs if self.pair_sessions[p.label] == "primary"
                 and p.real.state is State.ATTACHED and p.real.info.pinned is None]
        errs = []
        for side in self.sides:
            assert side.primary is not None
            errs.append(await side.close(side.primary))
            side.primary = await side.open(self.backend)
        self.log.append(f"closed the primary sessions ({len(owned)} unpinned attachments): {errs}; opened new ones")
        self.check("closing the primary session", *[None if e is None else _exc_answer(e) for e in errs])
        for pair in owned:
            for side in self.sides:
                att = pair.of(side)
                if att.state is not State.DETACHED:
                    self.fail(f"{pair.label} after its session closed", pair.real.state, pair.mock.state)
                assert side.primary is not None
                hook = await side.primary.session.query(att.info.dev, att.info.direction)
                left = [e for e in hook.entries if (e.link_id is not None and e.link_id == att.info.link_id)
                        or (e.kind == "bpf" and (e.priority, e.handle) == (att.info.priority, att.info.handle)
                            and e.prog_id == att.info.prog_id)]
                if left:
                    raise Mismatch(f"[{self.backend}] {side.name}: {pair.label} ({att.info}) is still on its hook "
                                   f"after its session closed: {left}")
        for label in list(self.pair_sessions):
            if self.pair_sessions[label] == "primary":
                self.pair_sessions[label] = "closed"

    async def op_bad_input(self) -> None:
        rng = self.rng
        kind = rng.choice(("dev", "ifindex", "closed", "direction", "revision", "program", "anchor", "query",
                           "pin_path", "options"))
        p = self.pick_prog()

        async def run(s: Side) -> object:
            assert s.primary is not None
            session = s.primary.session
            if kind == "dev":
                return await session.attach("nosuchdev0", "ingress", self.progs[p])
            if kind == "ifindex":
                return await session.attach(rng_ifindex, "egress", self.progs[p])
            if kind == "closed":
                return await session.attach("dva", "ingress", self.closed_prog)
            if kind == "direction":
                return await session.attach("dva", "sideways", self.progs[p])
            if kind == "revision":
                return await session.attach("dva", "ingress", self.progs[p], expected_revision=bad_rev)
            if kind == "program":
                return await session.attach("dva", "ingress", p)  # type: ignore[arg-type]
            if kind == "anchor":
                return await session.attach("dva", "ingress", self.progs[p], position=After(self.closed_prog))
            if kind == "query":
                return await session.query("nosuchdev0", "ingress")
            if kind == "pin_path":
                return await session.adopt_pinned("relative/path")
            return await session.attach("dva", "ingress", self.progs[p], priority=bad_prio)

        rng_ifindex = rng.choice((999, 0, -1, 2**32))
        bad_rev = rng.choice((-1, 2**64, True))
        bad_prio = rng.choice((0, 70000, -1))
        what = f"bad-input {kind}"
        *_answers, ra, ma = await self.both(what, run, lambda s, r: repr(type(r)))
        for att in (ra, ma):
            if isinstance(att, Attachment):  # accepted after all (the answers agreed): take it back
                await att.detach()

    async def op_foreign_u32(self) -> None:
        dev = self.rng.choice(HOOK_DEVS)
        prio = self.rng.choice(FOREIGN_PRIOS)
        tc("qdisc", "add", "dev", dev, "clsact", netns=self.real.netns, check=False)
        real_ok = tc("filter", "add", "dev", dev, "ingress", "prio", str(prio), "u32", "match", "u32", "0", "0",
                     netns=self.real.netns, check=False).returncode == 0
        assert self.mock.kernel is not None
        try:
            self.mock.kernel.add_foreign_filter(dev, "ingress", priority=prio)
            mock_ok = True
        except KernelError:
            mock_ok = False
        self.log.append(f"foreign u32 {dev} prio {prio}: real {real_ok} mock {mock_ok}")
        self.check("a foreign u32 filter", real_ok, mock_ok)

    async def op_foreign_bpf(self) -> None:
        """A foreign cls_bpf filter, as `tc filter add ... bpf da fd` makes one (the same message to both)."""
        dev = self.rng.choice(HOOK_DEVS)
        direction = self.rng.choice(DIRECTIONS)
        prio = self.rng.choice(FOREIGN_PRIOS)
        p = self.pick_prog()
        tc("qdisc", "add", "dev", dev, "clsact", netns=self.real.netns, check=False)
        assert self.mock.kernel is not None
        try:
            self.mock.kernel.qdisc_add(dev)
        except KernelError:
            pass
        parent = codec.INGRESS_PARENT if direction == "ingress" else codec.EGRESS_PARENT
        flags = codec.NLM_F_REQUEST | codec.NLM_F_ACK | codec.NLM_F_CREATE | codec.NLM_F_EXCL

        async def add(s: Side) -> None:
            ifindex = s.ifindex[dev]
            await _request(s, lambda seq: codec.encode_filter(
                seq, codec.RTM_NEWTFILTER, flags, ifindex, parent, prio, 1, codec.ETH_P_ALL, self.progs[p].fd,
                "foreign", True, 0))

        await self.both(f"foreign-bpf P{p} {dev} {direction} prio {prio}", add)

    async def op_foreign_del(self) -> None:
        """Delete a whole priority of a hook, as `tc filter del dev D ingress prio N` does."""
        dev = self.rng.choice(HOOK_DEVS)
        direction = self.rng.choice(DIRECTIONS)
        prio = self.rng.choice(FOREIGN_PRIOS)
        parent = codec.INGRESS_PARENT if direction == "ingress" else codec.EGRESS_PARENT

        async def delete(s: Side) -> None:
            ifindex = s.ifindex[dev]
            await _request(s, lambda seq: codec.encode_filter(
                seq, codec.RTM_DELTFILTER, codec.NLM_F_REQUEST | codec.NLM_F_ACK, ifindex, parent, prio, 0))

        await self.both(f"foreign-del {dev} {direction} prio {prio}", delete)

    async def op_foreign_tcx(self) -> None:
        dev = self.rng.choice(HOOK_DEVS)
        direction = self.rng.choice(DIRECTIONS)
        at = bpf.BPF_TCX_INGRESS if direction == "ingress" else bpf.BPF_TCX_EGRESS
        p = self.pick_prog()
        flags = self.rng.choice((bpf.BPF_F_BEFORE, bpf.BPF_F_AFTER))

        async def create(s: Side) -> int:
            fd: int = await s.call(lambda: s.bpf.link_create_tcx(self.progs[p].fd, s.ifindex[dev], at, flags=flags))
            s.foreign_links.append(fd)
            return fd

        await self.both(f"foreign-tcx P{p} {dev} {direction} flags={flags:#x}", create, lambda s, fd: "fd")

    async def op_foreign_close(self) -> None:
        if not self.real.foreign_links or len(self.real.foreign_links) != len(self.mock.foreign_links):
            return
        i = self.rng.randrange(len(self.real.foreign_links))
        for side in self.sides:
            fd = side.foreign_links.pop(i)
            await side.call(side.bpf.close, fd)
        self.log.append(f"closed foreign tcx link #{i}")

    async def op_recreate_devices(self) -> None:
        """Delete the veth pair under what is attached to it and make it again (new ifindexes): every live
        attachment there is severed, on both sides alike."""
        doomed = [p for p in self.pairs if self.owned_live(p)]
        ip("link", "del", "dva", netns=self.real.netns)
        ip("link", "add", "dva", "type", "veth", "peer", "name", "dvb", netns=self.real.netns)
        new = {n: _in_ns_ifindex(self.real.netns or "", n) for n in HOOK_DEVS}
        kernel = self.mock.kernel
        assert kernel is not None
        for name in HOOK_DEVS:
            kernel.remove_device(name)
        for name in sorted(HOOK_DEVS, key=new.__getitem__):
            kernel.add_device(name)
        self.real.ifindex.update(new)
        self.mock.ifindex = dict(kernel.devices())
        self.check("ifindexes of the devices made again", self.real.ifindex, self.mock.ifindex)
        for key in [k for k in self.last_rev if k[0] in HOOK_DEVS]:
            del self.last_rev[key]
        for side in self.sides:
            for pair in doomed:
                with trio.move_on_after(10):
                    await pair.of(side).wait_severed()
        self.log.append(f"devices dva/dvb deleted and made again under {len(doomed)} live attachments")
        for pair in doomed:
            self.check(f"state of {pair.label} after its device was deleted", pair.real.state, pair.mock.state)

    async def step(self) -> None:
        ops: tuple[tuple[Callable[[], Awaitable[None]], int], ...] = (
            (self.op_attach, 30), (lambda: self.op_update("plain"), 6), (lambda: self.op_update("right"), 5),
            (lambda: self.op_update("wrong"), 4), (self.op_detach, 14), (self.op_pin, 6), (self.op_unpin, 4),
            (self.op_adopt, 6), (self.op_close_second, 1), (self.op_close_primary, 1), (self.op_bad_input, 5),
            (self.op_foreign_u32, 2), (self.op_foreign_bpf, 2), (self.op_foreign_del, 3),
            (self.op_foreign_tcx, 2), (self.op_foreign_close, 2), (self.op_recreate_devices, 1),
        )
        fns, weights = zip(*ops, strict=True)
        await self.rng.choices(fns, weights)[0]()
        await self.compare_state()

    async def teardown(self) -> None:
        for side in self.sides:
            for h in (side.second, side.primary):
                if h is not None:
                    await side.close(h)
            side.second = side.primary = None
            for fd in side.foreign_links:
                await side.call(side.bpf.close, fd)
            side.foreign_links.clear()


@asynccontextmanager
async def _sides(backend: str, ns: str, nursery: trio.Nursery) -> AsyncIterator[tuple[Side, Side, MockKernel]]:
    names = sorted(("lo", "dva", "dvb"), key=lambda n: _in_ns_ifindex(ns, n))
    kernel = MockKernel(devices=names)
    real_runner = NetnsRunner(ns, trio.CapacityLimiter(2))
    mock_runner = NetnsRunner(None, trio.CapacityLimiter(2))
    try:
        async with open_transport(real_runner) as real_nl, open_transport(mock_runner, kernel=kernel) as mock_nl:
            real_ifindex = {n: await real_runner.run(socket.if_nametoindex, n) for n in names}
            real = Side("real", None, ns, nursery, bpf.LINUX, real_runner, real_nl, real_ifindex)
            mock = Side("mock", kernel, None, nursery, kernel.bpf, mock_runner, mock_nl, dict(kernel.devices()))
            assert real.ifindex == mock.ifindex, (real.ifindex, mock.ifindex)
            yield real, mock, kernel
    finally:
        real_runner.close()
        mock_runner.close()
        kernel.close()


def _in_ns_ifindex(ns: str, name: str) -> int:
    out = ip("-o", "link", "show", "dev", name, netns=ns).stdout
    return int(out.split(":", 1)[0])


@pytest.mark.timeout(max(120, OPS // 5))
@pytest.mark.parametrize("backend", ["bpf_link", "netlink"])
async def test_mock_session_answers_like_the_kernel(backend: str) -> None:
    rng = random.Random(f"{SEED}:{backend}")
    progs = [asynctc.programs.constant(VERDICTS[i % 3], name=f"atcapi{i}") for i in range(PROGRAMS)]
    closed_prog = asynctc.programs.constant("pass", name="atcapi_closed")
    closed_prog.close()
    diff: Differential | None = None
    try:
        with temp_netns("atcapi") as ns, bpffs_mount() as bpffs:
            ip("link", "add", "dva", "type", "veth", "peer", "name", "dvb", netns=ns)
            async with trio.open_nursery() as nursery, _sides(backend, ns, nursery) as (real, mock, _kernel):
                diff = Differential(backend, rng, real, mock, progs, closed_prog, bpffs)
                try:
                    for side in diff.sides:
                        side.primary = await side.open(backend)
                    await diff.compare_state()
                    for _ in range(OPS):
                        await diff.step()
                finally:
                    with trio.CancelScope(shield=True):
                        await diff.teardown()
    finally:
        for p in progs:
            p.close()
    assert diff is not None
    print(f"\n[{backend}] {OPS} steps, {len(diff.log)} operations compared, each step followed by every hook's "
          f"query, the counts and the states (seed {SEED}); outcomes:")
    for key, count in sorted(diff.outcomes.items()):
        print(f"  {key}: {count}")
    if os.environ.get("ASYNCTC_DIFF_LOG"):
        print("\n".join(diff.log))
    seen = {key for key, n in diff.outcomes.items() if n}
    if OPS >= 200:  # the default run reaches the answers this test is about
        wanted = {"attach ok", "update ok", "detach ok", "pin ok", "adopt_pinned ok", "unpin ok"}
        wanted |= {"attach AlreadyAttached", "attach StaleRevision"} if backend == "bpf_link" else set()
        assert wanted <= seen, sorted(wanted - seen)
