"""Network devices by name or ifindex: (ifindex, name) in a namespace, or a clear DeviceNotFound.

Shared by the real backends (bpf_link, netlink): both accept a device name or an ifindex and must say
clearly when the device is not in the session's namespace. Two ways in, one set of rules and messages:
- `resolve_device` asks a `DeviceNames` (the SIOCGIFINDEX / SIOCGIFNAME ioctls: no rtnl, no sleep):
  either the names a backend opened inside its namespace (`Kernel.open_device_names`), which answer for
  that namespace from any thread, the trio thread included (bpf_link's hot path: no thread hop at all);
  or a `Kernel` itself, which answers in the calling thread's namespace (for code that already runs in a
  worker thread inside the namespace);
- `resolve_device_nl` asks the kernel over the namespace's rtnetlink transport (RTM_GETLINK by name or by
  index): no worker thread either, but a request through the transport's I/O thread and its answer to
  decode.
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING

from .._errors import DeviceNotFound, Op
from .kernel import LINUX, DeviceNames
from .nlsock import NetlinkError

if TYPE_CHECKING:
    from .transport import NetlinkTransport

__all__ = ["IFINDEX_MAX", "IFNAMSIZ", "check_dev", "resolve_device", "resolve_device_nl"]

IFNAMSIZ = 16  # linux/if.h: device names hold at most 15 characters and a NUL


def _where(netns: str | None) -> str:
    return f"network namespace {netns!r}" if netns else "the caller's network namespace"


IFINDEX_MAX = 2**31 - 1  # the kernel's ifindex is a positive C int


def check_dev(dev: object) -> str | int:
    """`dev` if it is a plausible device name or ifindex; TypeError for another type, ValueError for an
    ifindex outside 1..2**31-1 (no C int holds it), DeviceNotFound for ifindex 0 or an impossible name."""
    if isinstance(dev, bool) or not isinstance(dev, str | int):
        raise TypeError(f"dev must be a device name or an ifindex (a str or an int), got {type(dev).__name__} {dev!r}")
    if isinstance(dev, int):
        if dev < 0 or dev > IFINDEX_MAX:
            raise ValueError(f"dev: an ifindex must be in 1..{IFINDEX_MAX}, got {dev}")
        if dev == 0:
            raise DeviceNotFound("ifindex must be positive, got 0 (no device has ifindex 0)", errno=_errno.ENODEV)
    elif not dev or len(dev) >= IFNAMSIZ or "/" in dev or "\0" in dev:
        raise DeviceNotFound(f"{dev!r} is not a valid device name (1-{IFNAMSIZ - 1} characters)", errno=_errno.ENODEV)
    return dev


def _not_found(dev: str | int, netns: str | None) -> DeviceNotFound:
    if isinstance(dev, int):
        return DeviceNotFound(
            f"no device with ifindex {dev} in {_where(netns)}; an ifindex is only valid in its own namespace: "
            "use the device's name or open the session in the device's namespace",
            errno=_errno.ENODEV,
        )
    return DeviceNotFound(f"no device named {dev!r} in {_where(netns)}; check `ip link` there",
                          errno=_errno.ENODEV)


def resolve_device(dev: str | int, netns: str | None, names: DeviceNames = LINUX) -> tuple[int, str]:
    """(ifindex, name) as `names` answer; DeviceNotFound otherwise. `names` is a `Kernel` (the calling
    thread's namespace: run it in a worker inside the namespace) or what its `open_device_names` gave (the
    namespace it was opened in, from any thread). A name is returned as given (an alternative name stays
    one: look the ifindex up again for the device's own name).

    `netns` only names the namespace in error messages.
    """
    dev = check_dev(dev)
    try:
        if isinstance(dev, int):
            return dev, names.if_indextoname(dev)
        return names.if_nametoindex(dev), dev
    except OSError:
        raise _not_found(dev, netns) from None


async def resolve_device_nl(nl: NetlinkTransport, dev: str | int, netns: str | None) -> tuple[int, str]:
    """(ifindex, name) of a device in the transport's namespace, asked over rtnetlink (one RTM_GETLINK);
    DeviceNotFound otherwise. A name may be an alternative name of up to 15 characters (as for every
    name here): the device's own name is returned.
    `netns` only names the namespace in error messages."""
    from . import codec

    dev = check_dev(dev)
    if isinstance(dev, int):
        def build(seq: int) -> bytes:
            return codec.encode_link_get(seq, ifindex=dev)
    else:
        def build(seq: int) -> bytes:
            return codec.encode_link_get(seq, name=dev)
    try:
        msgs = await nl.request(build, op=Op.LINK_GET)
    except NetlinkError as exc:
        if exc.errno in (_errno.ENODEV, _errno.ENOENT):
            raise _not_found(dev, netns) from None
        raise
    for m in msgs:
        if isinstance(m, codec.LinkMsg) and m.name:
            return m.ifindex, m.name
    raise _not_found(dev, netns)  # pragma: no cover - the kernel answers a found device with RTM_NEWLINK
