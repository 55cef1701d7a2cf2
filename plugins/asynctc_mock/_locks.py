"""The locks asynctc sessions honour on a MockKernel, kept inside it: device locks and pin claims.

On the real kernel these are flock(2) files shared by every asynctc process of the host
(`asynctc.lowlevel.devlock`). A simulated kernel keeps its own: sessions on one MockKernel exclude each
other exactly as processes do on the real kernel, and nothing is shared with another MockKernel or with
the host (no file is created).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import trio

from asynctc.lowlevel.devlock import WAIT_LIMIT

__all__ = ["LockTable", "MockDeviceLocks", "MockPinClaim"]


class LockTable:
    """The held locks of one MockKernel: device locks by (namespace, ifindex), pin claims by path."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._devices: set[tuple[int, int]] = set()
        self._claims: dict[str, str] = {}  # path -> who holds it

    def try_device(self, key: tuple[int, int]) -> bool:
        with self._mutex:
            if key in self._devices:
                return False
            self._devices.add(key)
            return True

    def release_device(self, key: tuple[int, int]) -> None:
        with self._mutex:
            self._devices.discard(key)

    def try_claim(self, path: str, holder: str, alive: Callable[[str], bool]) -> str | None:
        """Claim `path` for `holder`; None on success, else who holds it. The claim of a holder that is no
        longer `alive` is gone, as a dead process's flock is."""
        with self._mutex:
            held = self._claims.get(path)
            if held is not None and alive(held):
                return held
            self._claims[path] = holder
            return None

    def release_claim(self, path: str, holder: str) -> None:
        with self._mutex:
            if self._claims.get(path) == holder:
                del self._claims[path]


class MockDeviceLocks:
    """The device locks of one backend instance on a MockKernel (`asynctc.lowlevel.devlock.DeviceLocking`):
    exclusive among every backend instance on that kernel, waited for as `DeviceLocks` waits (bounded
    retries, never blocking the trio thread)."""

    def __init__(self, table: LockTable, netns_inode: int) -> None:
        self._table = table
        self._ns = netns_inode
        self._held: set[int] = set()

    async def acquire(self, ifindex: int) -> None:
        delay = 0.0005
        deadline = trio.current_time() + WAIT_LIMIT
        while not self._table.try_device((self._ns, ifindex)):
            if trio.current_time() >= deadline:
                raise TimeoutError(f"the asynctc lock of device {ifindex} has been held by another session for "
                                   f"{WAIT_LIMIT:.0f}s")
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)
        self._held.add(ifindex)

    def release(self, ifindex: int) -> None:
        if ifindex in self._held:
            self._held.discard(ifindex)
            self._table.release_device((self._ns, ifindex))

    def close(self) -> None:
        for ifindex in list(self._held):
            self.release(ifindex)


class MockPinClaim:
    """A claim on a pin path of a MockKernel (`asynctc.lowlevel.devlock.Claim`), exclusive among its
    sessions."""

    def __init__(self, table: LockTable, path: str, session_tag: str, alive: Callable[[str], bool]) -> None:
        self.path = path
        self._table = table
        self._holder = session_tag
        self._alive = alive
        self._held = False

    def try_acquire(self) -> str | None:
        holder = self._table.try_claim(self.path, self._holder, self._alive)
        if holder is None:
            self._held = True
        return holder

    def release(self) -> None:
        if self._held:
            self._held = False
            self._table.release_claim(self.path, self._holder)
