"""Helpers for testing code that uses asynctc, and for testing backends.

- `check_backend(...)`: the conformance suite any Backend implementation can run against itself, returning a
  `CheckReport`; `SessionFactory` is the type of the session factory it accepts.
- Throwaway network environments: `temp_netns`, `veth_pair`, `bpffs_mount`, `send_frames`.
- `compile_bpf(source)`: clang a BPF C file into an object for `asynctc.open_object`.
- `stress(...)`: many concurrent lifecycles with cancellations, device deletions and (on the mock)
  injected faults, then a leak audit read from the kernel itself; returns a `StressReport`.
- A pytest plugin (`asynctc.testing.pytest_plugin`, registered through the `pytest11` entry point).
"""

from ._bpfcc import compile_bpf as compile_bpf
from ._bpfcc import compile_bpf_skip_reason as compile_bpf_skip_reason
from ._netenv import VethPair as VethPair
from ._netenv import bpffs_mount as bpffs_mount
from ._netenv import can_run_kernel_tests as can_run_kernel_tests
from ._netenv import create_netns as create_netns
from ._netenv import delete_netns as delete_netns
from ._netenv import ip as ip
from ._netenv import kernel_test_skip_reason as kernel_test_skip_reason
from ._netenv import run_without_capabilities as run_without_capabilities
from ._netenv import send_frames as send_frames
from ._netenv import tc as tc
from ._netenv import temp_netns as temp_netns
from ._netenv import unique_name as unique_name
from ._netenv import veth_pair as veth_pair
from ._stress import LatencyStats as LatencyStats
from ._stress import Leak as Leak
from ._stress import StressReport as StressReport
from ._stress import stress as stress
from .conformance import CheckReport as CheckReport
from .conformance import SessionFactory as SessionFactory
from .conformance import check_backend as check_backend
