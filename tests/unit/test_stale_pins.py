"""Stale pins on the mock: a severed pinned attachment's pin goes, and unpin() on it is allowed."""

from __future__ import annotations

import pytest
import trio

import asynctc
from asynctc_mock import MockKernel


@pytest.mark.parametrize("mode", ["tcx", "legacy"])
async def test_unpin_of_a_severed_attachment_removes_its_pin(mode: str) -> None:
    kernel = MockKernel()
    kernel.add_device("d0")
    async with asynctc.open_session("mock", kernel=kernel) as s:
        att = await s.attach("d0", "ingress", kernel.program("pass"), mode=mode)
        await att.pin("/sys/fs/bpf/d0_pin")
        assert set(kernel.pins()) == {"/sys/fs/bpf/d0_pin", "/sys/fs/bpf/d0_pin_record"}  # and who pinned it
        await trio.to_thread.run_sync(kernel.remove_device, "d0")
        with trio.fail_after(10):
            await att.wait_severed()
        await att.unpin()  # allowed on SEVERED: it removes a stale pin (here the session already did)
        assert att.info.pinned is None and kernel.pins() == {}
        with pytest.raises(asynctc.Severed, match="severed"):
            await att.pin("/sys/fs/bpf/again")  # every other operation still refuses
        assert kernel.pins() == {}


async def test_detach_of_a_pinned_attachment_removes_its_pin() -> None:
    kernel = MockKernel()
    async with asynctc.open_session("mock", kernel=kernel) as s:
        att = await s.attach("eth0", "egress", kernel.program("pass"))
        await att.pin("/sys/fs/bpf//x/./p")
        assert att.info.pinned == "/sys/fs/bpf/x/p"
        assert set(kernel.pins()) == {"/sys/fs/bpf/x/p", "/sys/fs/bpf/x/p_record"}
        await att.detach()
        assert kernel.pins() == {} and att.info.pinned is None
