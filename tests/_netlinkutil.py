"""A raw rtnetlink transport into a test namespace, for tests that talk to the kernel below asynctc."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

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
