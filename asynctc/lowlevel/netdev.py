"""Network devices by name or ifindex: (ifindex, name) in a namespace, or a clear DeviceNotFound.

Shared by the real backends (bpf_link, netlink): both accept a device name or an ifindex and must say
clearly when the device is not in the session's namespace. `resolve_device` asks a `DeviceNames` (the
SIOCGIFINDEX / SIOCGIFNAME ioctls: no rtnl, no sleep), which has two ways in:
- the names a backend opened inside its namespace (`Kernel.open_device_names`), which answer for that
  namespace from any thread, the trio thread included: what the backends use on their hot paths (no
  thread hop, no namespace switch, no message to encode or decode);
- a `Kernel` itself, which answers in the calling thread's namespace: for code that already runs in a
  worker thread inside the namespace.
"""

from __future__ import annotations

import errno as _errno

from .._errors import DeviceNotFound
from .kernel import LINUX, DeviceNames

__all__ = ["IFINDEX_MAX", "IFNAMSIZ", "check_dev", "resolve_device"]

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
    """(ifindex, the device's own name) as `names` answer; DeviceNotFound otherwise. `names` is a `Kernel`
    (the calling thread's namespace: run it in a worker inside the namespace) or what its
    `open_device_names` gave (the namespace it was opened in, from any thread). A name may be an
    alternative name of up to 15 characters (as for every name here): the device's own name is returned
    (one lookup more for a name: SIOCGIFINDEX finds alternative names, SIOCGIFNAME gives the own name).

    `netns` only names the namespace in error messages.
    """
    dev = check_dev(dev)
    try:
        ifindex = dev if isinstance(dev, int) else names.if_nametoindex(dev)
        return ifindex, names.if_indextoname(ifindex)
    except OSError:
        raise _not_found(dev, netns) from None
