"""Device locks that every asynctc process honours: one lock file per (network namespace, device).

The kernel has no atomic "delete this qdisc if it is empty": a check-then-delete of a clsact qdisc can wipe
the filter another session added between the check and the delete. The netlink backend therefore holds
the device's lock across "make sure clsact exists, add the filter" and across "check that clsact is empty,
delete it", so two asynctc sessions (in one process or many, any owners) never interleave those steps.
Foreign tools (`tc`) do not take the lock; the window that remains against them is documented in
docs/cancellation.md.

Locks are `flock(2)` locks on files under `/run/asynctc/locks` (root) or a per-user directory, taken
without blocking the trio thread: a non-blocking attempt, then bounded retries. A lock held by a process
that dies is released by the kernel with its file descriptions.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import hashlib
import os
import stat
from typing import Protocol

import trio

__all__ = ["Claim", "DeviceLocking", "DeviceLocks", "PinClaim", "lock_directory"]

class DeviceLocking(Protocol):
    """The device locks of one backend instance (`Kernel.device_locks`): `DeviceLocks` on the real kernel."""

    async def acquire(self, ifindex: int) -> None: ...
    def release(self, ifindex: int) -> None: ...
    def close(self) -> None: ...


class Claim(Protocol):
    """A claim on a pin path (`Kernel.pin_claim`): `PinClaim` on the real kernel."""

    path: str

    def try_acquire(self) -> str | None: ...
    def release(self) -> None: ...


RUN_DIR = "/run/asynctc/locks"
WAIT_LIMIT = 10.0  # seconds: how long to wait for another process's lock before giving up


def _safe_dir(path: str) -> str:
    """Create `path` (mode 0700) if needed and check it is a real directory owned by us and writable by
    nobody else; OSError otherwise."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(_errno.ENOTDIR, f"{path} is not a directory (a symlink?)")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise OSError(_errno.EPERM, f"{path} is owned by uid {st.st_uid} or writable by others")
    return path


def lock_directory() -> str:
    """Where device locks live: /run/asynctc/locks for root, else a private directory of the user."""
    if os.geteuid() == 0:
        try:
            return _safe_dir(RUN_DIR)
        except OSError:
            pass
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime if runtime and os.path.isdir(runtime) else "/tmp"
    return _safe_dir(os.path.join(base, f"asynctc-{os.geteuid()}-locks"))


class DeviceLocks:
    """The device locks of one backend instance in one namespace (identified by its inode)."""

    def __init__(self, netns_inode: int) -> None:
        self._dir = lock_directory()
        self._ns = netns_inode
        self._fds: dict[int, int] = {}

    def _fd(self, ifindex: int) -> int:
        fd = self._fds.get(ifindex)
        if fd is None:
            path = os.path.join(self._dir, f"netns{self._ns}-if{ifindex}.lock")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self._fds[ifindex] = fd
        return fd

    async def acquire(self, ifindex: int) -> None:
        """Take the device's lock (exclusive among asynctc processes and backend instances). Raises
        TimeoutError after WAIT_LIMIT seconds of another holder. The caller serialises its own tasks
        (a trio lock per device)."""
        fd = self._fd(ifindex)
        delay = 0.0005
        deadline = trio.current_time() + WAIT_LIMIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if trio.current_time() >= deadline:
                    raise TimeoutError(f"the asynctc lock of device {ifindex} has been held by another "
                                       f"process for {WAIT_LIMIT:.0f}s") from None
                await trio.sleep(delay)
                delay = min(delay * 2, 0.02)

    def release(self, ifindex: int) -> None:
        fd = self._fds.get(ifindex)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class PinClaim:
    """A claim on a pin path while a session holds the attachment pinned there: an flock(2) on a lock file
    named after the path, exclusive among every asynctc session of every process (two file descriptions
    of one process conflict too). The kernel drops it when the holder's process dies."""

    def __init__(self, path: str) -> None:
        self.path = path
        digest = hashlib.sha256(path.encode()).hexdigest()[:32]
        self._file = os.path.join(lock_directory(), f"pin-{digest}.lock")
        self._fd: int | None = None

    def try_acquire(self) -> str | None:
        """Take the claim; None on success, else who holds it ("pid N", as the holder wrote it)."""
        fd = os.open(self._file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another session"
            finally:
                os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the file description drops its lock
