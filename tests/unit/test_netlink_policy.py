"""The netlink backend's pin record layout (pure, no kernel)."""

from __future__ import annotations

import pytest

from asynctc import Direction
from asynctc.lowlevel.tcpolicy import format_tag
from asynctc_netlink._policy import RECORD_SIZE, PinRecord


def test_pin_records_round_trip() -> None:
    rec = PinRecord(ifindex=42, direction=Direction.EGRESS, priority=0x8000, handle=0xDEADBEEF, prog_id=77,
                    netns=4026531840, name=format_tag("o:1.2.3", "p", pinned=True))
    data = rec.encode()
    assert len(data) == RECORD_SIZE
    assert PinRecord.decode(data) == rec


def test_other_map_values_are_not_records() -> None:
    assert PinRecord.decode(bytes(RECORD_SIZE)) is None
    assert PinRecord.decode(bytes(8)) is None
    good = PinRecord(1, Direction.INGRESS, 1, 1, 1, 1, "n").encode()
    assert PinRecord.decode(good[:8] + b"\x01\x00\x00\x00" + b"\x05\x00\x00\x00" + good[16:]) is None  # direction 5
    with pytest.raises(ValueError, match="too long"):
        PinRecord(1, Direction.INGRESS, 1, 1, 1, 1, "x" * 300).encode()
