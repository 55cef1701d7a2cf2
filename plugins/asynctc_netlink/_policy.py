"""The netlink backend's pin record layout (pure, no kernel calls, so that it can be unit-tested).

The backend-independent legacy-tc policy (priority choice for positions, the owner tag recorded in
TCA_BPF_NAME) lives in `asynctc.lowlevel.tcpolicy`, shared with the mock backend's legacy mode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from asynctc import Direction

__all__ = ["RECORD_SIZE", "PinRecord"]

# --- the pin record -------------------------------------------------------------------------------------

RECORD_MAGIC: Final = b"ATCNL\x00\x01\x00"
_RECORD_HEAD: Final = struct.Struct("<8sIIIIIQ")  # magic, ifindex, direction, priority, handle, prog_id, netns
RECORD_SIZE: Final = 256
_NAME_ROOM: Final = RECORD_SIZE - _RECORD_HEAD.size
_DIRECTIONS: Final = (Direction.INGRESS, Direction.EGRESS)


@dataclass(frozen=True, slots=True)
class PinRecord:
    """What a pinned netlink attachment records beside its program: the 256-byte value of a one-entry
    BPF array map (bpffs holds only BPF objects). `netns` is the inode of the namespace the filter is in;
    `name` the filter's TCA_BPF_NAME when it was pinned."""

    ifindex: int
    direction: Direction
    priority: int
    handle: int
    prog_id: int
    netns: int
    name: str

    def encode(self) -> bytes:
        name = self.name.encode()
        if len(name) > _NAME_ROOM:
            raise ValueError(f"filter name too long for a pin record ({len(name)} > {_NAME_ROOM} bytes)")
        head = _RECORD_HEAD.pack(RECORD_MAGIC, self.ifindex, _DIRECTIONS.index(self.direction), self.priority,
                                 self.handle, self.prog_id, self.netns)
        return head + name.ljust(_NAME_ROOM, b"\0")

    @classmethod
    def decode(cls, data: bytes) -> PinRecord | None:
        """The record in a map value, or None if it is not one (another map pinned there)."""
        if len(data) != RECORD_SIZE:
            return None
        magic, ifindex, direction, priority, handle, prog_id, netns = _RECORD_HEAD.unpack_from(data)
        if magic != RECORD_MAGIC or direction > 1:
            return None
        name = data[_RECORD_HEAD.size:].split(b"\0", 1)[0].decode(errors="replace")
        return cls(ifindex=ifindex, direction=_DIRECTIONS[direction], priority=priority, handle=handle,
                   prog_id=prog_id, netns=netns, name=name)
