"""Property-based: random attach / detach / update / duplicate / remove-device sequences against the mock,
checked after every step against an independent model of the kernel's rules (order from the anchors asked
for, revisions with the reset rule), and for leaks once the session closes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from _mockutil import assert_consistent, kernel_entries, qdiscs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asynctc
from asynctc import After, Before, Direction, First, Last, State
from asynctc_mock import MockKernel, SimulatedProgram

DEVS = ("eth0", "veth0")
DIRS = (Direction.INGRESS, Direction.EGRESS)
OPS = ("attach", "attach", "legacy", "detach", "update", "dup", "remove")


@dataclass
class Live:
    att: asynctc.Attachment
    prog: SimulatedProgram
    dev: str
    direction: Direction
    legacy: bool


@dataclass
class Model:
    """What the kernel should hold: per hook the tcx programs and the filters in run order, and the tcx
    revision."""

    tcx: dict[tuple[str, Direction], list[int]] = field(default_factory=dict)
    filters: dict[tuple[str, Direction], list[int]] = field(default_factory=dict)
    revision: dict[tuple[str, Direction], int] = field(default_factory=dict)
    live: list[Live] = field(default_factory=list)

    def reset_device(self, dev: str) -> None:
        for d in DIRS:
            self.tcx[(dev, d)] = []
            self.filters[(dev, d)] = []
            self.revision[(dev, d)] = 1

    def has_clsact(self, dev: str) -> bool:
        return any(self.filters[(dev, d)] for d in DIRS)

    def tcx_left(self, dev: str, d: Direction) -> None:
        """The reset rule: an empty hook without clsact counts from 1 again."""
        if not self.tcx[(dev, d)] and not self.has_clsact(dev):
            self.revision[(dev, d)] = 1

    def filters_left(self, dev: str) -> None:
        """Our session deletes the clsact it created with its last filter: empty hooks reset."""
        if not self.has_clsact(dev):
            for d in DIRS:
                if not self.tcx[(dev, d)]:
                    self.revision[(dev, d)] = 1


def _position(kind: int, anchor: Live | None) -> asynctc.Position:
    if anchor is None:
        return First() if kind % 2 else Last()
    ref: Any = (anchor.att, anchor.prog, anchor.prog.id)[kind % 3]
    return Before(ref) if kind % 2 else After(ref)


def _insert(order: list[int], pos: asynctc.Position, anchor: Live | None, prog_id: int) -> None:
    if isinstance(pos, First):
        order.insert(0, prog_id)
    elif isinstance(pos, Last):
        order.append(prog_id)
    else:
        assert anchor is not None
        i = order.index(anchor.prog.id)
        order.insert(i if isinstance(pos, Before) else i + 1, prog_id)


async def _run(ops: list[tuple[str, int, int, int]]) -> None:
    kernel = MockKernel()
    model = Model()
    for dev in DEVS:
        model.reset_device(dev)
    async with asynctc.open_session(backend="mock", kernel=kernel) as s:
        for op, a, b, c in ops:
            await _step(kernel, s, model, op, a, b, c)
            for dev in DEVS:
                for d in DIRS:
                    hook = kernel.hook(dev, d)
                    assert list(hook.prog_ids) == model.tcx[(dev, d)], (op, dev, d)
                    assert hook.revision == model.revision[(dev, d)], (op, dev, d)
                    assert [f.prog_id for f in kernel.filters(dev, d)] == model.filters[(dev, d)]
                assert (kernel.qdisc(dev) is not None) == model.has_clsact(dev)
            assert_consistent(kernel, s)
            assert {x.att for x in model.live} == set(s.attachments)
    assert kernel_entries(kernel) == set()
    assert qdiscs(kernel) == {}
    assert kernel.links() == ()


async def _step(kernel: MockKernel, s: asynctc.Session, model: Model, op: str, a: int, b: int, c: int) -> None:
    dev, d = DEVS[a % len(DEVS)], DIRS[b % len(DIRS)]
    if op in ("attach", "legacy"):
        legacy = op == "legacy"
        candidates = [x for x in model.live if (x.dev, x.direction, x.legacy) == (dev, d, legacy)]
        anchor = candidates[c % len(candidates)] if candidates and c % 4 else None
        pos = _position(c // 4, anchor)
        prog = kernel.program("next")
        options: dict[str, Any] = {"mode": "legacy"} if legacy else {}
        try:
            att = await s.attach(dev, d, prog, position=pos, **options)
        except asynctc.HookFull:
            assert legacy  # no free priority left between two filters: nothing was changed
            return
        model.live.append(Live(att, prog, dev, d, legacy))
        if legacy:
            _insert(model.filters[(dev, d)], pos, anchor, prog.id)
        else:
            _insert(model.tcx[(dev, d)], pos, anchor, prog.id)
            model.revision[(dev, d)] += 1
    elif op == "dup" and model.live:
        x = model.live[a % len(model.live)]
        if x.legacy:
            return
        with pytest.raises(asynctc.AlreadyAttached):
            await s.attach(x.dev, x.direction, x.prog)
    elif op == "detach" and model.live:
        x = model.live.pop(a % len(model.live))
        await x.att.detach()
        assert x.att.state is State.DETACHED
        if x.legacy:
            model.filters[(x.dev, x.direction)].remove(x.prog.id)
            model.filters_left(x.dev)
        else:
            model.tcx[(x.dev, x.direction)].remove(x.prog.id)
            model.revision[(x.dev, x.direction)] += 1
            model.tcx_left(x.dev, x.direction)
    elif op == "update" and model.live:
        x = model.live[a % len(model.live)]
        new = kernel.program("next")
        if b % 3 == 0:
            with pytest.raises(asynctc.Conflict):
                await x.att.update(new, expected=kernel.program())
            return
        if b % 3 == 1 and not x.legacy:
            kernel.inject_fault("link_update", 95)  # EOPNOTSUPP: make-before-break
        result = await x.att.update(new, expected=x.prog)
        order = (model.filters if x.legacy else model.tcx)[(x.dev, x.direction)]
        order[order.index(x.prog.id)] = new.id
        if not x.legacy:
            model.revision[(x.dev, x.direction)] += 2 if result.method == "make_before_break" else 1
            assert result.revision == model.revision[(x.dev, x.direction)]
        x.prog = new
    elif op == "remove":
        gone = [x for x in model.live if x.dev == dev]
        kernel.remove_device(dev)
        for x in gone:
            with trio.fail_after(10):
                await x.att.wait_severed()
            await x.att.detach()  # a no-op
            model.live.remove(x)
        kernel.add_device(dev)
        model.reset_device(dev)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99)),
                max_size=30))
def test_random_sequences_follow_the_kernel_rules(ops: list[tuple[str, int, int, int]]) -> None:
    trio.run(_run, ops)
