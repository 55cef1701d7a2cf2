"""The netlink backend's pure rules: priorities for positions, the owner tag, the pin record (no kernel)."""

from __future__ import annotations

import pytest
from asynctc_netlink._policy import (
    PRIO_BASE,
    PRIO_END,
    PRIO_STEP,
    RECORD_SIZE,
    PinRecord,
    between,
    choose_priority,
    format_tag,
    parse_tag,
)

from asynctc import Direction


def test_an_empty_hook_starts_in_the_middle() -> None:
    for where in ("first", "last"):
        assert choose_priority(where, set()) == PRIO_BASE


@pytest.mark.parametrize(
    ("where", "prios", "anchor", "expected"),
    [
        ("first", {PRIO_BASE}, None, PRIO_BASE - PRIO_STEP),
        ("last", {PRIO_BASE}, None, PRIO_BASE + PRIO_STEP),
        ("first", {7, 20}, None, 3),  # no room for a full step below 7: halfway to 0
        ("last", {7, 20}, None, 20 + PRIO_STEP),
        ("last", {0xFFF0}, None, (0xFFF0 + PRIO_END) // 2),  # no full step above: halfway to the end
        ("before", {7, 20}, 20, 13),
        ("after", {7, 20}, 7, 13),
        ("after", {7, 20}, 20, 20 + PRIO_STEP),
        ("before", {7, 20}, 7, 3),
        ("before", {1000, 1002}, 1002, 1001),
        ("first", {1}, None, None),  # nothing below 1 (0 means "kernel, choose")
        ("last", {0xFFFF}, None, None),
        ("before", {4, 5}, 5, None),  # neighbours: no gap
        ("after", {4, 5}, 4, None),
        ("before", {1, 9}, 1, None),
    ],
)
def test_positions_become_free_priorities(
    where: str, prios: set[int], anchor: int | None, expected: int | None
) -> None:
    got = choose_priority(where, prios, anchor)  # type: ignore[arg-type]
    assert got == expected
    if got is not None:
        assert 1 <= got < PRIO_END and got not in prios
        if where == "first":
            assert got < min(prios)
        elif where == "last":
            assert got > max(prios)
        else:
            assert anchor is not None
            ordered = sorted(prios | {got})
            i = ordered.index(got)
            assert ordered[i + 1 if where == "before" else i - 1] == anchor


def test_an_anchor_must_be_on_the_hook() -> None:
    with pytest.raises(ValueError, match="anchor"):
        choose_priority("before", {5}, 6)
    with pytest.raises(ValueError, match="anchor"):
        choose_priority("after", {5}, None)
    with pytest.raises(ValueError, match="priorities"):
        choose_priority("first", {0, 5})


def test_repeated_first_and_last_keep_finding_room() -> None:
    """Many First()/Last() attaches in a row each get a fresh priority until the space runs out."""
    prios: set[int] = set()
    for i in range(200):
        got = choose_priority("first" if i % 2 else "last", prios)
        assert got is not None and got not in prios
        prios.add(got)
    assert len(prios) == 200


def test_between_is_strict() -> None:
    for lo in range(0, 40):
        for hi in range(lo, 45):
            got = between(lo, hi)
            if hi - lo <= 1:
                assert got is None
            else:
                assert got is not None and lo < got < hi


def test_owner_tags_round_trip() -> None:
    name = format_tag("asynctc:123.456.7", "atc_pass")
    assert name == "asynctc:asynctc:123.456.7:atc_pass"
    tag = parse_tag(name)
    assert tag is not None
    assert (tag.owner, tag.pid, tag.start, tag.serial, tag.prog_name, tag.pinned) == (
        "asynctc", 123, "456", 7, "atc_pass", False)
    assert tag.session_tag == "asynctc:123.456.7"
    pinned = parse_tag(format_tag("team:9.8.1", "", pinned=True))
    assert pinned is not None and pinned.pinned and pinned.prog_name == "" and pinned.owner == "team"


@pytest.mark.parametrize(
    "name",
    [None, "", "foreign", "atc", "asynctc:x", "asynctc::1.2.3:p", "asynctc:o:1.2:p", "asynctc:o:a.b.c:p",
     "asynctc:o:1.2.3:p:other", "asynctc:o:1.2.3:p:pinned:x", "other:o:1.2.3:p"],
)
def test_other_names_are_not_tags(name: str | None) -> None:
    assert parse_tag(name) is None


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
