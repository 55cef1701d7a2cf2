"""The conformance suite against every built-in backend (the mock without privileges, the others for real)."""

from __future__ import annotations

import pytest

from asynctc import programs
from asynctc.testing import VethPair, check_backend
from asynctc_mock import MockKernel


async def test_mock_tcx() -> None:
    kernel = MockKernel()
    await check_backend("mock", kernel=kernel, dev="eth0", program=kernel.program)


async def test_mock_legacy_filters() -> None:
    kernel = MockKernel()
    await check_backend("mock", kernel=kernel, dev="eth0", program=kernel.program, direction="egress",
                        mode="legacy")


@pytest.mark.kernel
async def test_bpf_link(veth: VethPair) -> None:
    await check_backend("bpf_link", netns=veth.netns_a, dev=veth.a, program=programs.constant)


@pytest.mark.kernel
async def test_netlink(veth: VethPair) -> None:
    pytest.importorskip("asynctc_netlink", reason="the netlink backend is not installed")
    await check_backend("netlink", netns=veth.netns_a, dev=veth.a, program=programs.constant, direction="egress")
