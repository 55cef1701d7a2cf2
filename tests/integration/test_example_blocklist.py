"""The worked example of docs/objects.md, run for real: docs/examples/blocklist.c compiled with clang,
docs/examples/blocklist.py's code attaching it to a veth pair while IPv4 frames flow through it."""

from __future__ import annotations

import importlib.util
import socket
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio

import asynctc
from asynctc import programs
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.testing import VethPair, compile_bpf, compile_bpf_skip_reason

pytestmark = pytest.mark.kernel

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
GOOD, BAD = "192.0.2.1", "192.0.2.2"  # documentation addresses: the frames never leave the veth pair


@pytest.fixture(scope="module")
def blocklist_o(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = compile_bpf_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    return compile_bpf(EXAMPLES / "blocklist.c", tmp_path_factory.mktemp("example") / "blocklist.o")


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("blocklist_example", EXAMPLES / "blocklist.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    total = (total >> 16) + (total & 0xFFFF)
    return int(~(total + (total >> 16)) & 0xFFFF)


def udp_frame(source: str) -> bytes:
    """An Ethernet + IPv4 + UDP frame from `source` to 192.0.2.254 (broadcast MAC)."""
    payload = b"asynctc"
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(udp), 1, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(source), socket.inet_aton("192.0.2.254"),
    )  # fmt: skip
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", 0x0800) + ip + udp


async def send_from(veth: VethPair, **counts: int) -> None:
    """Send frames out of the peer end (into veth.a's ingress hook): counts by source, e.g. good=3."""
    addresses = {"good": GOOD, "bad": BAD}

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((veth.b, 0))
            for which, count in counts.items():
                frame = udp_frame(addresses[which])
                for _ in range(count):
                    s.send(frame)

    runner = NetnsRunner(veth.netns_b, trio.CapacityLimiter(1))
    try:
        await trio.to_thread.run_sync(runner.call_in_netns, send)
    finally:
        runner.close()


async def test_blocklist_example_drops_what_it_is_told_while_traffic_flows(
    blocklist_o: Path, example: ModuleType, veth: VethPair
) -> None:
    send_request, requests = trio.open_memory_channel[str](0)
    replies, receive_reply = trio.open_memory_channel[str](0)

    async def ask(line: str) -> str:
        await send_request.send(line)
        return await receive_reply.receive()

    async def run_example() -> None:
        async with replies:  # closed once serve() returns: the test sees EndOfChannel
            await example.serve(str(blocklist_o), veth.a, requests, replies, netns=veth.netns_a)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, asynctc.open_session(netns=veth.netns_a) as session:
            nursery.start_soon(run_example)
            assert (await receive_reply.receive()).startswith(f"enforcing on {veth.a} ingress: program ")
            # what the blocklist lets through goes on to the next program: a counter behind it sees it
            behind = programs.counting("pass")
            await session.attach(veth.a, "ingress", behind)

            await send_from(veth, good=3, bad=2)
            assert await ask("stats") == "passed=5 dropped=0"
            assert behind.count() == 5

            assert await ask(f"block {BAD}") == f"blocked {BAD}"
            assert await ask(f"block {BAD}") == f"{BAD} was already blocked"
            await send_from(veth, good=4, bad=6)
            assert await ask("stats") == f"passed=9 dropped=6 {BAD}=6"
            assert behind.count() == 9  # the blocked frames never got past the blocklist

            assert await ask(f"unblock {BAD}") == f"unblocked {BAD}"
            assert await ask(f"unblock {BAD}") == f"{BAD} was not blocked"
            await send_from(veth, bad=1)
            assert await ask("stats") == "passed=10 dropped=6"
            assert behind.count() == 10

            assert (await ask("block 300.1.2.3")).startswith("error: ")
            assert (await ask("reboot")).startswith("unknown command 'reboot'")
            await send_request.send("quit")
            with pytest.raises(trio.EndOfChannel):
                await receive_reply.receive()  # serve() returned
            hook = await session.query(veth.a, "ingress")
            assert [e.prog_id for e in hook.entries] == [behind.id]  # the blocklist is gone, ours stays


def test_blocklist_example_command_line(blocklist_o: Path, veth: VethPair) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "blocklist.py"), str(blocklist_o), veth.a, "--netns", veth.netns_a],
        input=f"block {BAD}\nstats\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"enforcing on {veth.a} ingress: program ")
    assert lines[1:] == [f"blocked {BAD}", f"passed=0 dropped=0 {BAD}=0"]
