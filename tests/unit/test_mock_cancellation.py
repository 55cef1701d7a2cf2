"""Cancellation at every checkpoint of attach, update and detach, lifecycles in nurseries, KeyboardInterrupt,
and failing cleanups, on the mock backend: after each, the kernel holds exactly what the session knows."""

from __future__ import annotations

import errno
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from _mockutil import assert_consistent, kernel_entries, qdiscs

import asynctc
from asynctc import Direction, State
from asynctc_mock import MockKernel

IN = Direction.INGRESS
MAX_STEPS = 200


class _CancelAtStep(trio.abc.Instrument):
    """Cancels `scope` when `task` is about to run its `n`th step: the cancellation is delivered at the
    task's next checkpoint, i.e. the n-th checkpoint of the operation (n = 0: before it starts)."""

    def __init__(self, task: trio.lowlevel.Task, n: int, scope: trio.CancelScope) -> None:
        self.task = task
        self.n = n
        self.scope = scope
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1
            if self.steps == self.n:
                self.scope.cancel()


async def run_cancelled_at(n: int, fn: Callable[[], Awaitable[Any]]) -> bool:
    """Run `fn()` in a scope cancelled at its n-th checkpoint. True if it ran to the end without the
    cancellation ever being requested (n is past its last checkpoint)."""
    task = trio.lowlevel.current_task()
    with trio.CancelScope() as scope:
        inst = _CancelAtStep(task, n, scope)
        if n == 0:
            scope.cancel()
        trio.lowlevel.add_instrument(inst)
        try:
            await fn()
        finally:
            trio.lowlevel.remove_instrument(inst)
    return n > 0 and not scope.cancel_called


def assert_clean(kernel: MockKernel) -> None:
    """After the session closed: nothing owned is left anywhere."""
    assert kernel_entries(kernel) == set()
    assert qdiscs(kernel) == {}
    assert kernel.links() == ()


@pytest.mark.parametrize(
    "options",
    [{}, {"mode": "legacy"}, {"offload": "prefer"}, {"offload": "require", "dev": "nic0"}],
    ids=["tcx", "legacy", "prefer-fallback", "offload"],
)
async def test_attach_cancelled_at_every_checkpoint(options: dict[str, Any]) -> None:
    opts = dict(options)
    dev = opts.pop("dev", "eth0")
    for n in range(MAX_STEPS):
        kernel = MockKernel()
        kernel.add_device("nic0", offload=True)
        async with asynctc.open_session(backend="mock", kernel=kernel) as s:
            other = await s.attach(dev, IN, kernel.program())  # something already there
            done = await run_cancelled_at(
                n, lambda s=s, k=kernel: s.attach(dev, IN, k.program(), **opts)  # type: ignore[misc]
            )
            assert_consistent(kernel, s)
            assert other.state is State.ATTACHED
            assert len(s.attachments) in (1, 2)
        assert_clean(kernel)
        if done:
            assert n > 1  # there were checkpoints to cancel at
            break
    else:
        pytest.fail("attach never completed")


@pytest.mark.parametrize("mode", ["legacy", "tcx"])
async def test_open_attachment_cancelled_at_every_checkpoint(mode: str) -> None:
    for n in range(MAX_STEPS):
        kernel = MockKernel()

        async def lifecycle(s: asynctc.Session, k: MockKernel = kernel) -> None:
            async with s.open_attachment("eth0", IN, k.program(), mode=mode):
                await trio.lowlevel.checkpoint()

        async with asynctc.open_session(backend="mock", kernel=kernel) as s:
            done = await run_cancelled_at(n, lambda s=s: lifecycle(s))  # type: ignore[misc]
            assert_consistent(kernel, s)
            assert s.attachments == ()
        assert_clean(kernel)
        if done:
            break
    else:
        pytest.fail("the lifecycle never completed")


async def test_an_open_attachment_context_manager_is_entered_once(kernel: MockKernel) -> None:
    async with asynctc.open_session(backend="mock", kernel=kernel) as s:
        block = s.open_attachment("eth0", IN, kernel.program())
        async with block as att:
            with pytest.raises(RuntimeError, match="entered only once"):
                async with block:
                    pass  # pragma: no cover - never entered
            assert s.attachments == (att,)
        assert att.state is State.DETACHED
        assert kernel_entries(kernel) == set()


@pytest.mark.parametrize("how", ["link_update", "make_before_break", "netlink_replace"])
async def test_update_cancelled_at_every_checkpoint(how: str) -> None:
    for n in range(MAX_STEPS):
        kernel = MockKernel()
        async with asynctc.open_session(backend="mock", kernel=kernel) as s:
            old, new = kernel.program(), kernel.program()
            opts: dict[str, Any] = {"mode": "legacy"} if how == "netlink_replace" else {}
            att = await s.attach("eth0", IN, old, **opts)
            await s.attach("eth0", IN, kernel.program(), **opts)
            if how == "make_before_break":
                kernel.inject_fault("link_update", errno.EOPNOTSUPP)
            done = await run_cancelled_at(n, partial(att.update, new, expected=old))
            kernel.clear_faults()
            running = kernel.filters("eth0", IN)[0].prog_id if how == "netlink_replace" else \
                kernel.hook("eth0", IN).prog_ids[0]
            assert running in (old.id, new.id)
            assert att.info.prog_id == running  # the record matches the kernel, whichever it is
            assert att.state is State.ATTACHED
            assert_consistent(kernel, s)
        assert_clean(kernel)
        if done:
            assert running == new.id
            break
    else:
        pytest.fail("update never completed")


@pytest.mark.parametrize("mode", ["tcx", "legacy"])
async def test_detach_cancelled_at_every_checkpoint(mode: str) -> None:
    for n in range(MAX_STEPS):
        kernel = MockKernel()
        async with asynctc.open_session(backend="mock", kernel=kernel) as s:
            att = await s.attach("eth0", IN, kernel.program(), mode=mode)
            done = await run_cancelled_at(n, att.detach)
            assert att.state in (State.ATTACHED, State.DETACHED)
            assert_consistent(kernel, s)
        assert_clean(kernel)
        if done:
            assert att.state is State.DETACHED
            break
    else:
        pytest.fail("detach never completed")


async def test_cancel_while_the_kernel_blocks_a_worker_thread(kernel: MockKernel) -> None:
    kernel.set_latency(0.05, op="link_create")
    async with asynctc.open_session(backend="mock", kernel=kernel) as s:
        with trio.move_on_after(0.01) as scope:
            await s.attach("eth0", IN, kernel.program())
            await trio.lowlevel.checkpoint()  # the pending cancellation is delivered here
        assert scope.cancelled_caught
        # The kernel call was not abandoned: it finished, and the session recorded what it made.
        assert len(s.attachments) == 1
        assert_consistent(kernel, s)
    assert_clean(kernel)


async def test_nested_open_attachment_scopes(kernel: MockKernel) -> None:
    events: list[tuple[str, int]] = []

    class Observer:
        @asynctc.hookimpl
        def asynctc_attachment_event(self, event: asynctc.events.AttachmentEvent) -> None:
            events.append((event.kind, event.info.prog_id))

    outer_prog, inner_prog = kernel.program(), kernel.program()
    async with asynctc.open_session(backend="mock", kernel=kernel, plugins=[Observer()]) as s:
        with trio.CancelScope() as scope:
            async with s.open_attachment("eth0", IN, outer_prog) as outer:
                async with s.open_attachment("eth0", IN, inner_prog, position=asynctc.Before(outer)) as inner:
                    assert (await s.query("eth0", IN)).prog_ids == (inner_prog.id, outer_prog.id)
                    scope.cancel()
                    await trio.sleep_forever()
        assert scope.cancelled_caught
        assert (inner.state, outer.state) == (State.DETACHED, State.DETACHED)
        assert events == [("attach", outer_prog.id), ("attach", inner_prog.id),
                          ("detach", inner_prog.id), ("detach", outer_prog.id)]
        assert kernel_entries(kernel) == set()


async def test_many_lifecycles_one_fails(kernel: MockKernel) -> None:
    started = 0
    all_up = trio.Event()

    async def lifecycle(s: asynctc.Session, i: int) -> None:
        nonlocal started
        async with s.open_attachment("eth0", IN, kernel.program(), mode="legacy" if i % 2 else "tcx"):
            started += 1
            if started == 10:
                all_up.set()
            with trio.fail_after(10):
                await all_up.wait()
            if i == 7:
                raise ValueError("lifecycle 7 failed")
            await trio.sleep_forever()

    with pytest.RaisesGroup(pytest.RaisesExc(ValueError, match="lifecycle 7")):
        async with asynctc.open_session(backend="mock", kernel=kernel) as s, trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(lifecycle, s, i)
    assert_clean(kernel)


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    reason="SIGINT is ignored in this process (started as a background job?): trio cannot turn a raised "
           "SIGINT into KeyboardInterrupt, so there is no Ctrl-C to test",
)
def test_keyboard_interrupt_during_a_lifecycle_leaves_nothing() -> None:
    kernel = MockKernel()
    seen: list[State] = []

    async def main() -> None:
        async with asynctc.open_session(backend="mock", kernel=kernel) as s:
            async with s.open_attachment("eth0", IN, kernel.program()) as att:
                await s.attach("veth0", IN, kernel.program(), mode="legacy")
                seen.append(att.state)
                signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, delivered by trio at the next checkpoint
                with trio.fail_after(10):  # TooSlowError, not KeyboardInterrupt, if it never comes
                    await trio.sleep_forever()

    with pytest.raises(KeyboardInterrupt):
        trio.run(main)
    assert seen == [State.ATTACHED]
    assert_clean(kernel)


async def test_failing_detach_in_open_attachment_is_a_cleanup_error(kernel: MockKernel) -> None:
    async with asynctc.open_session(backend="mock", kernel=kernel) as s:
        kernel.inject_fault("link_detach", errno.EIO)
        with pytest.raises(asynctc.CleanupError) as e:
            async with s.open_attachment("eth0", IN, kernel.program()):
                pass
        (cause,) = e.value.errors
        assert isinstance(cause, asynctc.TCError) and cause.errno == errno.EIO
        assert len(s.attachments) == 1  # still attached, still known: the session retries at close
    assert_clean(kernel)


async def test_failing_detach_never_hides_the_body_error(kernel: MockKernel) -> None:
    async with asynctc.open_session(backend="mock", kernel=kernel) as s:
        kernel.inject_fault("filter_delete", errno.EIO)
        with pytest.raises(KeyError) as e:
            async with s.open_attachment("eth0", IN, kernel.program(), mode="legacy"):
                raise KeyError("body")
        assert any("cleanup" in note and "EIO" in note for note in e.value.__notes__)
    assert_clean(kernel)


async def test_failing_session_cleanup_is_a_cleanup_error(kernel: MockKernel) -> None:
    async def clean_body() -> None:
        async with asynctc.open_session(backend="mock", kernel=kernel) as s:
            await s.attach("eth0", IN, kernel.program())
            await s.attach("eth0", IN, kernel.program())
            kernel.inject_fault("link_detach", errno.EIO)

    async def failing_body() -> None:
        async with asynctc.open_session(backend="mock", kernel=kernel) as s:
            await s.attach("veth0", IN, kernel.program())
            kernel.inject_fault("link_detach", errno.EIO)
            raise ZeroDivisionError("body")

    with pytest.raises(asynctc.CleanupError) as e:
        await clean_body()
    assert [err.errno for err in e.value.errors] == [errno.EIO]  # type: ignore[attr-defined]
    # reported; and the link went with its fd anyway, as on the real kernel (closing the last fd of an
    # unpinned link detaches it): a failed detach leaks nothing
    assert kernel.hook("eth0", IN).entries == ()
    with pytest.raises(ZeroDivisionError, match="body") as z:
        await failing_body()
    assert any("session cleanup also failed" in note for note in z.value.__notes__)


@pytest.mark.parametrize("backend", ["netlink", "bpf_link"])
async def test_a_slow_detach_at_the_end_of_a_block_is_not_cut_by_cleanup_timeout(backend: str) -> None:
    """cleanup_timeout bounds the wait to START the detach at a block's end (another operation may hold
    the attachment); once started, the detach runs to its end with no deadline, like every kernel-changing
    step: a deadline could only cut it between steps (netlink: the filter deleted, its clsact qdisc left)."""
    kernel = MockKernel()
    severed: list[object] = []
    async with asynctc.open_session(backend, kernel=kernel, cleanup_timeout=0.05) as s:
        async with s.open_monitor() as monitor, trio.open_nursery() as nursery:
            async def watch() -> None:
                async for event in monitor:
                    if isinstance(event, asynctc.events.AttachmentSevered):
                        severed.append(event)

            nursery.start_soon(watch)
            async with s.open_attachment("eth0", IN, kernel.program()) as att:
                kernel.set_latency(0.2, "filter_delete" if backend == "netlink" else "link_detach")
            kernel.set_latency(0)
            assert att.state is State.DETACHED
            assert kernel_entries(kernel) == set() and qdiscs(kernel) == {}
            nursery.cancel_scope.cancel()
        # the session closes with its own attach+detach finished: nothing for the close to do either
        attached = await s.attach("eth0", IN, kernel.program())
        kernel.set_latency(0.2, "filter_delete" if backend == "netlink" else "link_detach")
    kernel.set_latency(0)
    assert attached.state is State.DETACHED
    assert severed == []
    assert_clean(kernel)


async def test_a_block_whose_attachment_is_busy_past_cleanup_timeout_leaves_it_to_the_session() -> None:
    """The block's exit waits at most cleanup_timeout for the attachment's lock (here an update holds it):
    then it raises CleanupError saying it did not start the detach, and the session detaches it at close."""
    kernel = MockKernel()
    async with asynctc.open_session("bpf_link", kernel=kernel, cleanup_timeout=0.05) as s:
        old, new = kernel.program(), kernel.program()
        blocks: list[asynctc.Attachment] = []

        async def block(nursery: trio.Nursery) -> None:
            async with s.open_attachment("eth0", IN, old) as att:
                blocks.append(att)
                kernel.set_latency(0.3, "link_update")
                nursery.start_soon(att.update, new)
                await trio.testing.wait_all_tasks_blocked()  # the update holds the lock, in the kernel

        async with trio.open_nursery() as nursery:
            with pytest.raises(asynctc.CleanupError, match="could not start within 0.05s"):
                await block(nursery)
            kernel.set_latency(0)
        (att,) = blocks
        assert (att.state, att.info.prog_id) == (State.ATTACHED, new.id)
        assert s.attachments == (att,)
    assert att.state is State.DETACHED
    assert_clean(kernel)


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    reason="SIGINT is ignored in this process (started as a background job?): trio cannot turn a raised "
           "SIGINT into KeyboardInterrupt, so there is no Ctrl-C to test",
)
@pytest.mark.parametrize("backend", ["bpf_link", "mock"])
def test_a_ctrl_c_between_the_kernels_answer_and_the_registration_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, backend: str,
) -> None:
    """The attach is KI-protected: a Ctrl-C arriving after the kernel made the link and before the session
    recorded it is delivered at the next checkpoint, once the session owns the attachment (which its
    cleanup then detaches), not in the middle of the registration."""
    from asynctc._lifecycle import Lifecycle

    kernel = MockKernel()
    register = Lifecycle.register

    def interrupted_register(self: Lifecycle, *args: Any, **kwargs: Any) -> Any:
        signal.raise_signal(signal.SIGINT)  # a real Ctrl-C: its handler runs at the next bytecode
        return register(self, *args, **kwargs)

    monkeypatch.setattr(Lifecycle, "register", interrupted_register)
    recorded: list[int] = []

    async def main() -> None:
        async with asynctc.open_session(backend, kernel=kernel) as s:
            try:
                async with s.open_attachment("eth0", IN, kernel.program()):
                    recorded.append(len(s.attachments))
                    with trio.fail_after(10):  # TooSlowError, not KeyboardInterrupt, if it never comes
                        await trio.sleep_forever()
            finally:
                recorded.append(len(s.attachments))

    with pytest.raises(KeyboardInterrupt):
        trio.run(main)
    assert recorded[-1] == 0  # detached by the block's cleanup
    assert_clean(kernel)
