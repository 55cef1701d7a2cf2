"""Run synchronous calls in worker threads, inside a network namespace.

Every blocking kernel call of asynctc (bpf(2), close() of a link fd, creating a netlink socket) goes through
a `NetnsRunner`: the call runs in a trio worker thread, bounded by the runner's CapacityLimiter, and, when
the runner has a namespace, the thread enters that namespace for the call and leaves it afterwards. (Netlink
requests and dumps go through the transport's own I/O thread instead, `asynctc.lowlevel.transport`: its
sockets are bound to the namespace already.)

Why threads enter namespaces: BPF_LINK_CREATE and BPF_PROG_QUERY resolve `target_ifindex` in the calling
thread's network namespace, and a netlink socket binds to the namespace of the thread that creates it.

A pooled worker thread must never go back to the pool in the wrong namespace: if restoring the thread's own
namespace fails, the process is ended (os.abort) rather than letting later work run in the wrong place.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as _errno
import fcntl
import functools
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

__all__ = ["CLONE_NEWNET", "NetnsRunner", "netns_path", "release_thread_home", "setns"]

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace behind `fd` (Python 3.11 has no os.setns)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3): the CLONE_NEW* type of a namespace fd
_NS_TYPE_NAMES = {
    0x00020000: "mount", 0x02000000: "cgroup", 0x04000000: "uts", 0x08000000: "ipc", 0x10000000: "user",
    0x20000000: "pid", CLONE_NEWNET: "network", 0x00000080: "time",
}


def namespace_type(fd: int) -> int | None:
    """The CLONE_NEW* type of the namespace behind `fd` (ioctl NS_GET_NSTYPE), None if it is no namespace."""
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        return None


def netns_path(netns: str | os.PathLike[str]) -> str:
    """The path of a namespace given by name (under /run/netns) or by path."""
    s = os.fspath(netns)
    if "/" in s:
        return s
    return f"{NETNS_RUN_DIR}/{s}"


class _HomeFd:
    """A worker thread's fd on the namespace it started in; closed when the thread ends (CPython frees a
    thread's threading.local values then), or earlier by `release_thread_home`."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


_thread_state = threading.local()


def _own_netns_fd() -> int:
    """An fd on the namespace this worker thread had when it first ran work for us (kept per thread)."""
    home: _HomeFd | None = getattr(_thread_state, "home", None)
    if home is None:
        home = _thread_state.home = _HomeFd(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
    return home.fd


def release_thread_home() -> None:
    """Close the calling thread's cached fd on its home namespace now, if it has one (a thread of its own
    that used `NetnsRunner.call_in_netns` and is about to end; it would be closed with the thread anyway)."""
    home: _HomeFd | None = getattr(_thread_state, "home", None)
    if home is not None:
        _thread_state.home = None
        home.close()


def _restore_or_die(home_fd: int) -> None:
    try:
        setns(home_fd)
    except BaseException as exc:  # pragma: no cover - only when the kernel refuses to let us back
        sys.stderr.write(
            f"asynctc: FATAL: could not restore a worker thread's network namespace ({exc!r}); "
            "ending the process rather than running later work in the wrong namespace\n"
        )
        sys.stderr.flush()
        os.abort()


class NetnsRunner:
    """Runs sync callables in worker threads, in one network namespace, bounded by a CapacityLimiter.

    Args:
        netns: None for the caller's namespace, a name under /run/netns, or a path to a namespace file.
        limiter: bounds how many worker threads this runner uses at once (one per session, typically).
    """

    def __init__(self, netns: str | os.PathLike[str] | None, limiter: trio.CapacityLimiter) -> None:
        if netns is not None:
            spelled = netns.__fspath__() if isinstance(netns, os.PathLike) else netns
            if not isinstance(spelled, str):
                raise TypeError(f"netns must be None, a name under {NETNS_RUN_DIR} or a path (str or "
                                f"os.PathLike[str]), got {type(spelled).__name__} {spelled!r}")
            if not spelled or "\0" in spelled:
                raise ValueError(f"netns must be a non-empty name or path without NUL bytes, got {spelled!r}")
        self.netns: str | None = None if netns is None else os.fspath(netns)
        self.limiter = limiter
        self._ns_fd: int | None = None
        self.ns_inode: int | None = None
        self.gone_reason: str | None = None
        if netns is not None:
            path = netns_path(netns)
            try:
                self._ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                from .._errors import TCError

                raise TCError(
                    f"network namespace {self.netns!r} not found (looked for {path}); "
                    "create it with `ip netns add NAME` or pass a path to a namespace file",
                    errno=_errno.ENOENT,
                ) from None
            except PermissionError as exc:
                from .._errors import PermissionDenied

                raise PermissionDenied(
                    f"cannot open network namespace {path}: {exc.strerror}; needs root (CAP_SYS_ADMIN)",
                    errno=exc.errno,
                ) from None
            self._check_is_netns(path)

    def _check_is_netns(self, path: str) -> None:
        """Refuse, at open, a file that is not a network namespace (a uts namespace, a plain file): the
        kernel would only refuse setns() later, with a bare EINVAL."""
        assert self._ns_fd is not None
        self.ns_inode = os.fstat(self._ns_fd).st_ino
        kind = namespace_type(self._ns_fd)
        if kind != CLONE_NEWNET:
            os.close(self._ns_fd)
            self._ns_fd = None
            from .._errors import TCError

            what = ("not a namespace file at all" if kind is None
                    else f"a {_NS_TYPE_NAMES.get(kind, hex(kind))} namespace, not a network namespace")
            raise TCError(f"netns={self.netns!r}: {path} is {what}; give a name under {NETNS_RUN_DIR} or the "
                          "path of a network namespace file (such as /proc/PID/ns/net)", errno=_errno.EINVAL)

    def call_in_netns(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` in the namespace on the CURRENT thread, synchronously (for worker threads)."""
        if self._ns_fd is None:
            if self.netns is not None:
                # Never fall back to the caller's namespace: that would act on the wrong devices.
                from .._errors import TCError

                raise TCError(
                    f"network namespace {self.netns!r} is gone"
                    + (f" ({self.gone_reason})" if self.gone_reason else " (the session released it)")
                    + "; open a new session in an existing namespace"
                )
            return fn(*args)
        home = _own_netns_fd()
        setns(self._ns_fd)
        try:
            return fn(*args)
        finally:
            _restore_or_die(home)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn(*args)` in a worker thread in the namespace and return its result.

        The call is not abandoned on cancellation: trio waits for the thread (kernel calls are bounded in
        time) and the cancellation is delivered at the caller's next checkpoint. So when this returns, the
        caller knows the kernel's answer, and can record or roll back what the kernel did.
        """
        return await trio.to_thread.run_sync(self.call_in_netns, fn, *args, limiter=self.limiter)

    def close(self, reason: str | None = None) -> None:
        """Let go of the namespace; later calls raise TCError rather than run anywhere else."""
        if reason is not None and self.gone_reason is None:
            self.gone_reason = reason
        if self._ns_fd is not None:
            os.close(self._ns_fd)
            self._ns_fd = None

    def __repr__(self) -> str:
        return f"NetnsRunner(netns={self.netns!r})"


def current_netns_inode() -> int:
    """The inode of the calling thread's network namespace (identifies a namespace)."""
    return Path("/proc/thread-self/ns/net").stat().st_ino


# --- watching a namespace's name ---------------------------------------------------------------------

IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
IN_MOVED_FROM = 0x40
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_UNMOUNT = 0x2000

_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class NetnsNameWatch:
    """Waits, without polling, until a named namespace's file is removed (`ip netns del`) or replaced.

    A namespace lives as long as anything holds it; a session's own fds and sockets would keep a deleted
    namespace alive forever. Watching the name (inotify on its directory) tells the session when to let go.
    """

    def __init__(self, netns: str | os.PathLike[str], ns_inode: int) -> None:
        self.path = netns_path(netns)
        self._ino = ns_inode
        self._fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        directory = os.path.dirname(self.path) or "."
        mask = IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_UNMOUNT
        if _libc.inotify_add_watch(self._fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")

    def gone(self) -> bool:
        """Whether the path no longer names the namespace it named when the session opened."""
        try:
            return os.stat(self.path).st_ino != self._ino
        except FileNotFoundError:
            return True

    async def wait_gone(self) -> None:
        """Return once the namespace's name is gone (checked after every change in its directory)."""
        while not self.gone():
            await trio.lowlevel.wait_readable(self._fd)
            try:
                while os.read(self._fd, 65536):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        """Stop watching (idempotent), without waiting: closing an inotify fd waits for an SRCU grace period
        in the kernel (up to ~15 ms measured), so the fd is closed in one of trio's cached worker threads
        (`trio.lowlevel.start_thread_soon`, which does not wait for the thread) and the caller, the trio
        thread, goes on at once."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(RuntimeError):  # outside trio.run nobody can be waiting on it
                trio.lowlevel.notify_closing(fd)
            trio.lowlevel.start_thread_soon(functools.partial(os.close, fd), _ignore_outcome)


def _ignore_outcome(result: object) -> None:
    """What a background close of an inotify fd reports: nothing to do (closing it cannot fail usefully)."""
