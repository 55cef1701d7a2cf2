"""The shared legacy-tc policy (asynctc.lowlevel.tcpolicy): priorities for positions, the owner tag."""

from __future__ import annotations

import errno

import pytest

import asynctc
from asynctc import Direction
from asynctc._types import Placement
from asynctc.lowlevel.tcpolicy import (
    PRIO_BASE,
    PRIO_END,
    PRIO_STEP,
    between,
    choose_priority,
    format_tag,
    parse_tag,
    place_filter,
)


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


def _place(placement: Placement, filters: list[tuple[int, int, str | None, int | None]]) -> int:
    return place_filter(placement, filters, dev="eth0", direction=Direction.INGRESS, backend="x")


def test_place_filter_anchors_to_cls_bpf_filters_only() -> None:
    filters: list[tuple[int, int, str | None, int | None]] = [
        (100, 1, "u32", None), (200, 1, "bpf", 42), (300, 5, "bpf", 43)]
    assert _place(Placement("after", prog_id=42), filters) == 250
    assert _place(Placement("before", prog_id=7, priority=300, handle=5), filters) == 250  # the slot wins
    assert _place(Placement("first"), filters) == 50  # no full step below 100: halfway to 0
    with pytest.raises(asynctc.AnchorNotFound, match=r"cls_bpf filter on eth0 ingress \[x backend\]") as e:
        _place(Placement("before", prog_id=9, priority=100, handle=1), filters)  # a u32 filter is no anchor
    assert e.value.errno == errno.ENOENT
    with pytest.raises(asynctc.HookFull, match="priority=") as f:
        _place(Placement("first"), [(1, 1, "bpf", 1)])
    assert f.value.errno == errno.ERANGE


def test_session_tags_parse_and_reject() -> None:
    from asynctc.lowlevel.tcpolicy import format_session_tag, parse_session_tag

    assert parse_session_tag("app:123.456.7") == ("app", 123, "456", 7)
    assert format_session_tag("app", 123, "456", 7) == "app:123.456.7"
    assert parse_session_tag(format_session_tag("app", 5, "", 2)) == ("app", 5, "0", 2)
    for bad in ("app", "app:1.2", "app:1.2.x", ":1.2.3", "a b:1.2.3", "a/b:1.2.3", "app:1.2.3:x"):
        assert parse_session_tag(bad) is None, bad


def test_process_identity_survives_pid_reuse() -> None:
    import os

    from asynctc.lowlevel.tcpolicy import process_alive, process_start_time

    start = process_start_time(os.getpid())
    assert start and start.isdigit()
    assert process_alive(os.getpid(), start)
    assert not process_alive(os.getpid(), str(int(start) + 1))  # same pid, another process
    assert process_start_time(2**22 + 1) is None and not process_alive(2**22 + 1, start)
