"""Map: an owned handle on a BPF map, read and written by key."""

from __future__ import annotations

import builtins
import os
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TypeAlias, TypeVar

from ._errors import Op, TCError, from_errno
from .lowlevel import bpf, pins

__all__ = ["MAP_TYPE_NAMES", "Map", "MapKey", "MapValue", "adopt_map_fd"]

MAP_TYPE_NAMES = {
    1: "HASH",
    2: "ARRAY",
    3: "PROG_ARRAY",
    4: "PERF_EVENT_ARRAY",
    5: "PERCPU_HASH",
    6: "PERCPU_ARRAY",
    7: "STACK_TRACE",
    8: "CGROUP_ARRAY",
    9: "LRU_HASH",
    10: "LRU_PERCPU_HASH",
    11: "LPM_TRIE",
    12: "ARRAY_OF_MAPS",
    13: "HASH_OF_MAPS",
    14: "DEVMAP",
    15: "SOCKMAP",
    16: "CPUMAP",
    17: "XSKMAP",
    18: "SOCKHASH",
    19: "CGROUP_STORAGE",
    20: "REUSEPORT_SOCKARRAY",
    21: "PERCPU_CGROUP_STORAGE",
    22: "QUEUE",
    23: "STACK",
    24: "SK_STORAGE",
    25: "DEVMAP_HASH",
    26: "STRUCT_OPS",
    27: "RINGBUF",
    28: "INODE_STORAGE",
    29: "TASK_STORAGE",
    30: "BLOOM_FILTER",
    31: "USER_RINGBUF",
    32: "CGRP_STORAGE",
}

_T = TypeVar("_T")

MapKey: TypeAlias = bytes | bytearray | memoryview | int
"""A key: bytes of the map's key size, or an int where the key is 4 or 8 bytes (little-endian)."""

MapValue: TypeAlias = bytes | bytearray | memoryview | int
"""A value: bytes of the map's value size, or an int where the value is 4 or 8 bytes (little-endian)."""


class Map:
    """An owned handle on a BPF map: it holds its own fd, closed by `close()` (or its `with` block).

    Get one from a compiled object (`obj.map(name)`, see `asynctc.open_object`), from a pin
    (`Map.from_pinned`), by id (`Map.from_id`) or from an fd (`Map.from_fd`, which duplicates it).

    Keys and values are bytes of exactly `key_size` / `value_size` bytes; an int is taken for a key or
    value of 4 or 8 bytes (little-endian, as the program sees a `__u32`/`__u64`; negative ints are stored
    in two's complement). Sizes are checked before any syscall: ValueError names the size expected.

    Per-CPU maps (PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH): `lookup` gives a list with one value per
    possible CPU (add them up for a total); `update` takes such a list, or one value for every CPU.

    The calls are synchronous on purpose: each is one bpf(2) syscall of a few microseconds (no I/O, no
    waiting), cheaper than a hop to a worker thread. Only `keys()` and `items()` cost one or two syscalls
    per element: for maps of many thousands of entries call them through `trio.to_thread.run_sync`.
    """

    __slots__ = ("__weakref__", "_fd", "_id", "_key_size", "_max_entries", "_name", "_type", "_value_size")

    def __init__(
        self, fd: int, *, id: int, name: str, type: int, key_size: int, value_size: int, max_entries: int
    ) -> None:
        self._fd = fd
        self._id = id
        self._name = name
        self._type = type
        self._key_size = key_size
        self._value_size = value_size
        self._max_entries = max_entries

    @classmethod
    def from_fd(cls, fd: int) -> Map:
        """A Map on a duplicate of `fd` (the caller keeps ownership of `fd`)."""
        try:
            dup = os.dup(fd)
        except OSError as exc:
            raise TCError(f"fd {fd} is not open: {exc.strerror}; pass the fd of a BPF map", errno=exc.errno) from None
        return adopt_map_fd(dup)

    @classmethod
    def from_pinned(cls, path: str | os.PathLike[str]) -> Map:
        """The map pinned at `path` on bpffs (PinError if nothing is pinned there), read under the pin-path
        rules of `asynctc.lowlevel.pins` (no symlink followed, no directory others may write)."""
        spath = pins.check_path(path, "map's pin path")
        try:
            fd = pins.get_object(spath)
        except bpf.BpfError as exc:
            raise from_errno(exc.errno or 0, op=Op.OBJ_GET, program=f"map pin {spath}") from None
        return adopt_map_fd(fd)

    @classmethod
    def from_id(cls, map_id: int) -> Map:
        """The map with this id (needs CAP_SYS_ADMIN)."""
        if isinstance(map_id, bool) or not isinstance(map_id, int) or not 0 < map_id < 2**32:
            raise ValueError(f"map_id must be an int in 1..2**32-1, got {map_id!r}")
        try:
            fd = bpf.map_get_fd_by_id(map_id)
        except bpf.BpfError as exc:
            raise from_errno(exc.errno or 0, op=Op.MAP_GET_FD_BY_ID, program=f"map id {map_id}") from None
        return adopt_map_fd(fd)

    # -- identity ---------------------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The map's fd; TCError once it is closed."""
        if self._fd < 0:
            raise TCError(f"{self} is closed; open the map again (from its object, pin or id)")
        return self._fd

    @property
    def id(self) -> int:
        return self._id

    @property
    def name(self) -> str:
        """The map's name: as declared in the object's source, or as the kernel keeps it (15 bytes)."""
        return self._name

    @property
    def type(self) -> int:
        """The BPF map type (1 = HASH, 2 = ARRAY, 6 = PERCPU_ARRAY...; `type_name` spells it)."""
        return self._type

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self._type, f"type {self._type}")

    @property
    def key_size(self) -> int:
        return self._key_size

    @property
    def value_size(self) -> int:
        """The size of one value (for per-CPU maps: of each CPU's value)."""
        return self._value_size

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def percpu(self) -> bool:
        """Whether the map holds one value per possible CPU for each key."""
        return self._type in bpf.PERCPU_MAP_TYPES

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # -- elements ---------------------------------------------------------------------------------------

    def lookup(self, key: MapKey) -> bytes | list[bytes] | None:
        """The value at `key`, or None where there is none (an array has a value at every index below
        max_entries). For a per-CPU map: a list with each possible CPU's value."""
        k = self._encode("key", key, self._key_size)
        raw = self._call(bpf.map_lookup_elem, "map_lookup", self.fd, k, self._raw_value_size())
        if raw is None or not self.percpu:
            return raw
        slot = _round8(self._value_size)
        return [raw[i : i + self._value_size] for i in range(0, len(raw), slot)]

    def update(self, key: MapKey, value: MapValue | Sequence[MapValue]) -> None:
        """Set the value at `key`, creating the element if needed. For a per-CPU map `value` is a sequence
        of one value per possible CPU, or a single value stored for every CPU."""
        k = self._encode("key", key, self._key_size)
        self._call(bpf.map_update_elem, "map_update", self.fd, k, self._encode_value(value), bpf.BPF_ANY)

    def delete(self, key: MapKey) -> None:
        """Delete the element at `key`; KeyError if there is none (arrays cannot delete: TCError)."""
        k = self._encode("key", key, self._key_size)
        if not self._call(bpf.map_delete_elem, "map_delete", self.fd, k):
            raise KeyError(f"{self} has no element with key {k.hex()}")

    def keys(self) -> list[bytes]:
        """Every key now in the map, in the kernel's order (a snapshot: the program may be changing it)."""
        out: list[bytes] = []
        key: bytes | None = None
        fd = self.fd
        limit = self._max_entries
        while True:
            key = self._call(bpf.map_get_next_key, "map_get_next_key", fd, key, self._key_size)
            if key is None:
                return out
            out.append(key)
            if len(out) > limit:
                # a hash map whose current key was deleted under us starts over: keep what we have
                return list(dict.fromkeys(out))

    def items(self) -> list[tuple[bytes, bytes | list[bytes]]]:
        """Every (key, value) now in the map; elements deleted between the two reads are left out."""
        out: list[tuple[bytes, bytes | list[bytes]]] = []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                out.append((key, value))
        return out

    # -- pins and lifetime ------------------------------------------------------------------------------

    def pin(self, path: str | os.PathLike[str]) -> None:
        """Pin the map at `path` on bpffs: it outlives this process until the pin is removed (unlink it).
        The pin-path rules of `asynctc.lowlevel.pins` apply: owner-only (0600), in a directory nobody else
        may write, no symlink followed (PinError saying why; ValueError for a malformed path)."""
        spath = pins.check_path(path, "map's pin path")
        try:
            pins.pin_object(self.fd, spath)
        except bpf.BpfError as exc:
            raise from_errno(exc.errno or 0, op=Op.OBJ_PIN, program=f"{self} at {spath}") from None

    def close(self) -> None:
        """Close the map's fd. Idempotent. Programs using the map keep it alive; so does a pin."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Map:
        return self

    def __exit__(
        self,
        exc_type: builtins.type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return (
            f"<Map id={self._id} name={self._name!r} type={self.type_name} key_size={self._key_size} "
            f"value_size={self._value_size} max_entries={self._max_entries}{state}>"
        )

    def __str__(self) -> str:
        return f"map {self._id}" + (f" ({self._name})" if self._name else "")

    # -- encoding ---------------------------------------------------------------------------------------

    def _raw_value_size(self) -> int:
        if self.percpu:
            return _round8(self._value_size) * bpf.possible_cpus()
        return self._value_size

    def _encode(self, what: str, data: object, size: int) -> bytes:
        if isinstance(data, bool):
            raise TypeError(f"{what} for {self} must be bytes or an int, got a bool")
        if isinstance(data, int):
            if size not in (4, 8):
                raise ValueError(
                    f"{what} of {self} is {size} bytes: pass bytes of that size (ints are taken only for "
                    "4- or 8-byte keys and values)"
                )
            bits = size * 8
            if not -(2 ** (bits - 1)) <= data < 2**bits:
                raise ValueError(f"{what} {data} does not fit the {size} bytes of {self}'s {what}s")
            return int(data % 2**bits).to_bytes(size, "little")
        if isinstance(data, bytes | bytearray | memoryview):
            raw = bytes(data)
            if len(raw) != size:
                raise ValueError(f"{what} of {self} must be {size} bytes, got {len(raw)}")
            return raw
        raise TypeError(f"{what} for {self} must be bytes or an int, got {type(data).__name__}")

    def _encode_value(self, value: object) -> bytes:
        if not self.percpu:
            return self._encode("value", value, self._value_size)
        ncpus = bpf.possible_cpus()
        slot = _round8(self._value_size)
        if isinstance(value, bytes | bytearray | memoryview | int):
            values: list[object] = [value] * ncpus
        elif isinstance(value, Sequence) and not isinstance(value, str):
            values = list(value)
            if len(values) != ncpus:
                raise ValueError(
                    f"{self} is a per-CPU map: pass one value per possible CPU ({ncpus}), or one value for "
                    f"all of them; got {len(values)}"
                )
        else:
            raise TypeError(f"value for {self} must be bytes, an int, or a sequence of them (one per CPU)")
        return b"".join(self._encode("value", v, self._value_size).ljust(slot, b"\0") for v in values)

    def _call(self, fn: Callable[..., _T], op: str, *args: object) -> _T:
        try:
            return fn(*args)
        except bpf.BpfError as exc:
            raise from_errno(exc.errno or 0, op=op, program=self) from None


def _round8(n: int) -> int:
    return (n + 7) // 8 * 8


def adopt_map_fd(fd: int, *, name: str | None = None) -> Map:
    """Take ownership of `fd` (already ours); close it if it is not a map."""
    if bpf.fd_object_kind(fd) != "map":
        os.close(fd)
        raise TCError("the fd does not refer to a BPF map (is it a program or a link?)")
    try:
        info = bpf.map_info(fd)
    except bpf.BpfError as exc:
        os.close(fd)
        raise from_errno(exc.errno or 0, op=Op.MAP_INFO) from None
    return Map(
        fd,
        id=info.id,
        name=name or info.name,
        type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
    )
