"""The netlink backend of asynctc: clsact qdiscs and cls_bpf direct-action filters over rtnetlink, the
legacy TC path that works on every kernel with cls_bpf. `_backend` documents ownership, offload, the pin
format and orphan reaping; `_policy` the priority rules and the owner tag format.

Registered through the "asynctc" entry-point group, as a third-party backend would be.
"""

from __future__ import annotations

import asynctc

from ._backend import FilterAttachment, NetlinkBackend
from ._policy import FilterTag, PinRecord, choose_priority, format_tag, parse_tag

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
