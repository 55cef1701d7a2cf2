"""An IPv4 source-address blocklist on a tc ingress hook, driven from trio (the program: blocklist.c).

    clang -O2 -g -target bpf -I/usr/include/$(gcc -dumpmachine) -c blocklist.c -o blocklist.o
    sudo python blocklist.py blocklist.o eth0

Then type commands, one a line: `block 192.0.2.7`, `unblock 192.0.2.7`, `stats`, `quit` (or end the
input). Each is answered with one line. The program stays attached while the commands run, and is
detached when the input ends, on `quit`, on Ctrl-C, or on any error.

The map writes are single bpf(2) syscalls of a few microseconds, made straight from the trio task that
reads the commands: packets keep flowing through the program while it happens.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

import trio

import asynctc

STAT_PASSED, STAT_DROPPED = 0, 1  # keys of the `stats` map, as in blocklist.c


class Blocklist:
    """User space's side of blocklist.c's two maps."""

    def __init__(self, obj: asynctc.BpfObject) -> None:
        self._blocked = obj.map("blocklist")  # source address (network order) -> packets dropped
        self._stats = obj.map("stats")  # per CPU: STAT_PASSED, STAT_DROPPED

    def block(self, address: str) -> bool:
        """Block `address`; False if it already was (its drop count is kept)."""
        key = ipaddress.IPv4Address(address).packed  # network byte order, as the program compares it
        if self._blocked.lookup(key) is not None:
            return False
        self._blocked.update(key, 0)
        return True

    def unblock(self, address: str) -> bool:
        """Let `address` through again; False if it was not blocked."""
        try:
            self._blocked.delete(ipaddress.IPv4Address(address).packed)
        except KeyError:
            return False
        return True

    def blocked(self) -> dict[str, int]:
        """Blocked address -> packets dropped from it."""
        return {
            str(ipaddress.IPv4Address(key)): int.from_bytes(value, "little")
            for key, value in self._blocked.items()
            if isinstance(value, bytes)
        }

    def totals(self) -> tuple[int, int]:
        """(packets let through, packets dropped), summed over every CPU."""
        return self._sum(STAT_PASSED), self._sum(STAT_DROPPED)

    def _sum(self, stat: int) -> int:
        per_cpu = self._stats.lookup(stat)
        assert isinstance(per_cpu, list)  # a per-CPU map: one value per possible CPU
        return sum(int.from_bytes(v, "little") for v in per_cpu)


def answer(blocklist: Blocklist, line: str) -> str | None:
    """The reply to one command line; None for `quit`."""
    words = line.split()
    try:
        match words:
            case ["block", address]:
                return f"blocked {address}" if blocklist.block(address) else f"{address} was already blocked"
            case ["unblock", address]:
                return f"unblocked {address}" if blocklist.unblock(address) else f"{address} was not blocked"
            case ["stats"]:
                passed, dropped = blocklist.totals()
                per_address = " ".join(f"{a}={n}" for a, n in sorted(blocklist.blocked().items()))
                return f"passed={passed} dropped={dropped}" + (f" {per_address}" if per_address else "")
            case ["quit"]:
                return None
            case _:
                return f"unknown command {line.strip()!r}: block ADDRESS, unblock ADDRESS, stats, quit"
    except ValueError as exc:  # not an IPv4 address
        return f"error: {exc}"


async def serve(
    object_path: str,
    dev: str,
    requests: trio.abc.ReceiveChannel[str],
    replies: trio.abc.SendChannel[str],
    *,
    netns: str | None = None,
    backend: str = "auto",
) -> None:
    """Attach blocklist.o's program to `dev`'s ingress hook and answer commands until they end or `quit`."""
    async with (
        asynctc.open_object(object_path) as obj,
        asynctc.open_session(backend, netns=netns) as session,
        session.open_attachment(dev, "ingress", obj.program("blocklist_ingress")) as att,
    ):
        blocklist = Blocklist(obj)
        await replies.send(f"enforcing on {dev} ingress: program {att.info.prog_id} ({session.backend_name})")
        async for line in requests:
            reply = answer(blocklist, line)
            if reply is None:
                break
            await replies.send(reply)
    # detached here, however the block ended


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An IPv4 source-address blocklist on a tc ingress hook.")
    parser.add_argument("object", help="blocklist.o, compiled from blocklist.c")
    parser.add_argument("dev", help="the device whose ingress traffic to filter")
    parser.add_argument("--netns", help="the device's network namespace (a name under /run/netns)")
    parser.add_argument("--backend", default="auto", help="auto (default), bpf_link or netlink")
    args = parser.parse_args(argv)

    send_request, requests = trio.open_memory_channel[str](0)
    replies, receive_reply = trio.open_memory_channel[str](0)

    async def read_commands() -> None:
        async with send_request:
            async for line in trio.wrap_file(sys.stdin):
                await send_request.send(line)

    async def print_replies() -> None:
        async for reply in receive_reply:
            print(reply, flush=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(print_replies)
        nursery.start_soon(read_commands)
        async with replies:
            await serve(args.object, args.dev, requests, replies, netns=args.netns, backend=args.backend)
        nursery.cancel_scope.cancel()  # `quit`: stop reading the input


if __name__ == "__main__":
    trio.run(main)
