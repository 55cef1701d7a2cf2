"""The kernel boundary: everything asynctc's backends ask of a kernel, in one object.

A backend reaches the kernel only through its session's `Kernel` (`BackendContext.kernel`), never through
module globals, so the same backend code runs on the real kernel (`LINUX`) or on a simulated one
(`asynctc_mock.MockKernel`, a subclass that answers the same calls in memory). The boundary is the
kernel's own interface, kept as low as the kernel draws it:

- `bpf`: the bpf(2) calls (`asynctc.lowlevel.bpf.Bpf` over a `Syscalls`: raw `union bpf_attr` in, result or
  errno out, plus close(2) and fdinfo of the fds it hands out);
- `pins`: BPF_OBJ_PIN / BPF_OBJ_GET under asynctc's pin-path rules, and removing and renaming pins on bpffs;
- `open_netlink_socket`: NETLINK_ROUTE sockets (requests, dumps, multicast groups, ENOBUFS), carrying the
  bytes `asynctc.lowlevel.codec` builds and parses;
- `if_nametoindex` / `if_indextoname`: device names and indexes of the calling thread's namespace (the
  SIOCGIFINDEX / SIOCGIFNAME ioctls: no rtnl, far cheaper than an RTM_GETLINK);
- `open_device_names`: the same two lookups bound to the namespace of the thread that opens them, usable
  from any thread afterwards (the trio thread included: the ioctls take no rtnl and do not wait for the
  kernel's work, see `SocketDeviceNames`), a `BoundDeviceNames`.
  The kernel itself is a `DeviceNames` of the calling thread's namespace;
- `device_locks` / `pin_claim`: the locks asynctc sessions of every process honour on this kernel (a device
  while its clsact qdisc is checked and changed; a pin path while a session holds it), which a simulated
  kernel keeps to itself;
- `session_alive`: whether the session (process) an ownership record names still runs (orphans are what
  dead processes left).

Calls that can block (every bpf(2) call, close() of a link fd, netlink sends) are made from worker threads,
as before: the boundary does not change where code runs.
"""

from __future__ import annotations

import abc
import errno as _errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from . import bpf as _bpf
from . import pins as _pins
from . import tcpolicy
from .devlock import Claim, DeviceLocking, DeviceLocks, PinClaim
from .nlsock import open_netlink_socket

__all__ = ["LINUX", "BoundDeviceNames", "DeviceNameLookups", "DeviceNames", "Kernel", "Linux", "NetlinkSocket",
           "SocketDeviceNames"]


_classifiers_known: set[str] = set()


def _classifier_present(kind: str) -> bool | None:
    """Whether this machine's kernel has the classifier `kind` ("bpf": cls_bpf; loaded module, or built in:
    its classify function is a kernel symbol); None when no source can be read. Cached once positive."""
    if kind in _classifiers_known:
        return True
    if os.path.isdir(f"/sys/module/cls_{kind}"):
        _classifiers_known.add(kind)
        return True
    symbol = f" cls_{kind}_classify".encode()
    try:
        with open("/proc/kallsyms", "rb") as f:
            for line in f:
                if line.endswith(symbol + b"\n") or symbol + b"\t" in line:
                    _classifiers_known.add(kind)
                    return True
    except OSError:
        return None
    release = os.uname().release
    for index in ("modules.dep", "modules.builtin"):
        try:
            with open(f"/lib/modules/{release}/{index}", "rb") as f:
                if f"/cls_{kind}.ko".encode() in f.read():
                    return True  # loadable on demand (the kernel loads it on the first cls_bpf filter)
        except OSError:
            continue
    return False


class NetlinkSocket(Protocol):
    """What asynctc uses of a NETLINK_ROUTE socket (a `socket.socket` on the real kernel). A simulated
    socket also offers `recv_nowait()` (see `asynctc.lowlevel.nlsock.nonblocking_receiver`)."""

    def fileno(self) -> int: ...
    def send(self, data: bytes, /) -> int: ...
    def recv(self, bufsize: int, /) -> bytes: ...
    def getsockopt(self, level: int, optname: int, /) -> int: ...
    def getsockname(self) -> tuple[int, int]: ...
    def settimeout(self, value: float | None, /) -> None: ...
    def setblocking(self, flag: bool, /) -> None: ...
    def close(self) -> None: ...


class DeviceNames(Protocol):
    """Device names and indexes of one network namespace: a `Kernel` (the calling thread's namespace) or
    the `BoundDeviceNames` its `open_device_names` gives (the namespace it was opened in)."""

    def if_nametoindex(self, name: str) -> int:
        """The ifindex of device `name` (its own name or an alternative name); OSError (ENODEV) if none."""
        ...

    def if_indextoname(self, ifindex: int) -> str:
        """The (own) name of device `ifindex`; OSError (ENXIO) if none."""
        ...


class BoundDeviceNames(DeviceNames, Protocol):
    """`DeviceNames` bound to the namespace they were opened in, whatever thread asks later; they hold a
    resource until `close()` (idempotent; a lookup after it raises OSError EBADF). A lookup takes no rtnl
    and waits for no kernel work (see `SocketDeviceNames` for the one brief wait older kernels have)."""

    def close(self) -> None: ...


# struct ifreq (linux/if.h): ifr_name[IFNAMSIZ], then a union whose ifr_ifindex is an int; 40 bytes on
# every 64-bit ABI (the union holds a struct ifmap of 24 bytes).
_IFREQ: Final = struct.Struct("=16si20x")
_IFNAMSIZ: Final = 16
_IFINDEX_MAX: Final = 2**31 - 1
_SIOCGIFNAME: Final = 0x8910
_SIOCGIFINDEX: Final = 0x8933


class SocketDeviceNames:
    """The real kernel's `BoundDeviceNames`: an AF_UNIX datagram socket made in the namespace, and the
    SIOCGIFINDEX / SIOCGIFNAME ioctls on it. The kernel answers them in the namespace of the SOCKET
    (sock_net), not of the calling thread, so any thread may ask once the socket exists. Neither takes
    rtnl: an RCU lookup of the device (alternative names too), and a copy of its name that, since Linux
    6.10, retries while a rename is in flight and never sleeps (before 6.10 it takes the rename semaphore
    for reading, and so waits while a device of the machine is being renamed: the rename's sysfs move,
    brief). `close()` must not race with a lookup of another thread (the fd number could be reused)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def _ioctl(self, request: int, name: bytes, ifindex: int) -> bytes:
        sock = self._sock
        if sock is None:
            raise OSError(_errno.EBADF, "these device names are closed")
        return fcntl.ioctl(sock.fileno(), request, _IFREQ.pack(name, ifindex))

    def if_nametoindex(self, name: str) -> int:
        raw = os.fsencode(name)
        if not raw or len(raw) >= _IFNAMSIZ or b"\0" in raw:
            raise OSError(_errno.ENODEV, f"no device named {name!r}: not a valid device name")
        _, ifindex = _IFREQ.unpack(self._ioctl(_SIOCGIFINDEX, raw, 0))
        return int(ifindex)

    def if_indextoname(self, ifindex: int) -> str:
        if isinstance(ifindex, bool) or not isinstance(ifindex, int):
            raise TypeError(f"an ifindex is an int, got {type(ifindex).__name__} {ifindex!r}")
        if not 0 < ifindex <= _IFINDEX_MAX:
            raise OSError(_errno.ENXIO, f"no device with ifindex {ifindex}")
        try:
            raw, _ = _IFREQ.unpack(self._ioctl(_SIOCGIFNAME, b"", ifindex))
        except OSError as exc:
            if exc.errno == _errno.ENODEV:  # as if_indextoname(3) says it
                raise OSError(_errno.ENXIO, f"no device with ifindex {ifindex}") from None
            raise
        return os.fsdecode(raw.split(b"\0", 1)[0])

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __repr__(self) -> str:
        return f"<SocketDeviceNames {'closed' if self._sock is None else f'fd={self._sock.fileno()}'}>"


class DeviceNameLookups:
    """`BoundDeviceNames` made of two lookups that do not depend on the calling thread (an in-memory
    kernel's device table): what `Kernel.open_device_names` gives by default. After `close()`
    (idempotent) a lookup raises OSError EBADF, as an ioctl on a closed socket would."""

    def __init__(self, nametoindex: Callable[[str], int], indextoname: Callable[[int], str]) -> None:
        self._lookups: tuple[Callable[[str], int], Callable[[int], str]] | None = (nametoindex, indextoname)

    def _open(self) -> tuple[Callable[[str], int], Callable[[int], str]]:
        if self._lookups is None:
            raise OSError(_errno.EBADF, "these device names are closed")
        return self._lookups

    def if_nametoindex(self, name: str) -> int:
        return self._open()[0](name)

    def if_indextoname(self, ifindex: int) -> str:
        return self._open()[1](ifindex)

    def close(self) -> None:
        self._lookups = None

    def __repr__(self) -> str:
        return f"<DeviceNameLookups {'closed' if self._lookups is None else 'open'}>"


class Kernel(abc.ABC):
    """One kernel as asynctc's backends see it (see the module docstring).

    Attributes:
        bpf: the bpf(2) calls of this kernel.
        pins: the bpffs pins of this kernel.
    """

    bpf: _bpf.Bpf
    pins: _pins.Pins

    @property
    def simulated(self) -> bool:
        """True for an in-memory kernel (no privileges needed, nothing touches the machine)."""
        return True

    @abc.abstractmethod
    def open_netlink_socket(
        self, groups: Iterable[int] = (), rcvbuf: int | None = None, blocking: bool = False
    ) -> NetlinkSocket:
        """A NETLINK_ROUTE socket of the calling thread's namespace (see
        `asynctc.lowlevel.nlsock.open_netlink_socket`)."""

    @abc.abstractmethod
    def if_nametoindex(self, name: str) -> int:
        """The ifindex of device `name` in the calling thread's namespace; OSError (ENODEV) if none."""

    @abc.abstractmethod
    def if_indextoname(self, ifindex: int) -> str:
        """The name of device `ifindex` in the calling thread's namespace; OSError (ENXIO) if none."""

    def open_device_names(self) -> BoundDeviceNames:
        """`if_nametoindex` and `if_indextoname` of the calling thread's namespace, bound to it: called in a
        thread inside a namespace, they answer for THAT namespace from any thread afterwards, and take no
        rtnl (call it in a worker thread: the real kernel's makes a socket; close the result when done).

        This default answers through this kernel's own `if_nametoindex` / `if_indextoname`, which is right
        for a kernel whose answers do not depend on the calling thread (an in-memory one); `Linux`
        overrides it (`SocketDeviceNames`), as a kernel with namespaces per thread must."""
        return DeviceNameLookups(self.if_nametoindex, self.if_indextoname)

    @abc.abstractmethod
    def classifier_present(self, kind: str) -> bool | None:
        """Whether the kernel has the tc classifier `kind` ("bpf" for cls_bpf, "u32"...); None when it
        cannot be told."""

    @abc.abstractmethod
    def device_locks(self, netns_inode: int) -> DeviceLocking:
        """The device locks of one backend instance in the namespace `netns_inode` (see
        `asynctc.lowlevel.devlock.DeviceLocks`)."""

    @abc.abstractmethod
    def pin_claim(self, path: str, session_tag: str) -> Claim:
        """A claim on the pin `path` for the session `session_tag`, exclusive among every live asynctc
        session on this kernel: a dead session's claim is no claim (see `asynctc.lowlevel.devlock.PinClaim`,
        which its process's death releases)."""

    @abc.abstractmethod
    def session_alive(self, session_tag: str) -> bool:
        """Whether the session that wrote an ownership record with `session_tag` ("owner:pid.start.serial",
        `asynctc.lowlevel.tcpolicy.format_session_tag`) still runs: on the real kernel, whether its process
        does (`asynctc.lowlevel.tcpolicy.process_alive`). A tag that cannot be parsed counts as alive: when
        in doubt, nothing is an orphan."""


class Linux(Kernel):
    """The real kernel of this machine."""

    def __init__(self) -> None:
        self.bpf = _bpf.LINUX
        self.pins = _pins.BpffsPins(_bpf.LINUX)

    @property
    def simulated(self) -> bool:
        return False

    def open_netlink_socket(
        self, groups: Iterable[int] = (), rcvbuf: int | None = None, blocking: bool = False
    ) -> socket.socket:
        return open_netlink_socket(groups, rcvbuf, blocking)

    def if_nametoindex(self, name: str) -> int:
        return socket.if_nametoindex(name)

    def if_indextoname(self, ifindex: int) -> str:
        return socket.if_indextoname(ifindex)

    def open_device_names(self) -> SocketDeviceNames:
        return SocketDeviceNames()

    def classifier_present(self, kind: str) -> bool | None:
        return _classifier_present(kind)

    def device_locks(self, netns_inode: int) -> DeviceLocks:
        return DeviceLocks(netns_inode)

    def pin_claim(self, path: str, session_tag: str) -> PinClaim:
        return PinClaim(path)  # an flock: the kernel drops it when the session's process dies

    def session_alive(self, session_tag: str) -> bool:
        parsed = tcpolicy.parse_session_tag(session_tag)
        return True if parsed is None else tcpolicy.process_alive(parsed[1], parsed[2])

    def __repr__(self) -> str:
        return "<asynctc Linux kernel>"


LINUX: Final = Linux()
"""The real kernel."""
