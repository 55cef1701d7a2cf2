"""`check_backend`: the conformance suite any asynctc backend can run against itself.

It drives a backend only through the public API, as a user would, and checks the contract's behaviour
that every backend must share: placement order, ownership marks, compare-and-swap updates, idempotent
detach, cleanup on exception, on cancellation and at session close, clear errors for bad inputs, and that
the kernel (the record of truth) agrees with the session after each step.

    from asynctc.testing import check_backend

    async def test_my_backend() -> None:
        kernel = MockKernel()
        await check_backend("mock", kernel=kernel, dev="eth0", program=kernel.program)

A failed check raises AssertionError naming the check and what differed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import trio

import asynctc
from asynctc import After, Before, Direction, First, Last, Program, State
from asynctc.programs import Verdict

__all__ = ["check_backend"]

ProgramFactory = Callable[[Verdict], Program]


def _fail(check: str, detail: str) -> AssertionError:
    return AssertionError(f"check_backend: {check}: {detail}")


async def _owned_ids(session: asynctc.Session, dev: str, direction: Direction) -> list[int]:
    hook = await session.query(dev, direction)
    return [e.prog_id for e in hook.entries if e.owned]


async def _consistent(session: asynctc.Session, dev: str, direction: Direction, check: str) -> None:
    """The kernel lists, as owned, exactly the programs of the session's live attachments on the hook."""
    owned = sorted(await _owned_ids(session, dev, direction))
    live = sorted(a.info.prog_id for a in session.attachments
                  if a.info.dev == dev and a.info.direction is direction)
    if owned != live:
        raise _fail(check, f"kernel lists owned programs {owned}, session holds {live}")


async def check_backend(
    backend: str,
    *,
    dev: str,
    program: ProgramFactory,
    netns: str | None = None,
    kernel: Any = None,
    direction: Direction | str = Direction.INGRESS,
    plugins: Sequence[object] | None = None,
    **attach_options: object,
) -> None:
    """Run the conformance checks against `backend` on device `dev`.

    Args:
        backend: the backend's registered name.
        dev: a device of the session's namespace whose `direction` hook is empty and may be used freely.
        program: makes a fresh program for a verdict ("pass", "drop", "next"); each call a new program.
        netns, kernel, plugins: passed to `asynctc.open_session`.
        direction: the hook to use.
        **attach_options: backend-specific options passed to every attach (e.g. mode="legacy").

    Raises:
        AssertionError naming the failed check.
    """
    d = Direction.coerce(direction)

    def session() -> Any:
        return asynctc.open_session(backend, netns=netns, kernel=kernel, plugins=plugins)

    async with session() as s:
        if s.backend_name != backend:
            raise _fail("backend", f"session resolved {s.backend_name!r}, not {backend!r}")
        probes = await s.probe()
        if backend not in probes or not probes[backend].available:
            raise _fail("probe", f"{backend!r} probes as {probes.get(backend)!r}")
        if (await s.query(dev, d)).entries:
            raise _fail("precondition", f"the {dev}/{d.value} hook must start empty")

        # -- placement ---------------------------------------------------------------------------------
        p = [program("next") for _ in range(5)]
        a0 = await s.attach(dev, d, p[0], **attach_options)
        a1 = await s.attach(dev, d, p[1], position=Last(), **attach_options)
        a2 = await s.attach(dev, d, p[2], position=First(), **attach_options)
        a3 = await s.attach(dev, d, p[3], position=Before(a1), **attach_options)
        a4 = await s.attach(dev, d, p[4], position=After(p[2]), **attach_options)
        want = [p[2].id, p[4].id, p[0].id, p[3].id, p[1].id]
        got = [e.prog_id for e in (await s.query(dev, d)).entries]
        if got != want:
            raise _fail("placement", f"run order {got}, expected {want} (First/Last/Before/After)")
        await _consistent(s, dev, d, "ownership after attach")
        for a in (a0, a1, a2, a3, a4):
            i = a.info
            if (i.backend, i.dev, i.direction, a.state) != (backend, dev, d, State.ATTACHED):
                raise _fail("info", f"{a!r} has info {i!r} / state {a.state}")

        # -- updates -----------------------------------------------------------------------------------
        newer = program("next")
        stranger = program("next")
        try:
            await a0.update(newer, expected=stranger)
        except asynctc.Conflict:
            pass
        else:
            raise _fail("update", "a compare-and-swap with the wrong expected program did not raise Conflict")
        if a0.info.prog_id != p[0].id or p[0].id not in [e.prog_id for e in (await s.query(dev, d)).entries]:
            raise _fail("update", "a lost compare-and-swap changed the hook")
        result = await a0.update(newer, expected=p[0])
        if result.method not in ("link_update", "netlink_replace", "make_before_break"):
            raise _fail("update", f"unknown method {result.method!r}")
        got = [e.prog_id for e in (await s.query(dev, d)).entries]
        if a0.info.prog_id != newer.id or got[2] != newer.id or p[0].id in got:
            raise _fail("update", f"after the update the hook is {got}, the attachment says {a0.info.prog_id}")

        # -- detach ------------------------------------------------------------------------------------
        await a3.detach()
        await a3.detach()  # idempotent
        if a3.state is not State.DETACHED or a3 in s.attachments:
            raise _fail("detach", f"{a3!r} is {a3.state} after detach")
        await _consistent(s, dev, d, "ownership after detach")

        # -- scoped lifecycles -------------------------------------------------------------------------
        class Boom(Exception):
            pass

        scoped = program("pass")
        try:
            async with s.open_attachment(dev, d, scoped, **attach_options):
                raise Boom
        except Boom:
            pass
        with trio.CancelScope() as cs:
            async with s.open_attachment(dev, d, program("pass"), **attach_options):
                cs.cancel()
                await trio.sleep_forever()
        if not cs.cancelled_caught:
            raise _fail("open_attachment", "the cancelled block did not end")
        await _consistent(s, dev, d, "open_attachment cleanup (exception and cancellation)")
        if scoped.id in [e.prog_id for e in (await s.query(dev, d)).entries]:
            raise _fail("open_attachment", "the attachment outlived its block")

        # cancellation at the very start of an attach leaves nothing, and the session stays consistent
        with trio.CancelScope() as cs2:
            cs2.cancel()
            await s.attach(dev, d, program("pass"), **attach_options)
        await _consistent(s, dev, d, "cancelled attach")

        # -- bad inputs --------------------------------------------------------------------------------
        try:
            await s.attach("asynctc-no-such-dev", d, program("pass"), **attach_options)
        except asynctc.DeviceNotFound:
            pass
        else:
            raise _fail("errors", "an unknown device did not raise DeviceNotFound")
        closed = program("pass")
        closed.close()
        try:
            await s.attach(dev, d, closed, **attach_options)
        except asynctc.ProgramError:
            pass
        else:
            raise _fail("errors", "a closed program did not raise ProgramError")
        await _consistent(s, dev, d, "after bad inputs")
        remaining = {a.info.prog_id for a in s.attachments}

    # -- session close ---------------------------------------------------------------------------------
    async with session() as s2:
        left = [e.prog_id for e in (await s2.query(dev, d)).entries if e.prog_id in remaining]
        if left:
            raise _fail("session close", f"programs {left} were still attached after the session closed")
