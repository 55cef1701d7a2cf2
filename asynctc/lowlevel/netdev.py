"""Network devices by name or ifindex, resolved in the calling thread's namespace (run it through a runner).

Shared by the real backends (bpf_link, netlink): both accept a device name or an ifindex and must say
clearly when the device is not in the session's namespace.
"""

from __future__ import annotations

import errno as _errno
import socket

from .._errors import DeviceNotFound

__all__ = ["resolve_device"]


def resolve_device(dev: str | int, netns: str | None) -> tuple[int, str]:
    """(ifindex, name) in the calling thread's namespace; DeviceNotFound otherwise (run in a worker).

    `netns` only names the namespace in error messages.
    """
    where = f"network namespace {netns!r}" if netns else "the caller's network namespace"
    if isinstance(dev, bool) or not isinstance(dev, str | int):
        raise TypeError(f"dev must be a device name or an ifindex, got {dev!r}")
    if isinstance(dev, int):
        if dev <= 0:
            raise DeviceNotFound(f"ifindex must be positive, got {dev}", errno=_errno.ENODEV)
        try:
            return dev, socket.if_indextoname(dev)
        except OSError:
            raise DeviceNotFound(
                f"no device with ifindex {dev} in {where}; an ifindex is only valid in its own namespace: "
                "use the device's name or open the session in the device's namespace",
                errno=_errno.ENODEV,
            ) from None
    if not dev or len(dev) >= 16 or "/" in dev or "\0" in dev:
        raise DeviceNotFound(f"{dev!r} is not a valid device name (1-15 characters)", errno=_errno.ENODEV)
    try:
        return socket.if_nametoindex(dev), dev
    except OSError:
        raise DeviceNotFound(
            f"no device named {dev!r} in {where}; check `ip link` there", errno=_errno.ENODEV
        ) from None
