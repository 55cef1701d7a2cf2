"""Pin paths that cannot be hijacked: checked, walked without symlinks, acted on through verified fds.

The bpffs root is world-writable (mode 1777, like /tmp): any user may create directories and symlinks in
it. A pin path taken at face value lets another user redirect asynctc (a symlink in the path makes
`adopt_pinned` take over a different attachment) or undo its work (a pin made in a directory another user
owns can be deleted by that user, which detaches the program). So every pin operation of asynctc follows
these rules:

- the path is absolute, a `str` (or `os.PathLike[str]`), has no NUL byte (the kernel would cut the path
  there) and no `..` component (ValueError otherwise); `.` components and repeated slashes are dropped;
- no component is followed through a symlink: the path is walked one directory at a time with
  `open(O_PATH | O_NOFOLLOW | O_DIRECTORY)` relative to the previous directory's fd;
- the pin's directory is on a bpffs mount (statfs magic BPF_FS_MAGIC);
- every directory from the bpffs mount point down is owned by the caller (euid) or root and writable by
  no one else: group- or other-writable directories are refused, except the bpffs mount root itself when
  it has the sticky bit (in a sticky directory only an entry's owner may remove or rename it);
- the final step happens relative to the verified directory fd, never by name from the top again:
  BPF_OBJ_PIN and BPF_OBJ_GET take a path name, so they are given `/proc/self/fd/N/NAME` (N the verified
  directory) to pin, and `/proc/self/fd/M` (M an O_PATH fd on the pin itself, opened without following
  a symlink and checked to be a regular file owned by the caller or root) to get. No window remains
  between the checks and the kernel's action: the kernel resolves the fds, not the names;
- pins are created owner-only (mode 0600): the kernel creates them so (`0600 & ~umask`); the mode is
  checked and set to 0600 when it differs;
- removing a pin is `unlinkat` relative to the verified directory, of a regular file owned by the caller
  or root (a symlink or a foreign entry at the name is left in place and reported).

Nobody but the caller and root can change a directory that passed these checks, so what was verified
stays true while asynctc acts. Root processes are trusted (they could do anything anyway).

Plain synchronous functions (they make system calls): call them from worker threads.
"""

from __future__ import annotations

import abc
import ctypes
import ctypes.util
import errno as _errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from .._errors import PinError
from . import bpf

__all__ = [
    "BpffsPins",
    "Pins",
    "read_pinned_value",
    "pin_over",
    "rename_over",
    "BPF_FS_MAGIC",
    "PIN_MODE",
    "VerifiedDir",
    "check_path",
    "get_object",
    "open_dir",
    "pin_object",
    "unpin",
]

BPF_FS_MAGIC = 0xCAFE4A11
PIN_MODE = 0o600

_DIR_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_MOUNT_HINT = "mount one with `mount -t bpf bpf /sys/fs/bpf` and pin under it"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int


def check_path(path: object, what: str = "pin path") -> str:
    """The pin path, normalised (no `.` components, no repeated or trailing slashes), if it obeys the
    lexical rules; TypeError or ValueError naming the problem otherwise. Touches no file."""
    if isinstance(path, os.PathLike):
        path = path.__fspath__()
    if not isinstance(path, str):
        raise TypeError(f"the {what} must be a str or an os.PathLike[str], got {type(path).__name__} {path!r}")
    if "\0" in path:
        raise ValueError(
            f"the {what} {path!r} contains a NUL byte (at offset {path.index(chr(0))}): the kernel would cut "
            "the path there and pin somewhere else; remove it"
        )
    if not path.startswith("/"):
        raise ValueError(f"the {what} {path!r} is not absolute; give the full path of a file on a bpffs mount")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"the {what} {path!r} has a '..' component; give a path without '..'")
    if not parts or path.endswith(("/", "/.")):
        raise ValueError(f"the {what} {path!r} names a directory, not a file; add the pin's name")
    return "/" + "/".join(parts)


def _fs_magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(128)  # struct statfs is 120 bytes on 64-bit Linux; f_type first
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF  # f_type, a C long (sign-extended)


def _check_dir(dir_path: str, st: os.stat_result, mount_root: bool, path: str) -> None:
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        raise PinError(
            f"refusing the pin path {path!r}: the directory {dir_path} is owned by uid {st.st_uid}, not by "
            f"this user (uid {euid}) or root, so its owner could remove or replace the pin; pin in a "
            "directory you or root own"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not (mount_root and mode & stat.S_ISVTX):
        who = "group and others" if mode & 0o022 == 0o022 else ("group" if mode & 0o020 else "others")
        raise PinError(
            f"refusing the pin path {path!r}: the directory {dir_path} is writable by {who} (mode "
            f"{mode:04o}), so another user could remove or replace the pin; `chmod go-w {dir_path}` or pin "
            "in a directory only you or root can write"
        )


@dataclass
class VerifiedDir:
    """An O_PATH fd on the verified directory of a pin path, and the pin's name in it."""

    fd: int
    dir_path: str
    name: str
    path: str

    @property
    def proc_path(self) -> str:
        """The pin's path through the verified directory fd (what bpf(2) is given)."""
        return f"/proc/self/fd/{self.fd}/{self.name}"


@contextmanager
def open_dir(path: str) -> Iterator[VerifiedDir]:
    """Walk to the directory of `path` without following symlinks, checking each directory from the bpffs
    mount point down; yield it (its fd is closed afterwards). PinError says what is wrong."""
    path = check_path(path)
    parts = path.split("/")[1:]
    name, dirs = parts[-1], parts[:-1]
    fd = os.open("/", _DIR_FLAGS)
    try:
        prev = os.fstat(fd)
        cur = ""
        on_bpffs = _fs_magic(fd) == BPF_FS_MAGIC
        for comp in dirs:
            cur += "/" + comp
            try:
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                raise PinError(f"cannot use the pin path {path!r}: the directory {cur} does not exist; create "
                               "it on bpffs first", errno=_errno.ENOENT) from None
            except NotADirectoryError:
                try:
                    link = stat.S_ISLNK(os.stat(comp, dir_fd=fd, follow_symlinks=False).st_mode)
                except OSError:
                    link = False
                if link:
                    raise PinError(f"refusing the pin path {path!r}: {cur} is a symbolic link, and asynctc "
                                   "follows no symlink in a pin path (it could point anywhere); give the real "
                                   "path", errno=_errno.ELOOP) from None
                raise PinError(f"cannot use the pin path {path!r}: {cur} is not a directory",
                               errno=_errno.ENOTDIR) from None
            except PermissionError as exc:
                raise PinError(f"cannot use the pin path {path!r}: the directory {cur} cannot be searched "
                               f"({exc.strerror})", errno=exc.errno) from None
            os.close(fd)
            fd = nfd
            st = os.fstat(fd)
            on_bpffs = _fs_magic(fd) == BPF_FS_MAGIC
            if on_bpffs:
                _check_dir(cur, st, st.st_dev != prev.st_dev, path)
            prev = st
        if not on_bpffs:
            raise PinError(f"cannot use the pin path {path!r}: {cur or '/'} is not on a bpffs mount; "
                           f"{_MOUNT_HINT}", errno=_errno.EPERM)
        if "." in name:
            raise PinError(f"cannot use the pin path {path!r}: bpffs refuses names with a dot; pick a name "
                           "without one", errno=_errno.EPERM)
        yield VerifiedDir(fd, cur or "/", name, path)
    finally:
        os.close(fd)


def _open_entry(d: VerifiedDir) -> int | None:
    """An O_PATH fd on the pin itself (None if nothing is there), checked: a regular file (not a symlink,
    not a directory) owned by the caller or root."""
    try:
        efd = os.open(d.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(efd)
        if stat.S_ISLNK(st.st_mode):
            raise PinError(f"refusing the pin path {d.path!r}: it is a symbolic link, and asynctc follows no "
                           "symlink in a pin path (it could point at another attachment); give the real path",
                           errno=_errno.ELOOP)
        if not stat.S_ISREG(st.st_mode):
            raise PinError(f"{d.path!r} is not a pin (it is a directory or a special file)",
                           errno=_errno.EISDIR if stat.S_ISDIR(st.st_mode) else _errno.EINVAL)
        euid = os.geteuid()
        if st.st_uid not in (euid, 0):
            raise PinError(f"refusing the pin at {d.path!r}: it is owned by uid {st.st_uid}, not by this user "
                           f"(uid {euid}) or root; asynctc does not use pins others made")
        return efd
    except BaseException:
        os.close(efd)
        raise


def pin_object(obj_fd: int, path: str) -> None:
    """BPF_OBJ_PIN of `obj_fd` at `path` under the rules above, owner-only (0600).

    Raises PinError for a path the rules refuse, and bpf.BpfError for the kernel's refusal (EEXIST when
    something is at the name already, a symlink included)."""
    with open_dir(path) as d:
        bpf.obj_pin(obj_fd, d.proc_path)
        efd = _open_entry(d)
        if efd is None:  # pragma: no cover - we just made it and nobody else can remove it
            raise PinError(f"the pin at {path!r} vanished right after it was made", errno=_errno.ENOENT)
        try:
            if stat.S_IMODE(os.fstat(efd).st_mode) != PIN_MODE:
                os.chmod(f"/proc/self/fd/{efd}", PIN_MODE)
        finally:
            os.close(efd)


def get_object(path: str) -> int:
    """BPF_OBJ_GET of the pin at `path` under the rules above (its last component is not followed either):
    a new fd on the pinned object. bpf.BpfError(ENOENT) when nothing is pinned there."""
    with open_dir(path) as d:
        efd = _open_entry(d)
        if efd is None:
            raise bpf.BpfError(_errno.ENOENT, "obj_get")
        try:
            return bpf.obj_get(f"/proc/self/fd/{efd}")
        finally:
            os.close(efd)


def unpin(path: str) -> bool:
    """Remove the pin at `path` (unlinkat in its verified directory); False if nothing was there (the
    directory included). A symlink or a foreign entry at the name is not removed: PinError."""
    try:
        with open_dir(path) as d:
            efd = _open_entry(d)
            if efd is None:
                return False
            os.close(efd)
            try:
                os.unlink(d.name, dir_fd=d.fd)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise PinError(f"cannot unpin {path}: {exc.strerror}", errno=exc.errno) from None
            return True
    except PinError as exc:
        if exc.errno == _errno.ENOENT:
            return False  # its directory is gone, and the pin with it
        raise


def pin_over(obj_fd: int, path: str, suffix: str) -> None:
    """Make the pin at `path` name `obj_fd`'s object, atomically: it is pinned beside it at
    `path + suffix` (owner-only) and renamed over it, so at every instant `path` names the old object or
    the new one. The same rules as `pin_object` apply to the path."""
    with open_dir(path) as d:
        tmp = d.name + suffix
        try:
            os.unlink(tmp, dir_fd=d.fd)
        except FileNotFoundError:
            pass
        bpf.obj_pin(obj_fd, f"/proc/self/fd/{d.fd}/{tmp}")
        try:
            os.chmod(f"/proc/self/fd/{d.fd}/{tmp}", PIN_MODE, follow_symlinks=False)
        except NotImplementedError:  # pragma: no cover - chmod of a symlink itself; ours is a regular file
            pass
        try:
            os.rename(tmp, d.name, src_dir_fd=d.fd, dst_dir_fd=d.fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=d.fd)
            except OSError:
                pass
            raise


def rename_over(path: str, suffix: str) -> bool:
    """If a pin stands at `path + suffix` (left by a `pin_over` that was interrupted), rename it over
    `path` and return True; False if there is none."""
    with open_dir(path + suffix) as d:
        efd = _open_entry(d)
        if efd is None:
            return False
        os.close(efd)
        os.rename(d.name, d.name.removesuffix(suffix), src_dir_fd=d.fd, dst_dir_fd=d.fd)
        return True


def read_pinned_value(path: str, value_size: int) -> bytes | None:
    """The value at key 0 of the one-entry array map pinned at `path` (see `Pins.read_pinned_value`)."""
    return _LINUX_PINS.read_pinned_value(path, value_size)


class Pins(abc.ABC):
    """The bpffs pin operations of one kernel (`Kernel.pins`), under the rules above. `BpffsPins` makes them
    on the real bpffs; an in-memory kernel keeps its own pins. Each method behaves as the module function of
    the same name; `read_pinned_value` is built on `get_object` and the kernel's `Bpf`."""

    def __init__(self, bpf_calls: bpf.Bpf) -> None:
        self.bpf = bpf_calls

    @abc.abstractmethod
    def pin_object(self, obj_fd: int, path: str) -> None:
        """As the module function `pin_object`."""

    @abc.abstractmethod
    def get_object(self, path: str) -> int:
        """As the module function `get_object`."""

    @abc.abstractmethod
    def unpin(self, path: str) -> bool:
        """As the module function `unpin`."""

    @abc.abstractmethod
    def pin_over(self, obj_fd: int, path: str, suffix: str) -> None:
        """As the module function `pin_over`."""

    @abc.abstractmethod
    def rename_over(self, path: str, suffix: str) -> bool:
        """As the module function `rename_over`."""

    def read_pinned_value(self, path: str, value_size: int) -> bytes | None:
        """The value at key 0 of the one-entry array map pinned at `path` (how asynctc keeps its records
        beside its pins); None when nothing is pinned there, or something else is (not a map, or a map of
        another shape)."""
        try:
            map_fd = self.get_object(path)
        except (bpf.BpfError, PinError):
            return None
        try:
            if self.bpf.fd_object_kind(map_fd) != "map":
                return None
            return self.bpf.map_lookup(map_fd, 0, value_size)
        except bpf.BpfError:
            return None
        finally:
            self.bpf.close(map_fd)


class BpffsPins(Pins):
    """Pins on the real bpffs: the module functions."""

    def pin_object(self, obj_fd: int, path: str) -> None:
        pin_object(obj_fd, path)

    def get_object(self, path: str) -> int:
        return get_object(path)

    def unpin(self, path: str) -> bool:
        return unpin(path)

    def pin_over(self, obj_fd: int, path: str, suffix: str) -> None:
        pin_over(obj_fd, path, suffix)

    def rename_over(self, path: str, suffix: str) -> bool:
        return rename_over(path, suffix)


_LINUX_PINS: Final = BpffsPins(bpf.LINUX)
