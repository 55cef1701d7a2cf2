"""asynctc_mock: MockKernel, a simulated kernel, and the `mock` backend on it.

MockKernel answers the kernel boundary asynctc's real backends use (`asynctc.lowlevel.kernel.Kernel`: bpf(2)
calls and rtnetlink messages) in memory, with the kernel's rules; the `mock` backend runs the `bpf_link` and
`netlink` backends unchanged on it, and `open_session("bpf_link"|"netlink", kernel=MockKernel())` runs
them directly. No privileges needed.

    import asynctc
    from asynctc_mock import MockKernel

    kernel = MockKernel()                       # devices lo, eth0, veth0, veth1
    prog = kernel.program("drop")               # a simulated SCHED_CLS program, no privileges needed
    async with asynctc.open_session(backend="mock", kernel=kernel) as session:
        async with session.open_attachment("eth0", "ingress", prog):
            assert kernel.send("eth0", "ingress") == "drop"

Registered with asynctc through the entry-point group "asynctc" (name "mock"), like any third-party
backend.
"""

from __future__ import annotations

import asynctc

from ._backend import MockAttachment as MockAttachment
from ._backend import MockBackend as MockBackend
from ._kernel import MAX_TCX_PROGS as MAX_TCX_PROGS
from ._kernel import OPERATIONS as OPERATIONS
from ._kernel import FilterInfo as FilterInfo
from ._kernel import KernelError as KernelError
from ._kernel import LinkInfo as LinkInfo
from ._kernel import MockKernel as MockKernel
from ._kernel import QdiscInfo as QdiscInfo
from ._kernel import SimulatedProgram as SimulatedProgram
from ._kernel import TcxEntryInfo as TcxEntryInfo
from ._kernel import TcxQuery as TcxQuery

__all__ = [
    "MAX_TCX_PROGS",
    "FilterInfo",
    "KernelError",
    "LinkInfo",
    "MockAttachment",
    "MockBackend",
    "MockKernel",
    "OPERATIONS",
    "QdiscInfo",
    "SimulatedProgram",
    "TcxEntryInfo",
    "TcxQuery",
    "asynctc_register_backends",
]


@asynctc.hookimpl
def asynctc_register_backends(registry: asynctc.BackendRegistry) -> None:
    """Register the mock backend under the name "mock"."""
    registry.add(MockBackend)
