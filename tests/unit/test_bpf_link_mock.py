"""The bpf_link backend's own choices, on a MockKernel: devices looked up on the trio thread (no syscall
thread is waited for), what it opens and closes with the session (the netlink backend's device names
too), and a detach that asks the device, not the link (no rtnl), whether the kernel severed the link."""

from __future__ import annotations

import errno
import functools
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import pytest
import trio
import trio.testing

import asynctc
import asynctc_netlink._backend as netlink_backend_module
from asynctc import Direction
from asynctc.backend import AttachRequest, BackendContext, Placement, atomic, is_atomic
from asynctc.lowlevel import transport
from asynctc.lowlevel.devlock import Claim, DeviceLocking
from asynctc.lowlevel.kernel import BoundDeviceNames, Kernel, NetlinkSocket
from asynctc.lowlevel.netns import NetnsRunner
from asynctc_bpf_link import BpfLinkBackend, LinkAttachment
from asynctc_mock import MockKernel
from asynctc_netlink import NetlinkBackend


def _context(kernel: MockKernel) -> BackendContext:
    return BackendContext(runner=NetnsRunner(None, trio.CapacityLimiter(2)), netns=None, owner="test",
                          session_tag=f"test:{uuid.uuid4().hex}", kernel=kernel)


async def test_devices_resolve_while_every_syscall_thread_is_busy() -> None:
    """resolve_device waits for no thread: with every syscall thread of the session blocked in a slow
    BPF_LINK_CREATE and more attaches queued behind them, a device still resolves at once."""
    kernel = MockKernel(devices=("lo", "mockdev0", "mockdev1", "mockdev2"))
    kernel.add_device("uplink0")
    async with asynctc.open_session("bpf_link", kernel=kernel, max_workers=2) as s:
        kernel.set_latency(1.0, "link_create")
        async with trio.open_nursery() as nursery:
            for dev in ("mockdev0", "mockdev1", "mockdev2"):
                nursery.start_soon(s.attach, dev, "ingress", kernel.program())
            for _ in range(500):  # until every syscall thread is in a link_create (or queued in the kernel)
                if kernel.calls["link_create"] >= 3:
                    break
                await trio.sleep(0.01)
            assert kernel.calls["link_create"] >= 3
            t0 = trio.current_time()
            assert await s.resolve_device("uplink0") == (5, "uplink0")
            assert await s.resolve_device(5) == (5, "uplink0")
            with pytest.raises(asynctc.DeviceNotFound, match="no device named 'nosuch0'") as exc:
                await s.resolve_device("nosuch0")
            assert exc.value.errno == errno.ENODEV
            with pytest.raises(asynctc.DeviceNotFound, match="no device with ifindex 99"):
                await s.resolve_device(99)
            assert trio.current_time() - t0 < 0.5  # a link_create takes 1 s: no lookup waited for one
        kernel.set_latency(0, "link_create")
        assert len(s.attachments) == 3


@pytest.mark.parametrize("backend_class", [BpfLinkBackend, NetlinkBackend], ids=["bpf_link", "netlink"])
async def test_the_device_names_live_as_long_as_the_backend(
    monkeypatch: pytest.MonkeyPatch, backend_class: type[BpfLinkBackend | NetlinkBackend]
) -> None:
    """open() opens the device names in the session's namespace (through the runner), aclose() closes them
    (twice is fine), and a closed backend says so as for every other call. An open() that fails half way
    closes what it opened. No device lookup is an rtnetlink request."""
    kernel = MockKernel()
    opened: list[BoundDeviceNames] = []
    real_open = kernel.open_device_names

    def recording() -> BoundDeviceNames:
        opened.append(real_open())
        return opened[-1]

    monkeypatch.setattr(kernel, "open_device_names", recording)
    backend = backend_class(_context(kernel))
    closed_message = f"the {backend.name} backend is closed \\(its session has ended\\)"
    await backend.open()
    assert await backend.resolve_device("eth0") == (2, "eth0")
    assert await backend.resolve_device(3) == (3, "veth0")
    with pytest.raises(asynctc.DeviceNotFound, match="no device named 'nosuch0' in the caller's network namespace"):
        await backend.resolve_device("nosuch0")
    assert len(opened) == 1
    assert kernel.calls["link_get"] == 0
    await backend.aclose()
    await backend.aclose()
    with pytest.raises(OSError, match="closed") as closed:
        opened[0].if_nametoindex("eth0")
    assert closed.value.errno == errno.EBADF
    with pytest.raises(asynctc.TCError, match=closed_message):
        await backend.resolve_device("eth0")

    async def no_transport(*args: object, **kwargs: object) -> transport.NetlinkTransport:
        raise OSError(errno.EMFILE, "no transport for this test")

    monkeypatch.setattr(transport, "start_transport", no_transport)
    monkeypatch.setattr(netlink_backend_module, "start_transport", no_transport)
    half = backend_class(_context(kernel))
    with pytest.raises(OSError, match="no transport for this test"):
        await half.open()
    assert len(opened) == 2
    with pytest.raises(OSError, match="closed") as closed:
        opened[1].if_indextoname(1)
    assert closed.value.errno == errno.EBADF
    with pytest.raises(asynctc.TCError, match=closed_message):
        await half.resolve_device("eth0")
    await half.aclose()


async def _attached(backend: BpfLinkBackend, kernel: MockKernel, dev: str) -> LinkAttachment:
    ifindex, name = await backend.resolve_device(dev)
    return await backend.attach(AttachRequest(dev=name, ifindex=ifindex, direction=Direction.INGRESS,
                                              program=kernel.program(), placement=Placement("last"),
                                              expected_revision=None, offload="never"))


async def test_detach_asks_the_device_not_the_link() -> None:
    """A detach whose device is still there (same ifindex, same name) takes no rtnl to find out whether the
    kernel severed the link: one device lookup, no link info read; then BPF_LINK_DETACH and close."""
    kernel = MockKernel()
    backend = BpfLinkBackend(_context(kernel))
    await backend.open()
    try:
        att = await _attached(backend, kernel, "veth0")
        reads, lookups = kernel.calls["link_info"], kernel.calls["dev_get"]
        assert await backend.detach(att) is True
        assert (kernel.calls["link_info"], kernel.calls["dev_get"]) == (reads, lookups + 1)
        assert kernel.calls["link_detach"] == 1
        assert kernel.links() == () and kernel.hook("veth0", Direction.INGRESS).entries == ()
        assert await backend.detach(att) is False  # idempotent: the fd is gone
    finally:
        await backend.aclose()


async def test_detach_of_a_link_whose_device_was_deleted() -> None:
    """The device gone from the namespace: the link info decides (the kernel severed the link, ifindex 0)
    and detach() says False; the fd is closed all the same, also when the read fails."""
    kernel = MockKernel(devices=("lo", "eth0"))
    kernel.add_device("tmp0")
    backend = BpfLinkBackend(_context(kernel))
    await backend.open()
    try:
        att = await _attached(backend, kernel, "tmp0")
        kernel.remove_device("tmp0")
        reads = kernel.calls["link_info"]
        assert await backend.detach(att) is False
        assert kernel.calls["link_info"] == reads + 1
        assert kernel.calls["link_detach"] == 0
        assert kernel.links() == ()  # the fd was closed: the kernel dropped the link

        # the same, and the read of the link info fails: the error is reported, the fd closed anyway
        kernel.add_device("tmp1")
        att = await _attached(backend, kernel, "tmp1")
        kernel.remove_device("tmp1")
        kernel.inject_fault("link_info", errno.EIO)
        with pytest.raises(asynctc.TCError, match="EIO"):
            await backend.detach(att)
        assert kernel.links() == ()

    finally:
        await backend.aclose()


class _SlowStartBackend(BpfLinkBackend):
    """bpf_link with a checkpoint of its own before the attach: an override the `atomic` mark of the
    parent's attach does not cover."""

    name = "slow_start_bpf_link"

    async def attach(self, request: AttachRequest) -> LinkAttachment:
        await trio.lowlevel.checkpoint()
        return await super().attach(request)


T = TypeVar("T")


def _traced(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """A decorator as a tracing library writes one: functools.wraps (which copies the wrapped function's
    attributes), and a checkpoint of its own after the call."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        handle = await method(*args, **kwargs)
        await trio.lowlevel.checkpoint()
        return handle

    return wrapper


class _TracedBackend(BpfLinkBackend):
    """bpf_link whose (atomic) attach is wrapped by a decorator that adds a checkpoint."""

    name = "traced_bpf_link"
    attach = _traced(BpfLinkBackend.attach)  # type: ignore[assignment]


class _SlowStartPlugin:
    @asynctc.hookimpl
    def asynctc_register_backends(self, registry: asynctc.BackendRegistry) -> None:
        registry.add(_SlowStartBackend)
        registry.add(_TracedBackend)


def test_only_the_marked_function_itself_is_atomic() -> None:
    assert is_atomic(BpfLinkBackend.attach)
    assert not is_atomic(_SlowStartBackend.attach)  # an override
    assert not is_atomic(_TracedBackend.attach)  # a functools.wraps wrapper of the marked function

    @atomic
    async def marked() -> None:
        await trio.lowlevel.cancel_shielded_checkpoint()

    assert is_atomic(marked) and not is_atomic(_traced(marked))


@pytest.mark.parametrize("backend", ["bpf_link", _SlowStartBackend.name, _TracedBackend.name])
async def test_an_attach_cancelled_while_in_the_kernel_completes_and_is_recorded(backend: str) -> None:
    """bpf_link's attach is `atomic` (one syscall-thread job that runs once queued), so the core runs it
    without a shield: cancelled while the link is being made, it still finishes and the session records
    the link before the cancellation is delivered. An override or a wrapper with checkpoints of its own is
    not atomic and is shielded as before: the same outcome (without the shield its checkpoint would raise,
    and a wrapper's after the kernel call would lose the link)."""
    kernel = MockKernel()
    async with asynctc.open_session(backend, kernel=kernel, plugins=[_SlowStartPlugin()]) as s:
        kernel.set_latency(0.2, "link_create")
        program = kernel.program()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(s.attach, "eth0", "ingress", program)
                await trio.testing.wait_all_tasks_blocked()  # the attach waits for its syscall-thread job
                scope.cancel()  # queued or under way (sleeping its injected latency): it runs all the same
        kernel.set_latency(0, "link_create")
        (att,) = s.attachments
        assert att.info.prog_id == program.id
        assert [e.prog_id for e in kernel.hook("eth0", "ingress").entries] == [program.id]
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled before it starts: it runs all the same, as under a shield
            second = await s.attach("eth0", "ingress", kernel.program())
        assert second in s.attachments
    assert kernel.hook("eth0", "ingress").entries == ()


class _TableKernel(Kernel):
    """A third-party in-memory kernel that implements only what `Kernel` requires (its device lookups do
    not depend on the calling thread)."""

    def __init__(self) -> None:
        self.devices = {1: "lo", 7: "uplink0"}

    def open_netlink_socket(self, groups: Iterable[int] = (), rcvbuf: int | None = None,
                            blocking: bool = False) -> NetlinkSocket:
        raise OSError(errno.EAFNOSUPPORT, "no netlink here")

    def if_nametoindex(self, name: str) -> int:
        for ifindex, own in self.devices.items():
            if own == name:
                return ifindex
        raise OSError(errno.ENODEV, name)

    def if_indextoname(self, ifindex: int) -> str:
        try:
            return self.devices[ifindex]
        except KeyError:
            raise OSError(errno.ENXIO, str(ifindex)) from None

    def classifier_present(self, kind: str) -> bool | None:
        return None

    def device_locks(self, netns_inode: int) -> DeviceLocking:
        raise NotImplementedError

    def pin_claim(self, path: str, session_tag: str) -> Claim:
        raise NotImplementedError

    def session_alive(self, session_tag: str) -> bool:
        return True


def test_a_third_party_kernel_gets_device_names_from_its_own_lookups() -> None:
    """`Kernel.open_device_names` has a default (a new abstract method would break every Kernel subclass
    written before it): the kernel's own lookups, closed by close()."""
    kernel = _TableKernel()
    names = kernel.open_device_names()
    assert names.if_nametoindex("uplink0") == 7
    assert names.if_indextoname(1) == "lo"
    kernel.devices[9] = "late0"
    assert names.if_indextoname(9) == "late0"
    with pytest.raises(OSError, match="nosuch0") as exc:
        names.if_nametoindex("nosuch0")
    assert exc.value.errno == errno.ENODEV
    names.close()
    names.close()
    with pytest.raises(OSError, match="closed") as exc:
        names.if_indextoname(1)
    assert exc.value.errno == errno.EBADF
