"""The bad-input catalogue on the real kernel (the mock's is tests/unit/test_bad_input.py): values out of
their C field's range are refused by name before anything reaches the kernel, the kernel's refusals name
what was asked for, and nothing is left on the hook afterwards."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

import asynctc
from asynctc import After, Before, programs
from asynctc.testing import VethPair, tc

pytestmark = pytest.mark.kernel

BACKENDS = ["bpf_link", "netlink"]


async def assert_nothing_left(s: asynctc.Session, netns: str) -> None:
    for d in ("ingress", "egress"):
        assert (await s.query("veth0", d)).entries == ()
    qdiscs = json.loads(tc("-j", "qdisc", "show", "dev", "veth0", netns=netns).stdout or "[]")
    assert [q["kind"] for q in qdiscs if q["kind"] in ("clsact", "ingress")] == []
    assert s.attachments == ()


CASES: list[tuple[dict[str, Any], type[BaseException], str]] = [
    ({"dev": 2**31}, ValueError, r"ifindex must be in 1\.\.2147483647, got 2147483648"),
    ({"dev": 2**32 + 1}, ValueError, r"ifindex must be in 1\.\.2147483647"),
    ({"dev": -3}, ValueError, r"ifindex must be in 1\.\.2147483647, got -3"),
    ({"dev": 7.0}, TypeError, r"dev must be a device name or an ifindex"),
    ({"direction": 3}, ValueError, r"direction must be 'ingress' or 'egress'"),
    ({"program": "x"}, asynctc.ProgramError, r"program must be an asynctc\.Program, got str"),
    ({"position": Before(2**32)}, ValueError, r"anchor program id must be in 1\.\.2\*\*32-1"),
    ({"position": "first"}, TypeError, r"position must be"),
    ({"expected_revision": 2**64}, ValueError, r"expected_revision must be None or an int in 0\.\.2\*\*64-1"),
    ({"expected_revision": -1}, ValueError, r"expected_revision must be"),
]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_out_of_range_and_wrong_types_are_refused_by_name(veth: VethPair, backend: str) -> None:
    async with asynctc.open_session(backend, netns=veth.netns_a) as s:
        prog = programs.constant("pass")
        for override, exc, culprit in CASES:
            args: dict[str, Any] = {"dev": "veth0", "direction": "ingress", "program": prog} | override
            dev, direction, program = args.pop("dev"), args.pop("direction"), args.pop("program")
            with pytest.raises(exc) as info:
                await s.attach(dev, direction, program, **args)
            assert re.search(culprit, str(info.value)), (override, str(info.value))
            assert "struct.error" not in repr(info.value)
            await assert_nothing_left(s, veth.netns_a)
        with pytest.raises(ValueError, match=r"ifindex must be in 1\.\.2147483647"):
            await s.query(2**31, "ingress")
        with pytest.raises(ValueError, match=r"Program\.from_id: prog_id must be in 1\.\.4294967295"):
            asynctc.Program.from_id(2**32)
        await assert_nothing_left(s, veth.netns_a)


async def test_bpf_link_anchor_not_found_names_the_anchor(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        base = await s.attach("veth0", "ingress", programs.constant("pass", name="base"))
        stray = programs.constant("pass", name="stray")
        new = programs.constant("pass", name="new")
        with pytest.raises(asynctc.AnchorNotFound) as info:
            await s.attach("veth0", "ingress", new, position=After(stray))
        msg = str(info.value)
        assert f"After() anchor, program {stray.id}, is not on veth0 ingress" in msg, msg
        assert f"program {new.id} (new)" in msg, msg
        with pytest.raises(asynctc.AnchorNotFound, match=rf"Before\(\) anchor, program {stray.id + 10**6}"):
            await s.attach("veth0", "ingress", new, position=Before(stray.id + 10**6))
        assert [e.prog_id for e in (await s.query("veth0", "ingress")).entries] == [base.info.prog_id]
        await base.detach()
        await assert_nothing_left(s, veth.netns_a)


async def test_bpf_link_conflict_names_the_expected_and_the_actual_program(veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as s:
        p1, p2, p3 = (programs.constant("pass", name=f"p{i}") for i in (1, 2, 3))
        att = await s.attach("veth0", "ingress", p1)
        with pytest.raises(asynctc.Conflict) as info:
            await att.update(p3, expected=p2)
        msg = str(info.value)
        assert f"runs program {p1.id}, not the expected program {p2.id} (p2)" in msg, msg
        assert f"to program {p3.id} (p3)" in msg and "nothing was changed" in msg, msg
        assert info.value.errno == 1
        assert [e.prog_id for e in (await s.query("veth0", "ingress")).entries] == [p1.id]
        await att.detach()
        await assert_nothing_left(s, veth.netns_a)
