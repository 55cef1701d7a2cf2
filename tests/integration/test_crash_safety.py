"""Crash safety of pinned attachments, proven with SIGKILL on the real kernel.

The contract: a SIGKILL at any instant of any operation on a pinned attachment leaves it either as it was
or as it was asked to become, adoptable either way (or an orphan that `reap_orphans` removes); never an
empty hook while it is pinned, never a pin naming nothing. For each backend and each pinned operation
(attach+pin, update in place, update by make-before-break, unpin, detach) a child process performs the
operation and is killed with SIGKILL:

- at every step boundary: the child stops right before its N-th kernel-changing call (a bpf(2) command, a
  rename or unlink in bpffs, a tc change over rtnetlink), says so, and is killed there; N runs over every
  step of the operation and the instant after its last;
- at seeded random instants within the operation, which land inside those calls as well.

After each kill this process reads the kernel directly (BPF_PROG_QUERY of the hook, `tc -j filter show`,
the pins in bpffs), checks the state, then adopts the pin (or reaps the orphan) and checks again.

The children are forked from one Python process that has imported asynctc once (a fork costs milliseconds,
an interpreter start with asynctc's imports most of a second), so each case affords many kills. The
default is KILLS random kills per case; ASYNCTC_CRASH_KILLS=N runs N (hundreds for a long run).

Each test has its own namespace and its own bpffs mount, both removed afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from _children import CHILD_TIMEOUT, readline, stop

import asynctc
from asynctc import programs
from asynctc.lowlevel import bpf
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.testing import VethPair

pytestmark = pytest.mark.kernel

OWNER = "crash"
DEV = "veth0"
NEXT = "_asynctc_next"
RECORD = "_record"
KILLS = int(os.environ.get("ASYNCTC_CRASH_KILLS", "12"))
SEED = int(os.environ.get("ASYNCTC_CRASH_SEED", "20261201"))
SETTLE = 10.0  # seconds the kernel may take to release what a killed process held (deferred work)

# The process the children are forked from: it imports asynctc (no thread is started by that), then forks
# one child per request line (JSON) on stdin. The child performs the operation and reports on fd 1:
# "go OLD NEW" when it starts, "step N NAME" before each kernel-changing call, "paused N NAME" when it
# stops there (the request's stop_at), "done SECONDS METHOD" after the operation; then it waits to be
# killed. The forker reports "pid PID" and, once the child died, "exit PID STATUS".
FORKER = textwrap.dedent("""
    import json, os, sys, threading, time, traceback
    import trio
    import asynctc
    from asynctc import programs
    from asynctc.lowlevel import bpf, transport

    def emit(line):
        os.write(1, (line + "\\n").encode())

    NL_CHANGES = {"filter_add", "filter_add_hw", "filter_replace", "filter_replace_hw", "filter_delete",
                  "clsact_add", "qdisc_delete"}

    def child(cfg):
        armed = []
        steps = []

        def boundary(name):
            if not armed:
                return
            i = len(steps)
            steps.append(name)
            emit(f"step {i} {name}")
            if i == cfg["stop_at"]:
                emit(f"paused {i} {name}")
                while True:
                    time.sleep(3600)

        def wrap(mod, attr, when=lambda a, k: True):
            orig = getattr(mod, attr)
            def wrapped(*a, **k):
                if when(a, k):
                    boundary(f"{attr}")
                return orig(*a, **k)
            setattr(mod, attr, wrapped)

        for attr in ("link_create_tcx", "link_update", "link_detach", "obj_pin", "map_update"):
            wrap(bpf, attr)  # the module's functions (what lowlevel.pins calls)
            wrap(bpf.LINUX, attr)  # the real kernel's calls (what the backends call, through ctx.kernel)
        wrap(os, "rename", lambda a, k: "src_dir_fd" in k)
        wrap(os, "unlink", lambda a, k: "dir_fd" in k)
        orig_request = transport.NetlinkTransport.request
        async def request(self, msg, *, op="netlink", **k):
            if op in NL_CHANGES:
                boundary(op)
            return await orig_request(self, msg, op=op, **k)
        transport.NetlinkTransport.request = request
        if cfg["op"] == "mbb":
            def refuse(*a, **k):
                raise bpf.BpfError(22, "link_update")  # EINVAL: a kernel refusing in-place updates
            bpf.link_update = bpf.LINUX.link_update = refuse

        async def main():
            async with asynctc.open_session(cfg["backend"], netns=cfg["netns"], owner=cfg["owner"]) as s:
                op, path = cfg["op"], cfg["path"]
                prog = None
                if op == "attach_pin":
                    prog = programs.constant("pass")
                    old, new = 0, prog.id
                else:
                    att = await s.adopt_pinned(path)
                    old, new = att.info.prog_id, 0
                    if op in ("update", "mbb"):
                        prog = programs.constant("pass")
                        new = prog.id
                emit(f"go {old} {new}")
                armed.append(True)
                t0 = time.perf_counter()
                method = "-"
                if op == "attach_pin":
                    att = await s.attach(cfg["dev"], "ingress", prog)
                    await att.pin(path)
                elif op in ("update", "mbb"):
                    method = (await att.update(prog)).method
                elif op == "unpin":
                    await att.unpin()
                elif op == "detach":
                    await att.detach()
                took = time.perf_counter() - t0
                armed.clear()
                emit(f"done {took:.6f} {method}")
                while True:
                    time.sleep(3600)

        trio.run(main)

    assert threading.active_count() == 1, "importing asynctc started a thread: forking would be unsafe"
    emit("ready")
    for line in sys.stdin:
        cfg = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(cfg)
            except BaseException:
                emit("error " + json.dumps(traceback.format_exc()))
            os._exit(1)
        emit(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        emit(f"exit {pid} {status}")
""")


@dataclass
class Round:
    """What one child reported."""

    old: int = 0
    new: int = 0
    steps: list[str] = field(default_factory=list)
    paused: str | None = None
    done: bool = False
    took: float = 0.0
    method: str = "-"
    status: int | None = None


class Forker:
    """The forking parent of the children (see FORKER)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", FORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = readline(self.proc.stdout, CHILD_TIMEOUT)
        if not line:
            raise AssertionError("the forking parent of the children died")
        if line.startswith("error "):
            raise AssertionError("a child failed:\n" + json.loads(line[6:]))
        return line.rstrip("\n")

    def run(self, cfg: dict[str, Any], *, stop_at: int = -1, delay: float | None = None) -> Round:
        """Fork a child for `cfg` and SIGKILL it: at step `stop_at` (or after the operation when there are
        fewer steps), after `delay` seconds from its start, or (neither) once the operation is done."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({**cfg, "stop_at": stop_at}) + "\n")
        self.proc.stdin.flush()
        r = Round()
        pidfd: int | None = None
        try:
            while True:  # until the child starts the operation
                line = self._line()
                if line.startswith("pid "):
                    pidfd = os.pidfd_open(int(line.split()[1]))
                elif line.startswith("go "):
                    r.old, r.new = map(int, line.split()[1:])
                    break
                else:
                    raise AssertionError(f"unexpected line from the child before it started: {line!r}")
            if pidfd is None:
                line = self._line()
                assert line.startswith("pid "), line
                pidfd = os.pidfd_open(int(line.split()[1]))
            if delay is not None:
                time.sleep(delay)
            else:
                while True:
                    line = self._line()
                    if line.startswith("step "):
                        r.steps.append(line.split()[2])
                    elif line.startswith("paused "):
                        r.paused = line.split()[2]
                        break
                    elif line.startswith("done "):
                        _, took, r.method = line.split()
                        r.took, r.done = float(took), True
                        break
                    else:
                        raise AssertionError(f"unexpected line from the child: {line!r}")
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            while True:  # until the forker reaped it
                line = self._line()
                if line.startswith("step "):
                    r.steps.append(line.split()[2])
                elif line.startswith("done "):
                    _, took, r.method = line.split()
                    r.took, r.done = float(took), True
                elif line.startswith("exit "):
                    r.status = int(line.split()[2])
                    break
        finally:
            if pidfd is not None:
                os.close(pidfd)
        assert os.WIFSIGNALED(r.status) and os.WTERMSIG(r.status) == signal.SIGKILL, \
            f"the child did not die of SIGKILL (status {r.status})"
        return r

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        stop(self.proc)


@pytest.fixture
def forker() -> Iterator[Forker]:
    f = Forker()
    try:
        yield f
    finally:
        f.close()


# -- the kernel's view ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pinned:
    kind: str  # "link", "prog", "map"
    id: int  # link id, prog id, map id
    prog_id: int  # a link's program, a prog's own id, 0 for a map
    ifindex: int  # a link's device (0: severed), else 0


def read_pin(path: str) -> Pinned | None:
    try:
        fd = bpf.obj_get(path)
    except bpf.BpfError:
        return None
    try:
        kind = bpf.fd_object_kind(fd)
        if kind == "link":
            info = bpf.link_info(fd)
            return Pinned("link", info.id, info.prog_id, info.ifindex)
        if kind == "prog":
            pid = bpf.prog_info(fd).id
            return Pinned("prog", pid, pid, 0)
        return Pinned(kind, 0, 0, 0)
    finally:
        os.close(fd)


def bpffs_entries(root: str) -> set[str]:
    return {name for name in os.listdir(root) if not name.endswith(".debug")}


@dataclass(frozen=True)
class Filter:
    prio: int
    name: str
    prog_id: int

    @property
    def pinned(self) -> bool:
        return self.name.endswith(":pinned")


class Kernel:
    """Direct reads of the test namespace's kernel state."""

    def __init__(self, netns: str, bpffs: str, ifindex: int) -> None:
        self.netns = netns
        self.path = os.path.join(bpffs, "crash")
        self.bpffs = bpffs
        self.ifindex = ifindex
        self.runner = NetnsRunner(netns, trio.CapacityLimiter(1))

    def tcx_links(self) -> list[tuple[int, int]]:
        """(link id, program id) of each tcx program on the device's ingress, in run order."""
        q = self.runner.call_in_netns(bpf.prog_query, self.ifindex, bpf.BPF_TCX_INGRESS)
        return list(zip(q.link_ids, q.prog_ids, strict=True))

    def filters(self) -> list[Filter]:
        """Every filter with options on the device's ingress (`tc -j filter show`)."""
        proc = subprocess.run(["tc", "-n", self.netns, "-j", "filter", "show", "dev", DEV, "ingress"],
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT)
        if proc.returncode != 0:
            assert "Cannot find specified qdisc" in proc.stderr or not proc.stdout.strip(), proc.stderr
            return []
        out = []
        for f in json.loads(proc.stdout or "[]"):
            opts = f.get("options")
            if opts is None:
                continue
            out.append(Filter(f["pref"], opts.get("bpf_name", f["kind"]), opts.get("prog", {}).get("id", 0)))
        return out

    def pins(self) -> tuple[Pinned | None, Pinned | None, Pinned | None]:
        """What is pinned at the path, beside it while an update moves it, and at its record."""
        return read_pin(self.path), read_pin(self.path + NEXT), read_pin(self.path + RECORD)

    def settle(self, done: Callable[[], bool], what: str) -> None:
        """Wait (bounded) until `done()`: the kernel releases what a killed process held in deferred work."""
        deadline = time.monotonic() + SETTLE
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not so within {SETTLE}s")
            time.sleep(0.002)


# -- checks --------------------------------------------------------------------------------------------
OPS_PINNED_BEFORE = {"update", "mbb", "unpin", "detach"}


def allowed_programs(op: str, r: Round) -> set[int]:
    """The programs the hook may run after a kill: the old one or the one asked for."""
    if op == "attach_pin":
        return {r.new}
    if op in ("update", "mbb"):
        return {r.old, r.new}
    return {r.old}


def check_tcx(k: Kernel, op: str, r: Round, where: str) -> None:
    """bpf_link: the state right after the kill (once the kernel released the dead process's links)."""
    link, nxt, rec = k.pins()
    pinned_ids = {p.id for p in (link, nxt) if p is not None}
    k.settle(lambda: {lid for lid, _ in k.tcx_links()} <= pinned_ids,
             f"{where}: only pinned links stay on the hook after the kill")
    hook = k.tcx_links()
    if op in OPS_PINNED_BEFORE - {"unpin", "detach"}:
        assert link is not None, f"{where}: the pin of an attachment being updated vanished"
    if link is None:
        assert nxt is None, f"{where}: a {NEXT} pin without the pin it replaces: {nxt}"
        assert hook == [], f"{where}: nothing is pinned, yet the hook runs {hook}"
        return
    assert link.kind == "link", f"{where}: the pin names a {link.kind}"
    assert link.ifindex == k.ifindex, f"{where}: the pin names a detached link {link}"
    assert link.prog_id in allowed_programs(op, r), f"{where}: the pinned link runs {link.prog_id}, {r}"
    assert rec is not None and rec.kind == "map", f"{where}: a pinned link without its record"
    expected = {link.id} | ({nxt.id} if nxt is not None else set())
    assert {lid for lid, _ in hook} == expected, f"{where}: the hook {hook} is not the pinned links {expected}"
    if nxt is not None:
        assert op == "mbb" and nxt.prog_id == r.new and nxt.ifindex == k.ifindex, f"{where}: {nxt}, {r}"


def check_filters(k: Kernel, op: str, r: Round, where: str) -> None:
    """netlink: the state right after the kill."""
    prog, nxt, rec = k.pins()
    filters = k.filters()
    assert len(filters) <= 1, f"{where}: more than one filter on the hook: {filters}"
    f = filters[0] if filters else None
    if f is not None:
        assert f.name.startswith(f"asynctc:{OWNER}:"), f"{where}: {f}"
        assert f.prog_id in allowed_programs(op, r), f"{where}: the filter runs {f.prog_id}, {r}"
        if f.pinned:
            assert prog is not None and rec is not None, f"{where}: a filter marked pinned without its pin: {f}"
    if op in ("update", "mbb"):
        assert f is not None and f.pinned, f"{where}: the filter of a pinned attachment being updated: {f}"
    if prog is not None:
        assert rec is not None, f"{where}: a pinned program without asynctc's record beside it"
        assert prog.kind == "prog" and prog.prog_id in allowed_programs(op, r) | {r.old}, f"{where}: {prog}"
        assert f is not None, f"{where}: a pin naming nothing: no filter on the hook, pinned {prog}"
    if nxt is not None:
        assert op == "update" and prog is not None, f"{where}: a stray {NEXT} pin {nxt}"


async def after_kill(k: Kernel, backend: str, op: str, r: Round, where: str) -> bool:
    """Check the state after a kill, adopt or reap, check again, and leave the next round's starting
    state: a pinned attachment (for the operations on one) or nothing. Returns whether it was adopted."""
    async with asynctc.open_session(backend, netns=k.netns, owner=OWNER) as s:
        att: asynctc.Attachment | None = None
        link, nxt, rec = k.pins()
        if link is not None or rec is not None:
            try:
                att = await s.adopt_pinned(k.path)
            except (asynctc.PinError, asynctc.Severed) as exc:
                # Only a pin the operation was removing, or had not finished making, may be found stale.
                stale_ok = (op in ("attach_pin", "unpin", "detach") and
                            (link is None or (backend == "netlink" and not k.filters())))
                if not stale_ok:
                    raise AssertionError(f"{where}: adopting the pin failed: {exc!r}") from exc
        reaped = await s.reap_orphans()
        entries = bpffs_entries(k.bpffs)
        assert not any(e.endswith(NEXT) for e in entries), f"{where}: a {NEXT} pin is left: {entries}"
        if att is None:
            assert entries == set(), f"{where}: pins left without an attachment: {entries}"
            if backend == "bpf_link":
                assert k.tcx_links() == [], f"{where}: the hook runs {k.tcx_links()} with nothing pinned"
            assert k.filters() == [], f"{where}: filters left after reaping {reaped}: {k.filters()}"
        else:
            assert att.info.prog_id in allowed_programs(op, r), f"{where}: adopted {att.info}, {r}"
            link, nxt, rec = k.pins()
            assert nxt is None and rec is not None, f"{where}: after adoption: {link}, {nxt}, {rec}"
            if backend == "bpf_link":
                assert link is not None and link.id == att.info.link_id
                k.settle(lambda: k.tcx_links() == [(att.info.link_id, att.info.prog_id)],
                         f"{where}: the hook runs only the adopted link")
            else:
                assert link is not None and link.prog_id == att.info.prog_id, f"{where}: {link} {att.info}"
                assert [(f.prog_id, f.pinned) for f in k.filters()] == [(att.info.prog_id, True)], \
                    f"{where}: the hook holds {k.filters()}, adopted {att.info}"
        # The next round's starting state.
        if op == "attach_pin":
            if att is not None:
                await att.detach()
            assert bpffs_entries(k.bpffs) == set()
            assert k.filters() == [] and (backend != "bpf_link" or k.tcx_links() == [])
        elif att is None:
            fresh = await s.attach(DEV, "ingress", programs.constant("pass"))
            await fresh.pin(k.path)
        return att is not None


async def clean_up(k: Kernel, backend: str) -> None:
    """Adopt whatever is pinned, detach it, reap; nothing may be left."""
    async with asynctc.open_session(backend, netns=k.netns, owner=OWNER) as s:
        if bpffs_entries(k.bpffs):
            att = await s.adopt_pinned(k.path)
            await att.detach()
        await s.reap_orphans()
    assert bpffs_entries(k.bpffs) == set()
    assert k.filters() == []
    if backend == "bpf_link":
        k.settle(lambda: k.tcx_links() == [], "the hook is empty after the cleanup")


CASES = [
    ("bpf_link", "attach_pin"), ("bpf_link", "update"), ("bpf_link", "mbb"), ("bpf_link", "unpin"),
    ("bpf_link", "detach"),
    ("netlink", "attach_pin"), ("netlink", "update"), ("netlink", "unpin"), ("netlink", "detach"),
]
METHODS = {"update": {"bpf_link": "link_update", "netlink": "netlink_replace"},
           "mbb": {"bpf_link": "make_before_break"}}


@pytest.mark.timeout(60 + KILLS)  # ~0.3 s a kill here; a long run (ASYNCTC_CRASH_KILLS) gets its time
@pytest.mark.parametrize(("backend", "op"), CASES, ids=[f"{b}-{o}" for b, o in CASES])
def test_sigkill_at_any_instant(veth: VethPair, netns: str, bpffs: str, forker: Forker, backend: str,
                                op: str) -> None:
    shown = subprocess.run(["ip", "-n", netns, "-j", "link", "show", DEV], capture_output=True, text=True,
                           timeout=CHILD_TIMEOUT, check=True)
    ifindex = int(json.loads(shown.stdout)[0]["ifindex"])
    k = Kernel(netns, bpffs, ifindex)
    check = check_tcx if backend == "bpf_link" else check_filters
    cfg = {"backend": backend, "netns": netns, "owner": OWNER, "path": k.path, "dev": DEV, "op": op}

    def one(where: str, **how: Any) -> Round:
        r = forker.run(cfg, **how)
        check(k, op, r, where)
        trio.run(after_kill, k, backend, op, r, where)
        return r

    if op in OPS_PINNED_BEFORE:  # the starting state: a pinned attachment
        trio.run(after_kill, k, backend, "update", Round(), "setup")
    # The whole operation, then a kill: its steps, how long it takes, and the state it leaves.
    full = one("after the operation")
    assert full.done and full.steps, full
    if op in METHODS:
        assert full.method == METHODS[op][backend], full
    # A kill at every step boundary.
    for i, step in enumerate(full.steps):
        r = one(f"killed before step {i} ({step}) of {full.steps}", stop_at=i)
        assert r.paused == step and not r.done, (r, full.steps)
    # Kills at seeded random instants within the operation (and a little after it). The window shrinks to
    # the shortest operation seen: a kill after the operation ended proves less than one within it.
    rng = random.Random(f"{SEED}-{backend}-{op}")
    took = full.took
    for n in range(KILLS):
        delay = rng.uniform(0, took * 1.2)
        r = one(f"killed {delay * 1e3:.3f} ms into the operation (kill {n}, seed {SEED})", delay=delay)
        if r.done:
            took = min(took, r.took)
    trio.run(clean_up, k, backend)



async def test_interrupted_update_is_finished_only_by_its_owner(veth: VethPair, netns: str, bpffs: str) -> None:
    """A make-before-break killed between pinning the new link beside the pin and renaming it over leaves
    both links attached. Adopting the pin finishes the rename, but only once ownership is proven: a session
    of another owner is refused and changes nothing."""
    path = os.path.join(bpffs, "crash")
    async with asynctc.open_session("bpf_link", netns=netns, owner=OWNER) as s:
        att = await s.attach(DEV, "ingress", programs.constant("pass"))
        await att.pin(path)
        old_link, ifindex = att.info.link_id, att.info.ifindex
        assert old_link is not None
    runner = NetnsRunner(netns, trio.CapacityLimiter(1))
    new = programs.constant("drop")

    def interrupted() -> int:  # what the killed update had done: the new link, named in the record as the
        # next one, pinned beside the pin
        from asynctc_bpf_link import RECORD_SUFFIX, read_record, rewrite_record

        fd = bpf.link_create_tcx(new.fd, ifindex, bpf.BPF_TCX_INGRESS, flags=bpf.BPF_F_BEFORE)
        try:
            link_id = bpf.link_info(fd).id
            record = read_record(path + RECORD_SUFFIX)
            assert record is not None
            rewrite_record(path + RECORD_SUFFIX, dataclasses.replace(record, next_link_id=link_id))
            bpf.obj_pin(fd, path + NEXT)
            return link_id
        finally:
            os.close(fd)

    new_link = await runner.run(interrupted)
    async with asynctc.open_session("bpf_link", netns=netns, owner="someone-else") as other:
        with pytest.raises(asynctc.NotOwned, match=f"belongs to owner '{OWNER}'"):
            await other.adopt_pinned(path)
    assert bpffs_entries(bpffs) == {"crash", "crash" + NEXT, "crash" + RECORD}
    assert read_pin(path) == Pinned("link", old_link, att.info.prog_id, ifindex)
    async with asynctc.open_session("bpf_link", netns=netns, owner=OWNER) as s:
        adopted = await s.adopt_pinned(path)
        assert (adopted.info.link_id, adopted.info.prog_id) == (new_link, new.id)
        assert bpffs_entries(bpffs) == {"crash", "crash" + RECORD}
        await adopted.detach()
    assert bpffs_entries(bpffs) == set()
    new.close()


@pytest.mark.parametrize("backend", ["bpf_link", "netlink"])
async def test_stale_record_is_removed_only_by_its_owner(veth: VethPair, netns: str, bpffs: str,
                                                          backend: str) -> None:
    """A record without its pin (a pin or unpin killed halfway) is removed by an adoption of its owner,
    which says so; a session of another owner leaves it in place."""
    path = os.path.join(bpffs, "crash")
    async with asynctc.open_session(backend, netns=netns, owner=OWNER) as s:
        att = await s.attach(DEV, "ingress", programs.constant("pass"))
        await att.pin(path)
    os.unlink(path)  # what the killed unpin had done: the pin is gone, its record not yet
    if backend == "netlink":
        subprocess.run(["tc", "-n", netns, "filter", "del", "dev", DEV, "ingress"], check=True,
                       capture_output=True, timeout=CHILD_TIMEOUT)
    async with asynctc.open_session(backend, netns=netns, owner="someone-else") as other:
        with pytest.raises(asynctc.TCError):
            await other.adopt_pinned(path)
    assert bpffs_entries(bpffs) == {"crash" + RECORD}
    async with asynctc.open_session(backend, netns=netns, owner=OWNER) as s:
        with pytest.raises(asynctc.PinError, match="stale record was removed"):
            await s.adopt_pinned(path)
    assert bpffs_entries(bpffs) == set()
