"""The stress harness on the real kernel: both backends leave nothing behind, the audit (raw BPF_PROG_QUERY,
filter and qdisc dumps, the system's link list, the pin directory) catches a backend that leaks, and the
namespaces the run made are gone afterwards."""

from __future__ import annotations

import os
import subprocess
from typing import ClassVar

import pytest

import asynctc
from asynctc.backend import BackendAttachment
from asynctc.lowlevel import bpf
from asynctc.testing import stress
from asynctc_bpf_link import BpfLinkBackend, LinkAttachment
from asynctc_netlink import NetlinkBackend

pytestmark = pytest.mark.kernel


def stress_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("atcst")}


class SkipsDeletingFilters(NetlinkBackend):
    """A buggy third-party backend: "detached", and the cls_bpf filter is still in the kernel."""

    name: ClassVar[str] = "leaky_netlink"

    async def detach(self, att: BackendAttachment) -> bool:
        return True


class NeverClosesLinks(BpfLinkBackend):
    """A buggy third-party backend: the tcx link leaves its hook, but its fd is never closed."""

    name: ClassVar[str] = "leaky_bpf_link"
    kept: ClassVar[list[int]] = []  # the test closes them afterwards

    async def detach(self, att: BackendAttachment) -> bool:
        assert isinstance(att, LinkAttachment)
        fd = att.take_fd()
        if fd is None:
            return False
        self.kept.append(fd)
        try:
            await self.ctx.runner.run(bpf.link_detach, fd)
        except bpf.BpfError:
            return False
        return True


class LeakyPlugin:
    @asynctc.hookimpl
    def asynctc_register_backends(self, registry: asynctc.BackendRegistry) -> None:
        registry.add(SkipsDeletingFilters)
        registry.add(NeverClosesLinks)


@pytest.mark.parametrize("backend", ["bpf_link", "netlink"])
async def test_a_real_kernel_run_leaks_nothing_and_removes_its_namespaces(backend: str) -> None:
    before = stress_namespaces()
    report = await stress(backend=backend, lifecycles=8, devices=3, namespaces=2, duration=1.0, delete_rate=3.0,
                          cancel_rate=0.3, pin_rate=0.3, seed=11)
    assert report.leaks == (), report.summary()
    assert (report.backend, report.kernel) == (backend, "linux")
    assert report.operations["attach"] > 0 and report.operations["detach"] > 0
    assert report.latency["attach"].count == report.operations["attach"]
    assert stress_namespaces() <= before


async def test_the_audit_reads_the_kernel_and_catches_filters_left_behind() -> None:
    before = stress_namespaces()
    report = await stress(backend="leaky_netlink", plugins=[LeakyPlugin()], lifecycles=4, devices=2,
                          duration=0.5, cancel_rate=0.0, delete_rate=0.0, pin_rate=0.0, seed=5)
    kinds = {leak.kind for leak in report.leaks}
    assert {"filter", "qdisc"} <= kinds, report.summary()
    filters = [leak for leak in report.leaks if leak.kind == "filter"]
    assert all(leak.dev in ("st0", "st1") and "bpf pref" in leak.detail for leak in filters)
    assert all(leak.where.startswith("namespace atcst") for leak in report.leaks)
    assert stress_namespaces() <= before  # the leaks went with the namespaces



async def test_the_audit_finds_links_whose_fds_were_never_closed() -> None:
    try:
        report = await stress(backend="leaky_bpf_link", plugins=[LeakyPlugin()], lifecycles=4, devices=2,
                              duration=0.5, cancel_rate=0.0, delete_rate=0.0, pin_rate=0.0, seed=5)
        # every hook is empty: only the system's list of links shows what was left
        assert {leak.kind for leak in report.leaks} == {"link"}, report.summary()
        assert len(report.leaks) == len(NeverClosesLinks.kept) > 0
        assert all("detached" in leak.detail for leak in report.leaks)
    finally:
        while NeverClosesLinks.kept:
            os.close(NeverClosesLinks.kept.pop())
