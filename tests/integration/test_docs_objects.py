"""Every ```python block of docs/objects.md (and the README's object example), run as a test.

Each `async def` below whose name does not start with `test_` is an example exactly as the docs show it;
`test_objects_doc_blocks_are_tested` checks that every block appears here (or, for the worked example's
`serve`, in docs/examples/blocklist.py, which tests/integration/test_example_blocklist.py runs).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

import pytest
import trio

import asynctc
from asynctc.lowlevel import bpf
from asynctc.testing import VethPair, compile_bpf, compile_bpf_skip_reason, send_frames

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def blocklist_o(tmp_path_factory: pytest.TempPathFactory) -> str:
    reason = compile_bpf_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("docs") / "blocklist.o"
    return str(compile_bpf(ROOT / "docs" / "examples" / "blocklist.c", out))


# =========================================================================================================
# docs/objects.md
# =========================================================================================================
async def block_an_address(path: str, dev: str, netns: str | None = None) -> None:
    async with (
        asynctc.open_object(path) as obj,  # libbpf opens and loads it in a worker thread
        asynctc.open_session(netns=netns) as session,
        session.open_attachment(dev, "ingress", obj.program("blocklist_ingress")),
    ):
        blocklist = obj.map("blocklist")
        address = ipaddress.IPv4Address("192.0.2.7").packed  # the key: 4 bytes, network order
        blocklist.update(address, 0)  # dropped from now on
        assert blocklist.keys() == [address]
        ...  # traffic flows; the program counts what it drops from the address in its value
        dropped = blocklist.lookup(address)
        print(int.from_bytes(dropped, "little") if isinstance(dropped, bytes) else 0)
    # detached, and the object's programs and maps closed, however the block ended


async def swap_programs(path: str, dev: str, netns: str | None = None) -> None:
    async with asynctc.open_object(path) as obj, asynctc.open_session(netns=netns) as session:
        first, second = obj.program("count_ingress"), obj.program("classic")
        async with session.open_attachment(dev, "ingress", first) as att:
            result = await att.update(second, expected=first)  # compare-and-swap, never an empty hook
            assert result.method in ("link_update", "netlink_replace")


async def read_and_write_maps(path: str) -> None:
    async with asynctc.open_object(path) as obj:
        verdict, hits = obj.map("verdict"), obj.map("percpu_hits")
        verdict.update(0, -1)  # an int for a 4-byte value: the program's __s32 reads -1
        assert verdict.lookup(0) == b"\xff\xff\xff\xff"
        per_cpu = hits.lookup(0)  # a per-CPU map: one value per possible CPU
        assert isinstance(per_cpu, list)
        print(sum(int.from_bytes(v, "little") for v in per_cpu))
        try:
            verdict.update(0, b"\x01")
        except ValueError as exc:
            print(exc)  # value of map 12 (verdict) must be 4 bytes, got 1


async def reuse_a_pinned_map(path: str, pin_root: str) -> None:
    async with asynctc.open_object(path, pin_root=pin_root) as obj:
        obj.map("pinned_hits").update(0, 41)
    async with asynctc.open_object(path, pin_root=pin_root) as obj:  # a restart, later
        assert obj.map("pinned_hits").lookup(0) == (41).to_bytes(8, "little")
    os.unlink(os.path.join(pin_root, "pinned_hits"))  # remove the pin to start afresh


async def show_the_verifier_log(path: str) -> None:
    try:
        async with asynctc.open_object(path):
            pass
    except asynctc.ProgramError as exc:
        print(exc)  # ...R0 invalid mem access 'map_value_or_null'
        print(exc.verifier_log)  # all of it, from the program's first instruction


async def inspect_an_object(path: str) -> None:
    async with asynctc.open_object(path, load=False) as obj:
        for name, spec in obj.program_specs.items():
            print(name, spec.section, spec.type)  # blocklist_ingress tcx/ingress 3
        for name, mspec in obj.map_specs.items():
            print(name, mspec.type, mspec.key_size, mspec.value_size, mspec.max_entries)


async def one_program(path: str) -> None:
    program, direction = await asynctc.load_program(f"{path}:count_egress")
    with program:  # yours to close; its maps live as long as it does
        assert program.section == "tcx/egress" and direction is asynctc.Direction.EGRESS


# =========================================================================================================
# README.md
# =========================================================================================================
async def readme_object_example(session: asynctc.Session) -> None:
    async with asynctc.open_object("blocklist.o") as obj:       # programs and maps, through libbpf.so.1
        async with session.open_attachment("eth0", "ingress", obj.program("blocklist_ingress")):
            obj.map("blocklist").update(ipaddress.IPv4Address("192.0.2.7").packed, 0)   # dropped from now on
            print(obj.map("stats").lookup(1))                    # per-CPU counts of what it dropped


# =========================================================================================================
# the tests
# =========================================================================================================
async def test_block_an_address(blocklist_o: str, veth: VethPair, capsys: pytest.CaptureFixture[str]) -> None:
    await block_an_address(blocklist_o, veth.a, veth.netns_a)
    assert capsys.readouterr().out == "0\n"
    async with asynctc.open_session(netns=veth.netns_a) as session:
        assert (await session.query(veth.a, "ingress")).entries == ()


@pytest.mark.parametrize("backend", ["bpf_link", "netlink"])
async def test_swap_programs(
    bpf_objects: dict[str, Path], veth: VethPair, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open_session = asynctc.open_session
    monkeypatch.setattr(asynctc, "open_session", lambda **kw: real_open_session(backend, **kw))
    await swap_programs(str(bpf_objects["objects"]), veth.a, veth.netns_a)


async def test_read_and_write_maps(bpf_objects: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    await read_and_write_maps(str(bpf_objects["objects"]))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "0"
    assert re.fullmatch(r"value of map \d+ \(verdict\) must be 4 bytes, got 1", out[1])


async def test_reuse_a_pinned_map(bpf_objects: dict[str, Path], bpffs: str) -> None:
    await reuse_a_pinned_map(str(bpf_objects["pinned"]), bpffs)
    assert not os.path.exists(os.path.join(bpffs, "pinned_hits"))


async def test_show_the_verifier_log(bpf_objects: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    await show_the_verifier_log(str(bpf_objects["rejected"]))
    out = capsys.readouterr().out
    assert "the verifier refused program 'unchecked'" in out
    assert "R0 invalid mem access 'map_value_or_null'" in out
    assert "\n0: R1=ctx()" in out  # the whole log was printed too


async def test_inspect_an_object(blocklist_o: str, capsys: pytest.CaptureFixture[str]) -> None:
    await inspect_an_object(blocklist_o)
    assert capsys.readouterr().out.splitlines() == [
        "blocklist_ingress tcx/ingress 3",
        "blocklist 1 4 8 65536",
        "stats 6 4 8 2",
    ]


async def test_one_program(bpf_objects: dict[str, Path]) -> None:
    await one_program(str(bpf_objects["objects"]))


async def test_readme_object_example(
    blocklist_o: str, veth: VethPair, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the README's names ("blocklist.o", "eth0") stand for the compiled example and a device
    monkeypatch.chdir(Path(blocklist_o).parent)
    async with asynctc.open_session(netns=veth.netns_a) as session:
        real_attachment = session.open_attachment

        def on_the_veth(dev: str, *args: object, **kwargs: object) -> object:
            return real_attachment(veth.a if dev == "eth0" else dev, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(session, "open_attachment", on_the_veth)
        await trio.to_thread.run_sync(lambda: send_frames(veth.b, 1, netns=veth.netns_b))
        await readme_object_example(session)
    assert capsys.readouterr().out == f"{[bytes(8)] * bpf.possible_cpus()}\n"  # nothing dropped yet


# =========================================================================================================
# the docs show only what is tested
# =========================================================================================================
def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _norm(lines: list[str]) -> list[str]:
    return [ln.strip() for ln in lines if ln.strip()]


def _found(block: str, *sources: Path) -> bool:
    want = _norm(block.splitlines())
    for source in sources:
        here = _norm(source.read_text().splitlines())
        if any(here[i : i + len(want)] == want for i in range(len(here) - len(want) + 1)):
            return True
    return False


@pytest.mark.parametrize("doc", ["docs/objects.md", "README.md"])
def test_objects_doc_blocks_are_tested(doc: str) -> None:
    """Every ```python block of docs/objects.md, and the README's object example, appears here line for
    line (indentation aside), or in the worked example the example's own test runs."""
    blocks = _python_blocks((ROOT / doc).read_text())
    if doc == "README.md":
        blocks = [b for b in blocks if "open_object" in b]
    assert blocks, f"{doc} has no ```python block about objects"
    for block in blocks:
        assert _found(block, Path(__file__), ROOT / "docs" / "examples" / "blocklist.py"), (
            f"this block of {doc} is not tested:\n{block}"
        )
