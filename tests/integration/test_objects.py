"""Compiled BPF objects on the real kernel: loading, maps under real traffic, attach and atomic update with
both backends, pinned maps reused, verifier rejection, wrong program types, and cleanup.

The objects are compiled from tests/fixtures/bpf/*.c by the `bpf_objects` fixture (tests/conftest.py).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.testing

import asynctc
from asynctc import programs
from asynctc.lowlevel import bpf
from asynctc.testing import VethPair, send_frames
from asynctc_mock import MockKernel

pytestmark = pytest.mark.kernel

ETH_P_TEST = 0x88B5  # the ethertype of send_frames' frames
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC = 0, 2, -1


def fds() -> set[str]:
    """This process's open fds (without the one listdir itself used, closed by the time it is checked)."""
    return {fd for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}


def u64(value: bytes | list[bytes] | None) -> int:
    assert isinstance(value, bytes)
    return int.from_bytes(value, "little")


def total(value: bytes | list[bytes] | None) -> int:
    assert isinstance(value, list)
    return sum(int.from_bytes(v, "little") for v in value)


def map_exists(map_id: int) -> bool:
    try:
        with asynctc.Map.from_id(map_id):
            return True
    except asynctc.TCError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return False


async def frames(veth: VethPair, count: int) -> None:
    """Send frames from the peer end: they cross veth0's ingress hook."""
    await trio.to_thread.run_sync(lambda: send_frames(veth.b, count, netns=veth.netns_b))


async def test_load_programs_and_maps(bpf_objects: dict[str, Path]) -> None:
    async with asynctc.open_object(bpf_objects["objects"]) as obj:
        assert obj.loaded and obj.libbpf_version >= "1.0"
        assert list(obj.programs) == ["count_ingress", "count_egress", "classic", "xdp_pass"]
        sections = {name: p.section for name, p in obj.programs.items()}
        assert sections == {
            "count_ingress": "tcx/ingress",
            "count_egress": "tcx/egress",
            "classic": "tc",
            "xdp_pass": "xdp",
        }
        # the tcx sections (unknown to libbpf 1.1) were loaded as SCHED_CLS programs
        assert {name: p.type_name for name, p in obj.programs.items()} == {
            "count_ingress": "SCHED_CLS",
            "count_egress": "SCHED_CLS",
            "classic": "SCHED_CLS",
            "xdp_pass": "XDP",
        }
        prog = obj.program("count_ingress")
        assert prog.id == bpf.prog_info(prog.fd).id and prog.name == "count_ingress"
        assert set(obj.maps) == {"by_proto", "verdict", "percpu_hits", "last_ran"}
        by_proto = obj.map("by_proto")
        assert (by_proto.type_name, by_proto.key_size, by_proto.value_size, by_proto.max_entries) == (
            "HASH",
            4,
            8,
            64,
        )
        assert by_proto.id == bpf.map_info(by_proto.fd).id
        assert obj.map("percpu_hits").percpu and not by_proto.percpu
        assert obj.map_specs["by_proto"].pin_path is None
        with pytest.raises(asynctc.ProgramError, match="has no program 'nope'; its programs: count_ingress"):
            obj.program("nope")
        with pytest.raises(KeyError, match="has no map 'nope'; its maps: by_proto"):
            obj.map("nope")


async def test_maps_read_and_written_while_traffic_flows(bpf_objects: dict[str, Path], veth: VethPair) -> None:
    async with (
        asynctc.open_object(bpf_objects["objects"]) as obj,
        asynctc.open_session("bpf_link", netns=veth.netns_a) as session,
    ):
        # the object's program first, a counting program after it: the counter sees what the first lets by
        behind = programs.counting("pass")
        await session.attach(veth.a, "ingress", behind)
        await session.attach(veth.a, "ingress", obj.program("count_ingress"), position=asynctc.First())
        by_proto, verdict, hits = obj.map("by_proto"), obj.map("verdict"), obj.map("percpu_hits")

        verdict.update(0, TC_ACT_UNSPEC)  # "next": the counter behind runs too
        await frames(veth, 5)
        assert u64(by_proto.lookup(ETH_P_TEST)) == 5
        assert total(hits.lookup(0)) == 5
        assert len(hits.lookup(0) or []) == bpf.possible_cpus()
        assert behind.count() == 5

        verdict.update(0, TC_ACT_SHOT)  # written while attached: from now on the program drops
        assert verdict.lookup(0) == (2).to_bytes(4, "little")
        await frames(veth, 4)
        assert u64(by_proto.lookup(ETH_P_TEST)) == 9
        assert behind.count() == 5  # nothing got past the drop

        # user space resets and rewrites what the program counts
        by_proto.update(ETH_P_TEST, 100)
        hits.update(0, 0)
        verdict.update(0, TC_ACT_OK)
        await frames(veth, 3)
        assert u64(by_proto.lookup(ETH_P_TEST)) == 103
        assert total(hits.lookup(0)) == 3
        assert behind.count() == 5  # "pass" ends the hook: the program behind does not run
        assert by_proto.keys() == [ETH_P_TEST.to_bytes(4, "little")]
        assert by_proto.items() == [(ETH_P_TEST.to_bytes(4, "little"), (103).to_bytes(8, "little"))]
        by_proto.delete(ETH_P_TEST)
        assert by_proto.lookup(ETH_P_TEST) is None and by_proto.keys() == []
        with pytest.raises(KeyError, match="no element with key b5880000"):
            by_proto.delete(ETH_P_TEST)


@pytest.mark.parametrize(("backend", "method"), [("bpf_link", "link_update"), ("netlink", "netlink_replace")])
async def test_attach_and_update_atomically_to_another_program_of_the_object(
    bpf_objects: dict[str, Path], veth: VethPair, backend: str, method: str
) -> None:
    async with (
        asynctc.open_object(bpf_objects["objects"]) as obj,
        asynctc.open_session(backend, netns=veth.netns_a) as session,
    ):
        last_ran, hits = obj.map("last_ran"), obj.map("percpu_hits")
        first, second = obj.program("count_ingress"), obj.program("classic")
        async with session.open_attachment(veth.a, "ingress", first) as att:
            await frames(veth, 2)
            assert last_ran.lookup(0) == (1).to_bytes(4, "little")
            result = await att.update(second, expected=first)
            assert result.method == method
            assert att.info.prog_id == second.id
            hook = await session.query(veth.a, "ingress")
            assert [e.prog_id for e in hook.entries] == [second.id]
            await frames(veth, 3)
            assert last_ran.lookup(0) == (3).to_bytes(4, "little")
            assert total(hits.lookup(0)) == 5  # both programs share the object's maps
            with pytest.raises(asynctc.Conflict):
                await att.update(first, expected=first)
        assert (await session.query(veth.a, "ingress")).entries == ()


async def test_pinned_maps_are_reused_across_loads(bpf_objects: dict[str, Path], bpffs: str) -> None:
    pin = os.path.join(bpffs, "pinned_hits")
    async with asynctc.open_object(bpf_objects["pinned"], pin_root=bpffs) as first:
        assert first.map_specs["pinned_hits"].pin_path == pin
        assert first.map_specs["fresh_hits"].pin_path is None
        pinned_id, other_id = first.map("pinned_hits").id, first.map("fresh_hits").id
        first.map("pinned_hits").update(0, 41)
        first.map("fresh_hits").update(0, 41)
    assert os.path.exists(pin)  # the pin outlives the object
    async with asynctc.open_object(bpf_objects["pinned"], pin_root=bpffs) as second:
        assert second.map("pinned_hits").id == pinned_id  # reused, with its contents
        assert u64(second.map("pinned_hits").lookup(0)) == 41
        assert second.map("fresh_hits").id != other_id  # maps not pinned are new
        assert u64(second.map("fresh_hits").lookup(0)) == 0
    with asynctc.Map.from_pinned(pin) as m:
        assert (m.id, m.name, m.type_name, m.key_size, m.value_size) == (pinned_id, "pinned_hits", "ARRAY", 4, 8)
        m.update(0, 42)
        other = os.path.join(bpffs, "again")
        m.pin(other)
        with pytest.raises(asynctc.PinError, match="already pinned"):
            m.pin(other)
    with asynctc.Map.from_pinned(other) as again:
        assert again.id == pinned_id and u64(again.lookup(0)) == 42
    os.unlink(other)
    os.unlink(pin)
    with pytest.raises(asynctc.PinError, match="nothing is pinned"):
        asynctc.Map.from_pinned(pin)


async def test_verifier_rejection_carries_the_log_and_leaves_nothing(
    bpf_objects: dict[str, Path], bpffs: str
) -> None:
    before_fds, before_pins = fds(), set(os.listdir(bpffs))
    with pytest.raises(asynctc.ProgramError) as exc:
        async with asynctc.open_object(bpf_objects["rejected_pinned"], pin_root=bpffs):
            pytest.fail("a rejected object must not open")
    err = exc.value
    assert err.errno == errno.EACCES
    assert "invalid mem access 'map_value_or_null'" in err.verifier_log
    assert err.verifier_log.startswith("0: R1=ctx()")  # the whole log, from its first line
    message = str(err)
    assert "the verifier refused program 'unchecked' (section 'tc')" in message
    assert "R0 invalid mem access 'map_value_or_null'" in message  # the tail that matters
    assert "0: R1=ctx()" not in message and len(message.splitlines()) <= 9
    assert fds() == before_fds
    assert set(os.listdir(bpffs)) == before_pins  # libbpf unpinned the map it had pinned for the load


async def test_a_section_without_a_program_type_is_named(bpf_objects: dict[str, Path]) -> None:
    before = fds()
    with pytest.raises(
        asynctc.ProgramError,
        match=r"the ELF section of program 'untyped' \(section 'mystery/section'\) names no program type",
    ) as exc:
        async with asynctc.open_object(bpf_objects["unknown_section"]):
            pass
    assert exc.value.errno == errno.EINVAL
    assert fds() == before


async def test_wrong_program_type_is_refused_before_any_kernel_call(
    bpf_objects: dict[str, Path], veth: VethPair
) -> None:
    async with (
        asynctc.open_object(bpf_objects["objects"]) as obj,
        asynctc.open_session("bpf_link", netns=veth.netns_a) as session,
    ):
        xdp = obj.program("xdp_pass")
        assert xdp.section == "xdp"
        with pytest.raises(asynctc.ProgramError, match="is a XDP program; tc hooks run only SCHED_CLS"):
            await session.attach(veth.a, "ingress", xdp)
        hook = await session.query(veth.a, "ingress")
        assert hook.entries == () and hook.revision == 1  # the kernel was never asked
        assert session.attachments == ()
    with pytest.raises(asynctc.ProgramError, match="XDP program"):
        await asynctc.load_program(f"{bpf_objects['objects']}:xdp_pass")


async def test_cleanup_leaves_no_fd_pin_or_program(bpf_objects: dict[str, Path], bpffs: str) -> None:
    before_fds, before_pins = fds(), set(os.listdir(bpffs))
    async with asynctc.open_object(bpf_objects["objects"]) as obj:
        prog_ids = [p.id for p in obj.programs.values()]
        map_ids = [m.id for m in obj.maps.values()]
        assert fds() - before_fds  # one fd per program and per map, ours
        # kept past the block: a handle of our own
        kept = asynctc.Program.from_fd(obj.program("classic").fd)
    assert obj.closed and all(p.closed for p in obj._programs.values())
    with pytest.raises(asynctc.ProgramError, match="is closed"):
        obj.program("classic")
    assert fds() - before_fds == {str(kept.fd)}
    kept.close()
    assert fds() == before_fds
    assert set(os.listdir(bpffs)) == before_pins
    for prog_id in prog_ids:
        with pytest.raises(asynctc.ProgramError, match="no BPF program has this id"):
            asynctc.Program.from_id(prog_id)
    # The kernel frees a program's maps after an RCU grace period (bpf_prog_free_deferred), not when its
    # last fd closes: ask again until they are gone, within a deadline.
    with trio.fail_after(10):
        for map_id in map_ids:
            while map_exists(map_id):  # noqa: ASYNC110 - no event tells when the kernel freed a map
                await trio.sleep(0.01)
    with pytest.raises(asynctc.TCError, match="no BPF map has this id"):
        asynctc.Map.from_id(map_ids[0])


async def test_cancelled_while_loading_leaves_nothing(bpf_objects: dict[str, Path]) -> None:
    before = fds()
    opened: list[asynctc.BpfObject] = []

    async def open_and_wait() -> None:
        async with asynctc.open_object(bpf_objects["objects"]) as obj:
            opened.append(obj)
            await trio.sleep_forever()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_and_wait)
            await trio.testing.wait_all_tasks_blocked()  # the load runs in its worker thread
            nursery.cancel_scope.cancel()
    # the load finished in its thread (a verifier run cannot be interrupted); whatever it made is closed
    assert all(obj.closed for obj in opened)
    assert fds() == before

    with trio.CancelScope() as scope:
        scope.cancel()
        async with asynctc.open_object(bpf_objects["objects"]):
            pytest.fail("a cancelled scope must not open the object")
    assert fds() == before


async def test_attached_programs_outlive_the_object(bpf_objects: dict[str, Path], veth: VethPair) -> None:
    async with asynctc.open_session("bpf_link", netns=veth.netns_a) as session:
        async with asynctc.open_object(bpf_objects["objects"]) as obj:
            prog = obj.program("count_ingress")
            prog_id, map_id = prog.id, obj.map("percpu_hits").id
            await session.attach(veth.a, "ingress", prog)
        # the link holds the program, the program its maps
        await frames(veth, 3)
        with asynctc.Map.from_id(map_id) as hits:
            assert total(hits.lookup(0)) == 3
        hook = await session.query(veth.a, "ingress")
        assert [e.prog_id for e in hook.entries] == [prog_id]
    with pytest.raises(asynctc.ProgramError):
        asynctc.Program.from_id(prog_id)


async def test_real_object_programs_run_on_the_mock_kernel(bpf_objects: dict[str, Path]) -> None:
    kernel = MockKernel()
    async with (
        asynctc.open_object(bpf_objects["objects"]) as obj,
        asynctc.open_session("mock", kernel=kernel) as session,
    ):
        async with session.open_attachment("veth0", "ingress", obj.program("classic")):
            assert kernel.send("veth0", "ingress", count=4) == "pass"  # BPF_PROG_TEST_RUN, for real
            assert total(obj.map("percpu_hits").lookup(0)) == 4
            assert obj.map("last_ran").lookup(0) == (3).to_bytes(4, "little")
            obj.map("verdict").update(0, TC_ACT_SHOT)
            assert kernel.send("veth0", "ingress") == "drop"


async def test_load_program_for_the_command_line(bpf_objects: dict[str, Path], veth: VethPair) -> None:
    prog, direction = await asynctc.load_program(f"{bpf_objects['objects']}:count_egress")
    with prog:
        assert (prog.name, prog.section, direction) == ("count_egress", "tcx/egress", asynctc.Direction.EGRESS)
        async with asynctc.open_session("bpf_link", netns=veth.netns_a) as session:
            assert direction is not None
            att = await session.attach(veth.a, direction, prog)
            assert att.info.prog_id == prog.id
    prog, direction = await asynctc.load_program(f"{bpf_objects['objects']}:classic")
    with prog:
        assert direction is None  # "tc" names no direction: the caller says which
    with pytest.raises(asynctc.ProgramError, match="holds 3 tc programs, so name the one to use"):
        await asynctc.load_program(bpf_objects["objects"])
    with pytest.raises(asynctc.ProgramError, match="has no program 'nope'"):
        await asynctc.load_program(f"{bpf_objects['objects']}:nope")


async def test_map_sizes_and_types_are_checked_before_the_syscall(bpf_objects: dict[str, Path]) -> None:
    async with asynctc.open_object(bpf_objects["objects"]) as obj:
        by_proto, verdict, hits = obj.map("by_proto"), obj.map("verdict"), obj.map("percpu_hits")
        with pytest.raises(ValueError, match=r"key of map \d+ \(by_proto\) must be 4 bytes, got 2"):
            by_proto.lookup(b"\x00\x01")
        with pytest.raises(ValueError, match="value of map .* must be 8 bytes, got 4"):
            by_proto.update(1, b"\x00" * 4)
        with pytest.raises(ValueError, match="does not fit the 4 bytes"):
            verdict.update(0, 2**32)
        with pytest.raises(TypeError, match="must be bytes or an int, got str"):
            verdict.update("0", 1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="got a bool"):
            verdict.update(True, 1)
        with pytest.raises(ValueError, match="one value per possible CPU"):
            hits.update(0, [1] * (bpf.possible_cpus() + 1))
        verdict.update(0, -1)  # a negative int is stored in two's complement, as the program's __s32
        assert verdict.lookup(0) == b"\xff\xff\xff\xff"
        assert verdict.lookup(5) is None  # past the array's end
        with pytest.raises(asynctc.TCError, match=r"map is full \(or the key is past the end of an array\)"):
            verdict.update(5, 0)
        with pytest.raises(asynctc.TCError, match="arrays keep every key"):
            verdict.delete(0)
        for key in range(64):
            by_proto.update(key, key)
        with pytest.raises(asynctc.TCError, match="map is full") as exc:
            by_proto.update(64, 0)
        assert exc.value.errno == errno.E2BIG
        assert len(by_proto.keys()) == 64
        assert dict(by_proto.items())[(7).to_bytes(4, "little")] == (7).to_bytes(8, "little")
        verdict.close()
        verdict.close()  # idempotent
        with pytest.raises(asynctc.TCError, match="is closed"):
            verdict.lookup(0)
