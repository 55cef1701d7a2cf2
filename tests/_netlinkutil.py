"""A raw rtnetlink transport into a test namespace, and a bare namespace to point it at, for tests that
talk to the kernel below asynctc."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import trio
from _children import CHILD_TIMEOUT

from asynctc.lowlevel.netns import NetnsRunner
from asynctc.lowlevel.transport import NetlinkTransport, open_transport


@asynccontextmanager
async def raw_netlink(netns: str) -> AsyncIterator[NetlinkTransport]:
    """The real kernel's rtnetlink transport of namespace `netns` (its runner closed on exit)."""
    runner = NetnsRunner(netns, trio.CapacityLimiter(4))
    try:
        async with open_transport(runner) as nl:
            yield nl
    finally:
        runner.close()


@contextmanager
def veth_pair_netns(prefix: str) -> Iterator[str]:
    """A fresh namespace PREFIX-XXXXXXXX holding one veth pair, veth0 and veth1, left down (nothing in it
    changes until the test does); deleted by name afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=CHILD_TIMEOUT)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"],
                       check=True, capture_output=True, timeout=CHILD_TIMEOUT)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=CHILD_TIMEOUT)
