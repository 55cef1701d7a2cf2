"""The netlink backend of asynctc: clsact qdiscs and cls_bpf direct-action filters over rtnetlink, the
legacy TC path that works on every kernel with cls_bpf. `_backend` documents ownership, offload, the pin
format and orphan reaping; `_policy` the pin record. The priority rules and the owner tag format are
`asynctc.lowlevel.tcpolicy`'s (shared with the mock backend), re-exported here.

Registered through the "asynctc" entry-point group, as a third-party backend would be.
"""

from __future__ import annotations

import asynctc
from asynctc.lowlevel.tcpolicy import FilterTag, choose_priority, format_tag, parse_tag

from ._backend import FilterAttachment, NetlinkBackend
from ._policy import PinRecord

__all__ = [
    "FilterAttachment",
    "FilterTag",
    "NetlinkBackend",
    "PinRecord",
    "asynctc_register_backends",
    "choose_priority",
    "format_tag",
    "parse_tag",
]


@asynctc.hookimpl
def asynctc_register_backends(registry: asynctc.BackendRegistry) -> None:
    registry.add(NetlinkBackend)
