"""`check_backend`: the conformance suite any asynctc backend can run against itself.

It drives a backend only through the public API, as a user would, and checks the contract's behaviour
that every backend must share: placement order, ownership marks, compare-and-swap updates, idempotent
detach, cleanup on exception, on cancellation and at session close, clear errors for bad inputs, that the
kernel (the record of truth) agrees with the session after each step, and, given what they need: reaping
that spares live owners, pin -> adopt -> unpin across sessions, severing and the events that report it.

    from asynctc.testing import check_backend

    async def test_my_backend() -> None:
        kernel = MockKernel()
        await check_backend("mock", kernel=kernel, dev="eth0", program=kernel.program)

        # or with a factory of sessions (any backend, registered however), and the optional checks:
        async def remove(dev: str) -> None:
            kernel.remove_device(dev)

        report = await check_backend(
            lambda: asynctc.open_session("mock", kernel=kernel), dev="veth0", program=kernel.program,
            pin_dir="/sys/fs/bpf", remove_device=remove, events=True,
        )
        assert not report.skipped

A failed check raises AssertionError naming the check and what differed. The returned `CheckReport` says
which checks ran and which were skipped, and why.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeAlias

import trio

import asynctc
from asynctc import After, Before, Direction, First, Last, Program, State, programs
from asynctc.events import (
    AttachmentSevered,
    DeviceAdded,
    DeviceRemoved,
    FilterAdded,
    FilterRemoved,
    QdiscAdded,
    QdiscRemoved,
)
from asynctc.programs import Verdict

__all__ = ["CheckReport", "SessionFactory", "check_backend"]

ProgramFactory: TypeAlias = Callable[[Verdict], Program]
SessionFactory: TypeAlias = Callable[[], AbstractAsyncContextManager[asynctc.Session]]
"""Opens a new session of the backend under test each time it is called (e.g. `lambda:
asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()])`); every session it opens must work on
the same kernel (namespace, or in-memory kernel object)."""

_KERNEL_EVENTS = (DeviceAdded, DeviceRemoved, QdiscAdded, QdiscRemoved, FilterAdded, FilterRemoved)


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What `check_backend` checked.

    Attributes:
        backend: the name of the backend the sessions used.
        passed: the checks that ran and passed, in order.
        skipped: the checks that did not run, each with the reason (an argument not given, or the backend
            declaring it cannot do it).
        kernel_events: whether a monitor received kernel events (DeviceRemoved...) in the severing check:
            the backend has an event source. False when it has none (the session polls for severing) or
            the severing check did not run.
    """

    backend: str
    passed: tuple[str, ...]
    skipped: Mapping[str, str]
    kernel_events: bool


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
    backend: str | SessionFactory,
    *,
    dev: str,
    program: ProgramFactory | None = None,
    netns: str | None = None,
    kernel: Any = None,
    direction: Direction | str = Direction.INGRESS,
    plugins: Sequence[object] | None = None,
    pin_dir: str | None = None,
    remove_device: Callable[[str], Awaitable[None]] | None = None,
    events: bool | None = None,
    sever_timeout: float = 30.0,
    **attach_options: object,
) -> CheckReport:
    """Run the conformance checks against a backend on device `dev`.

    Args:
        backend: the backend's registered name (sessions are opened with `asynctc.open_session(backend,
            netns=netns, kernel=kernel, plugins=plugins)`), or a `SessionFactory`: a callable opening a new
            session of the backend under test each time (then leave netns, kernel and plugins out).
        dev: a device of the session's namespace whose `direction` hook is empty and may be used freely.
        program: makes a fresh program for a verdict ("pass", "drop", "next"); each call a new program.
            Default: the `program` method of the session's in-memory kernel where it has one (the mock's,
            the dummy backend's), else `asynctc.programs.constant` (real BPF programs: needs CAP_BPF).
        netns, kernel, plugins: passed to `asynctc.open_session` when `backend` is a name.
        direction: the hook to use.
        pin_dir: a directory where the pin check may pin (on bpffs for backends of the real kernel). Without
            it the pin check is skipped.
        remove_device: deletes a device given its name (`await remove_device(dev)`); the severing check,
            the last one, calls it once on `dev`. Without it the severing and events checks are skipped.
        events: whether the backend has an event source (True: a DeviceRemoved for `dev` must reach a
            monitor; False: no kernel event may, only the AttachmentSevered). None: find out from what came
            (a DeviceRemoved seen: as True; else the events check is skipped).
        sever_timeout: how long the severing check waits for the session to notice the device's removal.
        **attach_options: backend-specific options passed to every attach (e.g. mode="legacy").

    Returns:
        A `CheckReport`: the checks that passed, those skipped and why, whether kernel events came.

    Raises:
        AssertionError naming the failed check; TypeError or ValueError for a bad argument (netns, kernel
        or plugins given with a factory...), before anything is attached.
    """
    d = Direction.coerce(direction)
    if isinstance(backend, str):
        name = backend

        def session() -> AbstractAsyncContextManager[asynctc.Session]:
            return asynctc.open_session(name, netns=netns, kernel=kernel, plugins=plugins)
    elif callable(backend):
        if netns is not None or kernel is not None or plugins is not None:
            raise TypeError("check_backend: with a session factory, give netns=, kernel= and plugins= to the "
                            "factory's open_session(), not to check_backend")
        name = ""
        session = backend
    else:
        raise TypeError(f"check_backend: backend must be a backend name or a session factory, got {backend!r}")
    if pin_dir is not None and (not isinstance(pin_dir, str) or not pin_dir.startswith("/")):
        raise ValueError(f"check_backend: pin_dir must be an absolute directory path, got {pin_dir!r}")
    if remove_device is not None and not callable(remove_device):
        raise TypeError(f"check_backend: remove_device must be an async callable taking a device name, got "
                        f"{remove_device!r}")
    if events is not None and not isinstance(events, bool):
        raise TypeError(f"check_backend: events must be True, False or None, got {events!r}")
    if (not isinstance(sever_timeout, int | float) or isinstance(sever_timeout, bool)
            or not sever_timeout > 0):
        raise ValueError(f"check_backend: sever_timeout must be > 0 seconds, got {sever_timeout!r}")

    if program is None:
        async with session() as s:
            program = _default_program(s)
    check = _Checks(session, name, dev, d, program, attach_options)
    await check.basics()
    await check.reaping()
    if pin_dir is None:
        check.skipped["pin/adopt"] = "no pin_dir given"
    else:
        await check.pin_adopt(pin_dir)
    if remove_device is None:
        check.skipped["severing"] = "no remove_device given"
        check.skipped["events"] = "no remove_device given: nothing provokes a kernel event"
    else:
        await check.severing(remove_device, events, sever_timeout)
    return CheckReport(check.name, tuple(check.passed), dict(check.skipped), check.kernel_events)


def _default_program(session: asynctc.Session) -> ProgramFactory:
    """The session's in-memory kernel's `program` method, else real programs (asynctc.programs)."""
    make = getattr(session.kernel, "program", None)
    if callable(make):
        def simulated(verdict: Verdict) -> Program:
            prog = make(verdict)
            if not isinstance(prog, Program):
                raise TypeError(f"check_backend: {session.kernel!r}.program() returned {prog!r}, not a Program; "
                                "pass program= explicitly")
            return prog

        return simulated

    def real(verdict: Verdict) -> Program:
        programs.verdict_value(verdict)  # ValueError naming the verdicts
        return programs.constant(verdict)

    return real


class _Checks:
    def __init__(self, session: SessionFactory, name: str, dev: str, direction: Direction,
                 program: ProgramFactory, attach_options: Mapping[str, Any]) -> None:
        self.session = session
        self.name = name
        self.dev = dev
        self.direction = direction
        self.program = program
        self.options: dict[str, Any] = dict(attach_options)
        self.passed: list[str] = []
        self.skipped: dict[str, str] = {}
        self.kernel_events = False

    async def _attach(self, s: asynctc.Session, verdict: Verdict = "pass") -> asynctc.Attachment:
        return await s.attach(self.dev, self.direction, self.program(verdict), **self.options)

    async def _prog_ids(self, s: asynctc.Session) -> list[int]:
        return [e.prog_id for e in (await s.query(self.dev, self.direction)).entries]

    async def basics(self) -> None:
        """Placement, ownership, updates, detach, scoped lifecycles, bad inputs, cleanup at close."""
        session, dev, d, program, attach_options = self.session, self.dev, self.direction, self.program, self.options
        async with session() as s:
            if not self.name:
                self.name = s.backend_name
            backend = self.name
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
            self.passed.append("placement")

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
            self.passed.append("update")

            # -- detach ------------------------------------------------------------------------------------
            await a3.detach()
            await a3.detach()  # idempotent
            if a3.state is not State.DETACHED or a3 in s.attachments:
                raise _fail("detach", f"{a3!r} is {a3.state} after detach")
            await _consistent(s, dev, d, "ownership after detach")
            self.passed.append("detach")

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
            self.passed.append("open_attachment")

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
            self.passed.append("errors")

        # -- session close ---------------------------------------------------------------------------------
        async with session() as s2:
            left = [e.prog_id for e in (await s2.query(dev, d)).entries if e.prog_id in remaining]
            if left:
                raise _fail("session close", f"programs {left} were still attached after the session closed")
        self.passed.append("session close")

    async def reaping(self) -> None:
        """With every owner alive, `reap_orphans` removes nothing: not the reaping session's own attachments,
        not another live session's. Each session marks only its own entries as owned."""
        async with self.session() as s1:
            mine = await self._attach(s1)
            async with self.session() as s2:
                theirs = await self._attach(s2)
                removed = await s2.reap_orphans()
                if removed:
                    raise _fail("reaping", f"reap_orphans removed {removed} while every owner was alive")
                entries = {e.prog_id: e.owned for e in (await s2.query(self.dev, self.direction)).entries}
                want = {mine.info.prog_id: False, theirs.info.prog_id: True}
                got = {k: entries.get(k) for k in want}
                if got != want:
                    raise _fail("reaping", f"after reap_orphans, owned marks by program {got}, expected {want} "
                                           "(None: no longer on the hook)")
            removed = await s1.reap_orphans()
            if removed or mine.state is not State.ATTACHED:
                raise _fail("reaping", f"reap_orphans removed {removed}; the session's own attachment is "
                                       f"{mine.state}")
            left = await self._prog_ids(s1)
            if theirs.info.prog_id in left:
                raise _fail("reaping", f"program {theirs.info.prog_id} outlived the session that attached it")
            await _consistent(s1, self.dev, self.direction, "reaping")
        self.passed.append("reaping")

    async def pin_adopt(self, pin_dir: str) -> None:
        """pin -> close the session (the pinned attachment stays) -> adopt it in a new session -> unpin ->
        close (now it is detached). A backend that cannot pin raises PinError without an errno (the base
        class's `Backend.pin` does): the check is then skipped."""
        path = f"{pin_dir.rstrip('/')}/asynctc_check_{uuid.uuid4().hex[:12]}"
        async with self.session() as s1:
            att = await self._attach(s1)
            prog_id = att.info.prog_id
            try:
                await att.pin(path)
            except asynctc.PinError as exc:
                if exc.errno is None and att.info.pinned is None:
                    self.skipped["pin/adopt"] = f"the backend cannot pin: {exc}"
                    return
                raise _fail("pin/adopt", f"pinning at {path} failed: {exc!r}") from exc
            if att.info.pinned != path or not att.pinned:
                raise _fail("pin/adopt", f"after pin({path!r}) the attachment says pinned={att.info.pinned!r}")
        if att.state is not State.ATTACHED:
            raise _fail("pin/adopt", f"the pinned attachment is {att.state} after its session closed")
        async with self.session() as s2:
            entries = {e.prog_id: e.owned for e in (await s2.query(self.dev, self.direction)).entries}
            if entries.get(prog_id) is not False:
                where = "missing from" if prog_id not in entries else "marked owned on"
                raise _fail("pin/adopt", f"program {prog_id}, pinned, is {where} the hook in a new session "
                                         "before adopting")
            try:
                adopted = await s2.adopt_pinned(path)
            except asynctc.TCError as exc:
                raise _fail("pin/adopt", f"adopting the attachment pinned at {path} failed: {exc!r}") from exc
            i = adopted.info
            if ((i.prog_id, i.dev, i.direction, i.pinned, adopted.state)
                    != (prog_id, self.dev, self.direction, path, State.ATTACHED)):
                raise _fail("pin/adopt", f"the adopted attachment is {adopted!r} ({adopted.state}), info {i!r}")
            if await s2.adopt_pinned(path) is not adopted:
                raise _fail("pin/adopt", "adopting the same path again in the same session gave another handle")
            await _consistent(s2, self.dev, self.direction, "pin/adopt: ownership after adopt")
            await adopted.unpin()
            if adopted.info.pinned is not None or adopted.pinned:
                raise _fail("pin/adopt", f"after unpin() the attachment says pinned={adopted.info.pinned!r}")
            try:
                await s2.adopt_pinned(path)
            except asynctc.PinError:
                pass
            else:
                raise _fail("pin/adopt", f"adopting {path} after unpin() did not raise PinError")
        async with self.session() as s3:
            if prog_id in await self._prog_ids(s3):
                raise _fail("pin/adopt", f"program {prog_id}, unpinned, was still attached after its session closed")
        self.passed.append("pin/adopt")

    async def severing(self, remove_device: Callable[[str], Awaitable[None]], events: bool | None,
                       limit: float) -> None:
        """Delete the device under an attachment: the session notices (AttachmentSevered on a monitor, state
        SEVERED, Severed on update, detach a no-op). Then the events: a backend with an event source
        delivers the device's DeviceRemoved too (before or after the AttachmentSevered: the session may find
        the severing by itself first); one without delivers no kernel event."""
        async with self.session() as s:
            att = await self._attach(s)
            ifindex = att.info.ifindex
            seen: list[object] = []
            removed = False
            async with s.open_monitor() as monitor:
                await remove_device(self.dev)
                with trio.move_on_after(limit):
                    async for ev in monitor:
                        seen.append(ev)
                        removed = removed or (isinstance(ev, DeviceRemoved) and ev.ifindex == ifindex)
                        if isinstance(ev, AttachmentSevered) and ev.attachment is att:
                            break
                    # With an event source, the DeviceRemoved may still be on its way.
                    if events and not removed:
                        async for ev in monitor:
                            seen.append(ev)
                            if isinstance(ev, DeviceRemoved) and ev.ifindex == ifindex:
                                removed = True
                                break
            if not any(isinstance(ev, AttachmentSevered) and ev.attachment is att for ev in seen):
                raise _fail("severing", f"no AttachmentSevered for {att!r} within {limit}s of deleting "
                                        f"{self.dev}; the monitor saw {seen}")
            if att.state is not State.SEVERED or att in s.attachments or not att.sever_reason:
                raise _fail("severing", f"{att!r} is {att.state} (reason {att.sever_reason!r}) after severing")
            with trio.fail_after(limit):
                await att.wait_severed()
            await att.detach()  # a no-op on a severed attachment
            try:
                await att.update(self.program("pass"))
            except asynctc.Severed:
                pass
            else:
                raise _fail("severing", "update() of a severed attachment did not raise Severed")
            self.passed.append("severing")
            kernel_events = [ev for ev in seen if isinstance(ev, _KERNEL_EVENTS)]
            self.kernel_events = bool(kernel_events)
            if events is None and not removed:
                self.skipped["events"] = ("no DeviceRemoved came before the AttachmentSevered, which does not tell "
                                          "whether the backend has an event source: pass events=True or False")
                return
            if (events or events is None) and not removed:
                raise _fail("events", f"no DeviceRemoved for {self.dev} (ifindex {ifindex}) within {limit}s of "
                                      f"deleting it; the monitor saw {seen}")
            if events is False and kernel_events:
                raise _fail("events", f"events=False, but the monitor delivered kernel events {kernel_events}")
            self.passed.append("events")
