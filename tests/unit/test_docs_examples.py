"""Every runnable example of docs/*.md, run as a test.

Each `async def` below whose name does not start with `test_` is an example exactly as the docs show it;
`test_docs_blocks_are_tested` checks that every ```python block of the docs appears here, so an example
cannot change in the docs without changing here. Mock examples need no privileges; real-kernel examples
are marked `kernel` and use the `netns`/`veth`/`bpffs` fixtures of asynctc.testing.pytest_plugin.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from dummy_backend import DummyNet, DummyPlugin

import asynctc
from asynctc import After, Before, First, Last, programs
from asynctc import events as ev
from asynctc.testing import VethPair, check_backend, send_frames, stress
from asynctc_mock import MockAttachment, MockBackend, MockKernel

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLES = DOCS / "examples"  # whole files the docs show, imported and run by the tests


# =========================================================================================================
# docs/tutorial.md
# =========================================================================================================
async def first_steps() -> None:
    kernel = MockKernel()  # devices lo, eth0, veth0, veth1
    async with asynctc.open_session("mock", kernel=kernel) as session:
        prog = kernel.program("drop")  # a simulated SCHED_CLS program
        async with session.open_attachment("eth0", "ingress", prog) as att:
            assert att.state is asynctc.State.ATTACHED
            assert kernel.send("eth0", "ingress") == "drop"
            assert prog.count() == 1
        assert att.state is asynctc.State.DETACHED
        assert kernel.send("eth0", "ingress") == "pass"  # nothing on the hook any more


async def count_real_packets(veth: VethPair) -> None:
    counter = programs.counting("pass")  # a real BPF program (needs CAP_BPF)
    async with asynctc.open_session(netns=veth.netns_a) as session:
        assert session.backend_name == "bpf_link"  # "auto" picked tcx on this kernel
        async with session.open_attachment(veth.a, "ingress", counter) as att:
            # frames sent from the peer end arrive at veth.a's ingress hook
            await trio.to_thread.run_sync(lambda: send_frames(veth.b, 3, netns=veth.netns_b))
            assert counter.count() == 3
            assert att.info.link_id is not None
        hook = await session.query(veth.a, "ingress")
        assert hook.entries == ()
    counter.close()


async def choose_a_backend() -> None:
    async with asynctc.open_session("mock") as session:  # a fresh MockKernel
        assert session.backend_name == "mock"
        assert isinstance(session.kernel, MockKernel)
        probes = await session.probe()  # every installed backend, probed in the session's namespace
        assert probes["mock"].available
        print({name: (p.available, p.reason) for name, p in probes.items()})


async def session_in_a_namespace(netns: str) -> None:
    async with asynctc.open_session("auto", netns=netns, owner="my-agent") as session:
        assert session.netns == netns and session.owner == "my-agent"
        ifindex, name = await session.resolve_device("lo")
        assert name == "lo"
        hook = await session.query(ifindex, "egress")  # devices are looked up in `netns`
        assert hook.entries == ()


async def attach_versus_open_attachment(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        att = await session.attach("eth0", asynctc.Direction.EGRESS, kernel.program())
        assert session.attachments == (att,)  # owned by the session until it closes
        async with session.open_attachment("veth0", "ingress", kernel.program()) as scoped:
            assert len(session.attachments) == 2
        assert scoped.state is asynctc.State.DETACHED  # detached when its block ended
        assert att.state is asynctc.State.ATTACHED
    assert att.state is asynctc.State.DETACHED  # detached when the session closed


async def positions(kernel: MockKernel) -> None:
    a, b, c, d, e = (kernel.program("next", name=n) for n in "abcde")
    async with asynctc.open_session("mock", kernel=kernel) as session:
        att_a = await session.attach("eth0", "ingress", a)  # Last() is the default
        await session.attach("eth0", "ingress", b, position=First())
        await session.attach("eth0", "ingress", c, position=Last())
        await session.attach("eth0", "ingress", d, position=Before(att_a))  # anchored to an Attachment
        await session.attach("eth0", "ingress", e, position=After(c.id))  # ... or a program id
        hook = await session.query("eth0", "ingress")
        assert [x.prog_name for x in hook.entries] == ["b", "d", "a", "c", "e"]
        with pytest.raises(asynctc.AnchorNotFound):
            await session.attach("eth0", "ingress", kernel.program(), position=Before(12345))


async def expected_revision(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        seen = await session.query("eth0", "ingress")
        assert seen.revision == 1  # an empty hook
        await session.attach("eth0", "ingress", kernel.program(), expected_revision=seen.revision)
        # someone else changes the hook between our query and our attach...
        kernel.attach_foreign_tcx("eth0", "ingress", kernel.program())
        with pytest.raises(asynctc.StaleRevision) as info:
            await session.attach("eth0", "ingress", kernel.program(), expected_revision=seen.revision + 1)
        assert info.value.errno == errno.ESTALE
        assert (await session.query("eth0", "ingress")).revision == 3


async def offload_modes(kernel: MockKernel) -> None:
    kernel.add_device("nic0", offload=True)  # a device that runs BPF in hardware
    async with asynctc.open_session("mock", kernel=kernel) as session:
        hw = await session.attach("nic0", "ingress", kernel.program(), offload="require")
        assert hw.info.offloaded
        sw = await session.attach("eth0", "ingress", kernel.program(), offload="prefer")
        assert not sw.info.offloaded  # eth0 cannot offload: attached in software instead
        with pytest.raises(asynctc.OffloadError):
            await session.attach("eth0", "egress", kernel.program(), offload="require")
        assert kernel.qdisc("eth0") is None or kernel.filters("eth0", "egress") == ()  # nothing left


async def query_and_ownership(kernel: MockKernel) -> None:
    foreign = kernel.program(name="theirs")
    kernel.attach_foreign_tcx("eth0", "ingress", foreign)  # another process's tcx link
    async with asynctc.open_session("mock", kernel=kernel) as session:
        mine = await session.attach("eth0", "ingress", kernel.program(name="mine"))
        hook = await session.query("eth0", "ingress")
        assert [(x.prog_name, x.kind, x.owned) for x in hook.entries] == [
            ("theirs", "tcx", False),
            ("mine", "tcx", True),
        ]
        assert hook.prog_ids == (foreign.id, mine.info.prog_id)
    async with asynctc.open_session("mock", kernel=kernel) as session:
        hook = await session.query("eth0", "ingress")
        assert [x.prog_name for x in hook.entries] == ["theirs"]  # untouched by the first session


async def update_in_place(kernel: MockKernel) -> None:
    v1, v2, v3 = kernel.program("pass"), kernel.program("drop"), kernel.program("pass")
    async with asynctc.open_session("mock", kernel=kernel) as session:
        att = await session.attach("eth0", "ingress", v1)
        result = await att.update(v2, expected=v1)  # compare-and-swap: only if v1 is still there
        assert result == asynctc.UpdateResult("link_update", 3)
        assert att.info.prog_id == v2.id
        with pytest.raises(asynctc.Conflict):
            await att.update(v3, expected=v1)  # v2 runs now, not v1: nothing changes
        assert kernel.send("eth0", "ingress") == "drop"


async def update_make_before_break(kernel: MockKernel) -> None:
    old, new = kernel.program("pass"), kernel.program("drop")
    async with asynctc.open_session("mock", kernel=kernel) as session:
        att = await session.attach("eth0", "ingress", old)
        first_link = att.info.link_id
        kernel.inject_fault("link_update", errno.EOPNOTSUPP)  # the kernel refuses the in-place update
        result = await att.update(new, expected=old)
        assert result.method == "make_before_break"
        assert att.info.link_id != first_link  # a new link replaced the old one
        assert (await session.query("eth0", "ingress")).prog_ids == (new.id,)


async def update_a_legacy_filter(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        att = await session.attach("eth0", "ingress", kernel.program(), mode="legacy")  # cls_bpf, as netlink
        assert att.info.link_id is None and att.info.priority is not None
        result = await att.update(kernel.program("drop"))
        assert result.method == "netlink_replace"


async def pin_and_adopt(kernel: MockKernel) -> None:
    prog = kernel.program("drop")
    async with asynctc.open_session("mock", kernel=kernel) as session:
        att = await session.attach("eth0", "ingress", prog)
        await att.pin("/sys/fs/bpf/eth0_ingress")
        assert att.pinned and att.info.pinned == "/sys/fs/bpf/eth0_ingress"
    # the session is gone; the pinned attachment still runs
    assert kernel.send("eth0", "ingress") == "drop"
    async with asynctc.open_session("mock", kernel=kernel) as session:
        again = await session.adopt_pinned("/sys/fs/bpf/eth0_ingress")
        assert again.info.prog_id == prog.id and again in session.attachments
        await again.unpin()  # the session's again: detached when the session closes
    assert kernel.send("eth0", "ingress") == "pass"


async def pin_on_a_real_kernel(veth: VethPair, bpffs: str) -> None:
    path = os.path.join(bpffs, "veth0_ingress")  # bpffs: a bpf filesystem mount
    prog = programs.constant("pass")
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as session:
        att = await session.attach(veth.a, "ingress", prog)
        await att.pin(path)
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as session:
        assert [x.owned for x in (await session.query(veth.a, "ingress")).entries] == [False]
        att = await session.adopt_pinned(path)
        assert [x.owned for x in (await session.query(veth.a, "ingress")).entries] == [True]
        await att.unpin()
        await att.detach()
    prog.close()


async def monitor_events(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session, session.open_monitor() as monitor:
        kernel.add_device("dummy0")
        kernel.remove_device("dummy0")
        added, removed = await monitor.receive(), await monitor.receive()
        assert isinstance(added, ev.DeviceAdded) and added.name == "dummy0"
        assert isinstance(removed, ev.DeviceRemoved) and removed.name == "dummy0"


async def names(monitor: asynctc.Monitor, count: int) -> list[str]:
    """The device names of the next `count` events, which must all be DeviceAdded."""
    got = [await monitor.receive() for _ in range(count)]
    assert all(isinstance(e, ev.DeviceAdded) for e in got), got
    return [e.name for e in got if isinstance(e, ev.DeviceAdded)]


async def slow_consumer(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        async with session.open_monitor(buffer=2) as slow, session.open_monitor() as fast:
            for i in range(5):
                kernel.add_device(f"d{i}")  # nobody reads `slow` meanwhile
            assert await names(fast, 5) == ["d0", "d1", "d2", "d3", "d4"]
            assert await names(slow, 2) == ["d0", "d1"]  # the rest was dropped
            kernel.add_device("d5")  # the next event comes after a report of the loss
            assert await slow.receive() == ev.EventsDropped(3)
            assert await names(slow, 1) == ["d5"]


async def resync_after_kernel_loss(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session, session.open_monitor() as monitor:
        kernel.add_device("x1")
        kernel.overflow_events()  # the kernel drops what the reader had not read yet (ENOBUFS)
        kernel.remove_device("x1")
        kernel.add_device("x2")
        got: list[ev.Event] = []
        while not isinstance(got[-1:] and got[-1], ev.Resynced):
            got.append(await monitor.receive())
        # x1 came and went unseen: only the difference is delivered, then Resynced
        assert got == [ev.DeviceAdded(kernel.devices()["x2"], "x2"), got[-1]]


async def severed(kernel: MockKernel) -> None:
    kernel.add_device("tmp0")
    async with asynctc.open_session("mock", kernel=kernel) as session, session.open_monitor() as monitor:
        att = await session.attach("tmp0", "ingress", kernel.program())
        kernel.remove_device("tmp0")  # as `ip link del tmp0` would
        with trio.fail_after(5):
            await att.wait_severed()
        assert att.state is asynctc.State.SEVERED
        assert att.sever_reason is not None and "tmp0" in att.sever_reason
        assert att not in session.attachments
        await att.detach()  # a no-op
        with pytest.raises(asynctc.Severed):
            await att.update(kernel.program())
        async for event in monitor:
            if isinstance(event, ev.AttachmentSevered):
                assert event.attachment is att
                break


async def reap_orphans(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel, owner="my-agent") as crashed:
        left = await crashed.attach("eth0", "ingress", kernel.program(), mode="legacy")
        kernel.kill_process(kernel.filters("eth0", "ingress")[0].name)  # its process dies; filters stay
        async with asynctc.open_session("mock", kernel=kernel, owner="my-agent") as session:
            removed = await session.reap_orphans()
            assert [(x.prog_id, x.kind, x.owned) for x in removed] == [(left.info.prog_id, "cls_bpf", False)]
            assert await session.reap_orphans() == ()  # nothing left to reap


async def real_backends_on_the_mock(kernel: MockKernel) -> None:
    async with asynctc.open_session("netlink", kernel=kernel) as session:  # the netlink backend, unchanged
        att = await session.attach("eth0", "ingress", kernel.program("drop"))
        assert att.info.backend == "netlink" and att.info.priority == 0x8000  # a cls_bpf filter
        assert kernel.filters("eth0", "ingress")[0].prog_id == att.info.prog_id
        assert kernel.send("eth0", "ingress") == "drop"
        assert kernel.calls["filter_add"] == 1
    assert kernel.qdisc("eth0") is None  # its clsact qdisc went with its last filter


async def inject_faults(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        kernel.inject_fault("link_create", errno.EPERM)  # the next link_create fails
        with pytest.raises(asynctc.PermissionDenied) as info:
            await session.attach("eth0", "ingress", kernel.program())
        assert "CAP_NET_ADMIN" in str(info.value)
        assert (await session.query("eth0", "ingress")).entries == ()  # a failed call changes nothing
        await session.attach("eth0", "ingress", kernel.program())  # the fault was used up
        assert kernel.calls["link_create"] == 2


async def latency(kernel: MockKernel) -> None:
    kernel.set_latency(0.05, "link_create")  # each link_create blocks its worker thread for 50 ms
    async with asynctc.open_session("mock", kernel=kernel) as session:
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for dev in ("eth0", "veth0", "veth1"):
                nursery.start_soon(session.attach, dev, "ingress", kernel.program())
        assert trio.current_time() - start >= 0.15  # the kernel lock serialises them, as rtnl does
        assert len(session.attachments) == 3
    kernel.set_latency(0, "link_create")


async def errors(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        prog = kernel.program()
        with pytest.raises(asynctc.DeviceNotFound):
            await session.attach("nope0", "ingress", prog)
        await session.attach("eth0", "ingress", prog)
        with pytest.raises(asynctc.AlreadyAttached) as info:
            await session.attach("eth0", "ingress", prog)  # the same program twice on one hook
        assert info.value.errno == errno.EEXIST
        assert "already on this hook" in str(info.value)
        with pytest.raises(asynctc.ProgramError):
            await session.attach("eth0", "egress", kernel.program(prog_type=6))  # an XDP program
        for _ in range(63):
            await session.attach("eth0", "egress", kernel.program())
        with pytest.raises(asynctc.HookFull):
            await session.attach("eth0", "egress", kernel.program())  # the 64th


async def test_first_steps() -> None:
    await first_steps()


@pytest.mark.kernel
async def test_count_real_packets(veth: VethPair) -> None:
    await count_real_packets(veth)


async def test_choose_a_backend() -> None:
    await choose_a_backend()


@pytest.mark.kernel
async def test_session_in_a_namespace(netns: str) -> None:
    await session_in_a_namespace(netns)


@pytest.mark.parametrize(
    "example",
    [
        attach_versus_open_attachment,
        positions,
        expected_revision,
        offload_modes,
        query_and_ownership,
        update_in_place,
        update_make_before_break,
        update_a_legacy_filter,
        pin_and_adopt,
        monitor_events,
        slow_consumer,
        resync_after_kernel_loss,
        severed,
        reap_orphans,
        real_backends_on_the_mock,
        inject_faults,
        latency,
        errors,
    ],
)
async def test_mock_examples(example: Callable[[MockKernel], Awaitable[None]], kernel: MockKernel) -> None:
    with trio.fail_after(20):
        await example(kernel)


@pytest.mark.kernel
async def test_pin_on_a_real_kernel(veth: VethPair, bpffs: str) -> None:
    await pin_on_a_real_kernel(veth, bpffs)


# =========================================================================================================
# docs/cancellation.md
# =========================================================================================================
async def cancelled_block(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        with trio.move_on_after(0.1):
            async with session.open_attachment("eth0", "ingress", kernel.program()):
                await trio.sleep_forever()  # cancelled here...
        # ...and the attachment was detached, shielded, on the way out
        assert session.attachments == ()
        assert kernel.hook("eth0", "ingress").entries == ()


async def cancelled_attach(kernel: MockKernel) -> None:
    kernel.set_latency(0.2, "link_create")  # a slow kernel
    async with asynctc.open_session("mock", kernel=kernel) as session:
        with trio.move_on_after(0.05) as scope:
            await session.attach("eth0", "ingress", kernel.program())
            await trio.lowlevel.checkpoint()  # the cancellation arrives here, not inside attach
        assert scope.cancelled_caught
        # the attach ran to completion and was registered: nothing is lost, nothing leaks
        assert len(session.attachments) == 1
        assert len(kernel.hook("eth0", "ingress").entries) == 1
    assert kernel.hook("eth0", "ingress").entries == ()  # and the session detached it
    kernel.set_latency(0, "link_create")


async def failed_cleanup_after_success(kernel: MockKernel) -> None:
    try:
        async with asynctc.open_session("mock", kernel=kernel) as session:
            await session.attach("eth0", "ingress", kernel.program())
            kernel.inject_fault("link_detach", errno.EIO)  # the detach at session close will fail
    except asynctc.CleanupError as exc:
        failures = exc.errors
    else:
        raise AssertionError("a failed cleanup is never silent")
    (err,) = failures
    assert isinstance(err, asynctc.TCError) and err.errno == errno.EIO


async def failed_detach_after_success(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        with pytest.raises(asynctc.CleanupError) as info:
            async with session.open_attachment("eth0", "ingress", kernel.program()) as att:
                kernel.inject_fault("link_detach", errno.EIO)  # the detach at the end of the block fails
        assert isinstance(info.value.errors[0], asynctc.TCError)
        assert att in session.attachments  # still the session's: it tries again when it closes
    assert kernel.hook("eth0", "ingress").entries == ()


async def failed_cleanup_after_failure(kernel: MockKernel) -> None:
    try:
        async with asynctc.open_session("mock", kernel=kernel) as session:
            async with session.open_attachment("eth0", "ingress", kernel.program()):
                kernel.inject_fault("link_detach", errno.EIO)
                raise ValueError("the block's own error")
    except ValueError as exc:  # the block's error is what propagates...
        notes = exc.__notes__  # ...and the failed cleanup is attached to it as a note
    assert any("cleanup of" in note and "EIO" in note for note in notes)


async def main(kernel: MockKernel) -> None:
    async with asynctc.open_session("mock", kernel=kernel) as session:
        await session.attach("eth0", "ingress", kernel.program())
        os.kill(os.getpid(), signal.SIGTERM)  # as if the service manager stopped us
        await trio.sleep_forever()


async def stopped_by_sigterm(kernel: MockKernel) -> None:
    with pytest.raises(asynctc.Interrupted) as info:
        await asynctc.run_until_interrupted(main, kernel)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert kernel.hook("eth0", "ingress").entries == ()  # the session detached it on the way out


def run_program(main: Callable[..., Awaitable[object]], *args: object) -> None:
    try:
        trio.run(asynctc.run_until_interrupted, main, *args)
    except asynctc.Interrupted as exc:
        sys.exit(exc.exit_code)


def test_run_program_exits_with_the_signal_code(kernel: MockKernel) -> None:
    with pytest.raises(SystemExit) as info:
        run_program(main, kernel)
    assert info.value.code == 128 + signal.SIGTERM
    assert kernel.hook("eth0", "ingress").entries == ()


async def namespace_deleted(netns: str) -> None:
    from asynctc.testing import create_netns, delete_netns, unique_name, veth_pair

    doomed = create_netns(unique_name("doc"))
    try:
        veth_pair(doomed, "vd0", netns, "vd1")
        async with asynctc.open_session("bpf_link", netns=doomed) as session:
            att = await session.attach("vd0", "ingress", programs.constant("pass"))
            delete_netns(doomed)  # `ip netns del`: the session lets go of the namespace
            with trio.fail_after(15):
                await att.wait_severed()
            assert "deleted" in (att.sever_reason or "")
            assert session.attachments == ()
    finally:
        delete_netns(doomed)


@pytest.mark.parametrize(
    "example",
    [
        cancelled_block,
        cancelled_attach,
        failed_detach_after_success,
        failed_cleanup_after_success,
        failed_cleanup_after_failure,
        stopped_by_sigterm,
    ],
)
async def test_cancellation_examples(
    example: Callable[[MockKernel], Awaitable[None]], kernel: MockKernel
) -> None:
    with trio.fail_after(20):
        await example(kernel)


@pytest.mark.kernel
async def test_namespace_deleted(netns: str) -> None:
    await namespace_deleted(netns)


# =========================================================================================================
# docs/backends.md
# =========================================================================================================
class TracingMock(MockBackend):
    """The mock backend under another name, counting the attaches it makes."""

    name = "tracing-mock"
    attaches = 0

    async def attach(self, request: asynctc.backend.AttachRequest) -> MockAttachment:
        type(self).attaches += 1
        return await super().attach(request)


class TracingPlugin:
    @asynctc.hookimpl
    def asynctc_register_backends(self, registry: asynctc.BackendRegistry) -> None:
        registry.add(TracingMock)


async def register_a_backend(kernel: MockKernel) -> None:
    async with asynctc.open_session("tracing-mock", kernel=kernel, plugins=[TracingPlugin()]) as session:
        assert session.backend_name == "tracing-mock"
        await session.attach("eth0", "ingress", kernel.program())
        assert TracingMock.attaches == 1


class PreferNetlink:
    """Choose the netlink backend for "auto" wherever it is available, even where tcx works."""

    @asynctc.hookimpl
    def asynctc_select_backend(
        self, request: asynctc.hookspecs.BackendRequest, available: dict[str, asynctc.Probe]
    ) -> str | None:
        if request.purpose == "session" and available.get("netlink", asynctc.Probe(False, "")).available:
            return "netlink"
        return None  # let the next implementation (in the end, the built-in default) decide


async def select_a_backend(netns: str) -> None:
    async with asynctc.open_session(netns=netns, plugins=[PreferNetlink()]) as session:
        assert session.backend_name == "netlink"
    async with asynctc.open_session(netns=netns) as session:
        assert session.backend_name == "bpf_link"  # the default where tcx works


class AuditLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    @asynctc.hookimpl
    def asynctc_attachment_event(self, event: ev.AttachmentEvent) -> None:
        i = event.info
        self.lines.append(f"{event.kind} {i.dev}/{i.direction} prog={i.prog_id} {event.method or ''}".strip())


async def observe_attachments(kernel: MockKernel) -> None:
    audit = AuditLog()
    async with asynctc.open_session("mock", kernel=kernel, plugins=[audit]) as session:
        p1, p2 = kernel.program(), kernel.program()
        async with session.open_attachment("eth0", "ingress", p1) as att:
            await att.update(p2)
    assert audit.lines == [
        f"attach eth0/ingress prog={p1.id}",
        f"update eth0/ingress prog={p2.id} link_update",
        f"detach eth0/ingress prog={p2.id}",
    ]


class AsyncHook:
    @asynctc.hookimpl
    async def asynctc_attachment_event(self, event: ev.AttachmentEvent) -> None:  # wrong: hooks are sync
        ...


async def async_hooks_are_refused() -> None:
    with pytest.raises(asynctc.PluginError, match="synchronous"):
        async with asynctc.open_session("mock", plugins=[AsyncHook()]):
            pass


async def conformance_on_the_mock() -> None:
    kernel = MockKernel()
    await check_backend("mock", kernel=kernel, dev="eth0", program=kernel.program)
    await check_backend("mock", kernel=kernel, dev="eth0", direction="egress", program=kernel.program,
                        mode="legacy")  # attach options are passed to every attach


async def conformance_of_the_dummy_backend() -> None:
    net = DummyNet()

    async def remove_device(dev: str) -> None:
        net.remove_device(dev)

    report = await check_backend(
        lambda: asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()]),
        dev="dummy0", program=net.program, pin_dir="/pins", remove_device=remove_device, events=False,
    )
    assert not report.skipped  # every check ran
    assert "severing" in report.passed and not report.kernel_events  # severing found by polling


async def conformance_on_the_kernel(veth: VethPair, bpffs: str) -> None:
    for backend in ("bpf_link", "netlink"):
        report = await check_backend(backend, netns=veth.netns_a, dev=veth.a, program=programs.constant,
                                     pin_dir=bpffs)
        assert set(report.skipped) == {"severing", "events"}  # no remove_device: veth.a stays


async def use_the_dummy_backend() -> None:
    net = DummyNet()  # devices lo, dummy0, dummy1
    async with asynctc.open_session("dummy", kernel=net, plugins=[DummyPlugin()]) as session:
        p1, p2 = net.program(), net.program()
        att = await session.attach("dummy0", "ingress", p1)
        await session.attach("dummy0", "ingress", p2, position=First())
        assert (await session.query("dummy0", "ingress")).prog_ids == (p2.id, p1.id)
        await att.update(net.program(), expected=p1)
        net.remove_device("dummy0")
        with trio.fail_after(10):
            await att.wait_severed()  # found by polling: the dummy backend has no event source
        assert att.state is asynctc.State.SEVERED


async def test_register_a_backend(kernel: MockKernel) -> None:
    await register_a_backend(kernel)


@pytest.mark.kernel
async def test_select_a_backend(netns: str) -> None:
    await select_a_backend(netns)


async def test_observe_attachments(kernel: MockKernel) -> None:
    await observe_attachments(kernel)


async def test_async_hooks_are_refused() -> None:
    await async_hooks_are_refused()


async def test_conformance_on_the_mock() -> None:
    with trio.fail_after(60):
        await conformance_on_the_mock()


async def test_conformance_of_the_dummy_backend() -> None:
    with trio.fail_after(60):
        await conformance_of_the_dummy_backend()


async def test_use_the_dummy_backend() -> None:
    with trio.fail_after(20):
        await use_the_dummy_backend()


@pytest.mark.kernel
async def test_conformance_on_the_kernel(veth: VethPair, bpffs: str) -> None:
    with trio.fail_after(60):
        await conformance_on_the_kernel(veth, bpffs)


# =========================================================================================================
# docs/testing.md (the fixtures are the pytest plugin's, as an application's suite gets them)
# =========================================================================================================
async def test_blocks_traffic(mock_kernel: MockKernel, mock_session: asynctc.Session) -> None:
    prog = mock_kernel.program("drop")
    async with mock_session.open_attachment("eth0", "ingress", prog):
        assert mock_kernel.send("eth0", "ingress") == "drop"
    assert mock_kernel.hook("eth0", "ingress").entries == ()


async def test_a_failed_detach_can_be_retried(mock_kernel: MockKernel, mock_session: asynctc.Session) -> None:
    att = await mock_session.attach("eth0", "ingress", mock_kernel.program())
    mock_kernel.inject_fault("link_detach", errno.EIO)
    with pytest.raises(asynctc.TCError) as info:
        await att.detach()
    assert info.value.errno == errno.EIO
    await att.detach()  # the fault was for one call: the second attempt works
    assert mock_kernel.hook("eth0", "ingress").entries == ()


@pytest.mark.kernel
async def test_counts_real_packets(kernel_session: asynctc.Session, veth: VethPair) -> None:
    prog = programs.counting("pass")
    async with kernel_session.open_attachment(veth.a, "ingress", prog):
        # frames sent out of the peer end arrive at veth.a's ingress hook
        await trio.to_thread.run_sync(lambda: send_frames(veth.b, 3, netns=veth.netns_b))
        assert prog.count() == 3
    prog.close()


async def stress_the_mock() -> None:
    report = await stress(backend="mock", lifecycles=8, devices=2, duration=0.5, seed=1,
                          fault_rate=0.05, pin_rate=0, delete_rate=0)
    assert report.leaks == ()
    assert report.operations["attach"] > 0
    assert "leaks: 0" in report.summary()


async def test_stress_example() -> None:
    with trio.fail_after(60):
        await stress_the_mock()


# =========================================================================================================
# the docs show only what is tested here
# =========================================================================================================
def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _norm(lines: list[str]) -> list[str]:
    return [ln.strip() for ln in lines if ln.strip()]


@pytest.mark.parametrize("doc", ["tutorial.md", "cancellation.md", "backends.md", "testing.md"])
def test_docs_blocks_are_tested(doc: str) -> None:
    """Every ```python block of the doc appears, line for line (indentation aside), in this file, or is
    the whole of a file of docs/examples (which the tests import and run)."""
    here = _norm(Path(__file__).read_text().splitlines())
    examples = {f.read_text() for f in EXAMPLES.glob("*.py")}
    blocks = _python_blocks((DOCS / doc).read_text())
    assert blocks, f"docs/{doc} has no ```python block"
    for block in blocks:
        if block in examples:
            continue
        want = _norm(block.splitlines())
        found = any(here[i : i + len(want)] == want for i in range(len(here) - len(want) + 1))
        assert found, f"this block of docs/{doc} is not in {Path(__file__).name}:\n{block}"


def test_backends_md_shows_the_whole_dummy_backend() -> None:
    """docs/backends.md shows docs/examples/dummy_backend.py whole and unchanged, so the example it
    teaches from is the code the conformance suite runs."""
    source = (EXAMPLES / "dummy_backend.py").read_text()
    assert source in _python_blocks((DOCS / "backends.md").read_text())
