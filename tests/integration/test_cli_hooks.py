"""The hook commands of `asynctc` on the real kernel, run as an operator runs them: one process per command,
each test in its own namespace, with a private bpffs for the pins. What they print is checked against the
kernel itself (BPF_PROG_QUERY) and against `tc -j`."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from asynctc import Program, programs
from asynctc.lowlevel import bpf
from asynctc.lowlevel.netns import NetnsRunner
from asynctc.testing import VethPair, run_without_capabilities, send_frames, tc

pytestmark = pytest.mark.kernel

BACKENDS = ["bpf_link", "netlink"]


def asynctc_cmd(*args: str, pin_dir: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    extra = ["--pin-dir", pin_dir] if pin_dir else []
    return subprocess.run([sys.executable, "-m", "asynctc.cli", *args, *extra], capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return json.loads(proc.stdout) if proc.stdout.startswith("{") else proc.stdout


def failed(proc: subprocess.CompletedProcess[str], text: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert text in proc.stderr, proc.stderr


def in_netns(netns: str, fn: Any, *args: Any) -> Any:
    runner = NetnsRunner(netns, trio.CapacityLimiter(1))
    try:
        return runner.call_in_netns(fn, *args)
    finally:
        runner.close()


def tcx_query(netns: str, dev: str) -> bpf.HookQuery:
    ifindex = in_netns(netns, socket.if_nametoindex, dev)
    query: bpf.HookQuery = in_netns(netns, bpf.prog_query, ifindex, bpf.BPF_TCX_INGRESS)
    return query


def tc_filters(netns: str, dev: str) -> list[dict[str, Any]]:
    """`tc -j filter show dev DEV ingress`, without the per-priority classifier heads and the u32 hash
    tables (`fh 800: ht divisor 1`): what asynctc lists, one row per filter added."""
    out = tc("-j", "filter", "show", "dev", dev, "ingress", netns=netns).stdout
    return [f for f in json.loads(out or "[]")
            if "options" in f and not (f["kind"] == "u32" and "ht_divisor" in f["options"])]


class Pins:
    """Programs loaded by the test and pinned on its bpffs, named by their pin paths."""

    def __init__(self, bpffs: str) -> None:
        self.bpffs = bpffs
        self.root = os.path.join(bpffs, "asynctc")
        self.programs: dict[str, Program] = {}

    def load(self, name: str, verdict: str = "pass") -> str:
        prog = programs.constant(verdict, name=name)  # type: ignore[arg-type]
        path = os.path.join(self.bpffs, name)
        bpf.obj_pin(prog.fd, path)
        self.programs[path] = prog
        return path

    def id(self, path: str) -> int:
        return self.programs[path].id

    def close(self) -> None:
        for p in self.programs.values():
            p.close()


@pytest.fixture
def pins(bpffs: str) -> Iterator[Pins]:
    p = Pins(bpffs)
    try:
        yield p
    finally:
        p.close()


def test_show_json_is_what_the_kernel_and_tc_say(veth: VethPair, pins: Pins) -> None:
    ns = veth.netns_a
    a, b, c = pins.load("show_a"), pins.load("show_b"), pins.load("show_c")
    ok(asynctc_cmd("attach", "veth0", "ingress", a, "--netns", ns, "--backend", "bpf_link", pin_dir=pins.root))
    ok(asynctc_cmd("attach", "veth0", "ingress", b, "--netns", ns, "--backend", "netlink", pin_dir=pins.root))
    tc("filter", "add", "dev", "veth0", "ingress", "prio", "7", "u32", "match", "u32", "0", "0", netns=ns)
    ok(asynctc_cmd("attach", "veth0", "ingress", c, "--netns", ns, "--backend", "netlink", "--position", "first",
                   pin_dir=pins.root))

    report = ok(asynctc_cmd("show", "--netns", ns, "--json", pin_dir=pins.root))
    # Only the hooks that have something on them, when no device is named.
    assert [(h["dev"], h["direction"]) for h in report["hooks"]] == [("veth0", "ingress")]
    hook = report["hooks"][0]
    entries = hook["entries"]
    kernel = tcx_query(ns, "veth0")
    assert hook["revision"] == kernel.revision
    tcx = [e for e in entries if e["kind"] == "tcx"]
    assert entries[:len(tcx)] == tcx  # tcx runs first
    assert [e["prog_id"] for e in tcx] == list(kernel.prog_ids) == [pins.id(a)]
    assert [e["link_id"] for e in tcx] == list(kernel.link_ids)
    assert tcx[0]["owner"] == "asynctc" and tcx[0]["owned"] is True
    assert tcx[0]["pinned"] and os.path.dirname(tcx[0]["pinned"]) == os.path.join(pins.root, "asynctc")

    def tc_row(f: dict[str, Any]) -> tuple[object, ...]:
        o = f["options"]
        if f["kind"] == "bpf":
            return (f["pref"], "cls_bpf", o["handle"], o["prog"]["id"])
        return (f["pref"], f["kind"], o["fh"], None)

    filters = [e for e in entries if e["kind"] != "tcx"]
    assert [(e["priority"], e["kind"], e["handle_tc"], e["prog_id"]) for e in filters] == [
        tc_row(f) for f in tc_filters(ns, "veth0")]
    assert [e["prog_id"] for e in filters if e["kind"] == "cls_bpf"] == [pins.id(c), pins.id(b)]
    assert {e["parent"] for e in filters} == {"ffff:fff2"}
    for e in filters:
        if e["kind"] == "u32":
            assert e["owner"] is None and e["owned"] is False and e["pinned"] is None
        else:
            assert e["owner"] == "asynctc" and e["owned"] is True and os.path.exists(e["pinned"])

    text = ok(asynctc_cmd("show", "veth0", "ingress", "--netns", ns, pin_dir=pins.root))
    lines = text.splitlines()
    assert lines[0] == f"veth0({in_netns(ns, socket.if_nametoindex, 'veth0')}) ingress revision {kernel.revision}:"
    assert lines[1].startswith(f"\ttcx link {kernel.link_ids[0]} prog_id {pins.id(a)} show_a ")
    assert "\tfilter parent ffff:fff2 prio 7 u32 handle 800::800 foreign" in lines
    assert len([line for line in lines if " u32 " in line]) == 1  # the filter's key; its table 800: is no entry


def test_show_of_an_empty_hook_and_of_a_missing_device(netns: str) -> None:
    report = ok(asynctc_cmd("show", "lo", "egress", "--netns", netns, "--json"))
    assert report["hooks"] == [{"dev": "lo", "ifindex": 1, "direction": "egress", "revision": 1, "entries": []}]
    assert ok(asynctc_cmd("show", "--netns", netns, "--json"))["hooks"] == []
    failed(asynctc_cmd("show", "nosuch0", "--netns", netns), "DeviceNotFound: no device named 'nosuch0'")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attach_then_detach_from_a_later_process(veth: VethPair, pins: Pins, backend: str) -> None:
    ns = veth.netns_a
    prog = pins.load("cli_attach")
    att = ok(asynctc_cmd("attach", "veth0", "ingress", prog, "--netns", ns, "--backend", backend, "--json",
                         pin_dir=pins.root))["attached"]
    assert att["backend"] == backend and att["prog_id"] == pins.id(prog) and att["state"] == "attached"
    pin = Path(att["pinned"])
    # The attachment outlived the command that made it, held by its pin in an owner-only directory.
    assert pin.parent == Path(pins.root, "asynctc")
    for d in (pin.parent.parent, pin.parent):
        st = d.lstat()
        assert stat.S_ISDIR(st.st_mode) and st.st_mode & 0o777 == 0o700 and st.st_uid == 0
    if backend == "bpf_link":
        assert tcx_query(ns, "veth0").link_ids == (att["link_id"],)
    else:
        assert [f["options"]["prog"]["id"] for f in tc_filters(ns, "veth0")] == [pins.id(prog)]

    gone = ok(asynctc_cmd("detach", "veth0", "ingress", f"id:{pins.id(prog)}", "--netns", ns, "--json",
                          pin_dir=pins.root))["detached"]
    assert gone["prog_id"] == pins.id(prog) and gone["state"] == "detached"
    assert tcx_query(ns, "veth0").prog_ids == ()
    assert tc_filters(ns, "veth0") == []
    assert not pin.exists() and not Path(f"{pin}_record").exists()
    failed(asynctc_cmd("detach", "veth0", "ingress", prog, "--netns", ns, pin_dir=pins.root),
           f"program {pins.id(prog)} is not on veth0 ingress")


@pytest.mark.parametrize(("backend", "method"), [("bpf_link", "link_update"), ("netlink", "netlink_replace")])
def test_update_then_detach_by_the_new_program(veth: VethPair, pins: Pins, backend: str, method: str) -> None:
    ns = veth.netns_a
    old, new, other = pins.load("cli_old"), pins.load("cli_new"), pins.load("cli_other")
    ok(asynctc_cmd("attach", "veth0", "ingress", old, "--netns", ns, "--backend", backend, pin_dir=pins.root))
    failed(asynctc_cmd("update", "veth0", "ingress", other, new, "--netns", ns, pin_dir=pins.root),
           f"program {pins.id(other)} is not on veth0 ingress")
    done = ok(asynctc_cmd("update", "veth0", "ingress", old, new, "--netns", ns, "--json", pin_dir=pins.root))
    assert done["method"] == method and done["old_prog_id"] == pins.id(old)
    assert done["updated"]["prog_id"] == pins.id(new)
    hook = ok(asynctc_cmd("show", "veth0", "ingress", "--netns", ns, "--json", pin_dir=pins.root))["hooks"][0]
    assert [e["prog_id"] for e in hook["entries"]] == [pins.id(new)]
    ok(asynctc_cmd("detach", "veth0", "ingress", new, "--netns", ns, pin_dir=pins.root))
    assert tcx_query(ns, "veth0").prog_ids == () and tc_filters(ns, "veth0") == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_moving_the_pin_then_adopt_and_unpin(veth: VethPair, pins: Pins, backend: str) -> None:
    ns = veth.netns_a
    prog = pins.load("cli_pin")
    first = ok(asynctc_cmd("attach", "veth0", "ingress", prog, "--netns", ns, "--backend", backend, "--json",
                           pin_dir=pins.root))["attached"]["pinned"]
    mine = os.path.join(pins.bpffs, "mine")
    moved = ok(asynctc_cmd("pin", "veth0", "ingress", prog, mine, "--netns", ns, "--json", pin_dir=pins.root))
    assert moved["previous_pin"] == first and moved["pinned"]["pinned"] == mine
    assert not os.path.exists(first) and os.path.exists(mine)
    adopted = ok(asynctc_cmd("adopt", mine, "--netns", ns, "--json"))["adopted"]
    assert adopted["prog_id"] == pins.id(prog) and adopted["pinned"] == mine and adopted["backend"] == backend
    # Pinned outside the default directory, it is found only through its pin.
    failed(asynctc_cmd("detach", "veth0", "ingress", prog, "--netns", ns, pin_dir=pins.root),
           "pass --pin PATH")
    out = ok(asynctc_cmd("unpin", mine, "--netns", ns, "--json"))
    assert out["unpinned"] == mine and out["detached"]["prog_id"] == pins.id(prog)
    assert not os.path.exists(mine)
    assert tcx_query(ns, "veth0").prog_ids == () and tc_filters(ns, "veth0") == []


def test_detach_through_an_explicit_pin(veth: VethPair, pins: Pins) -> None:
    ns = veth.netns_a
    prog, other = pins.load("cli_explicit"), pins.load("cli_notthere")
    mine = os.path.join(pins.bpffs, "explicit")
    ok(asynctc_cmd("attach", "veth0", "ingress", prog, "--netns", ns, "--pin", mine))
    failed(asynctc_cmd("detach", "veth0", "ingress", other, "--netns", ns, "--pin", mine),
           f"NotOwned: the attachment pinned at {mine} is prog_id {pins.id(prog)} on veth0 ingress")
    ok(asynctc_cmd("detach", "veth0", "ingress", prog, "--netns", ns, "--pin", mine))
    assert tcx_query(ns, "veth0").prog_ids == () and not os.path.exists(mine)


ATTACH_AND_STAY = """
import os, sys, trio, asynctc
async def main():
    async with asynctc.open_session("netlink", netns={ns!r}) as s:
        prog = asynctc.Program.from_pinned({prog!r})
        await s.attach("veth0", "ingress", prog)
        print("attached", flush=True)
        if {die!r}:
            os._exit(0)  # no cleanup: the filter stays, an orphan with this owner's tag
        await trio.to_thread.run_sync(sys.stdin.read)
trio.run(main)
"""


def test_detach_finds_a_filter_by_its_owner_tag(veth: VethPair, pins: Pins) -> None:
    ns = veth.netns_a
    prog = pins.load("cli_tagged")
    live = subprocess.Popen([sys.executable, "-c", ATTACH_AND_STAY.format(ns=ns, prog=prog, die=False)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, live.kill)  # a deadline for the blocking reads below
    watchdog.start()
    try:
        assert live.stdout is not None and live.stdin is not None
        assert live.stdout.readline() == "attached\n"
        # A live process's filter is its own business.
        failed(asynctc_cmd("detach", "veth0", "ingress", prog, "--netns", ns, pin_dir=pins.root),
               f"belongs to the live process {live.pid}")
        assert len(tc_filters(ns, "veth0")) == 1
        live.stdin.close()
        assert live.wait(timeout=60) == 0
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
        if live.stdout is not None:
            live.stdout.close()
        watchdog.cancel()
    assert tc_filters(ns, "veth0") == []
    orphaned = subprocess.run([sys.executable, "-c", ATTACH_AND_STAY.format(ns=ns, prog=prog, die=True)],
                              capture_output=True, text=True, timeout=60)
    assert orphaned.stdout == "attached\n", orphaned.stderr
    assert len(tc_filters(ns, "veth0")) == 1
    # Only detach removes an orphan: update and pin leave the hook as it is and say why.
    other = pins.load("cli_other")
    failed(asynctc_cmd("update", "veth0", "ingress", prog, other, "--netns", ns, pin_dir=pins.root),
           "is an orphaned filter of the dead process")
    failed(asynctc_cmd("pin", "veth0", "ingress", prog, os.path.join(pins.bpffs, "orphan"), "--netns", ns,
                       pin_dir=pins.root), "is an orphaned filter of the dead process")
    assert [f["options"]["prog"]["id"] for f in tc_filters(ns, "veth0")] == [pins.id(prog)]
    out = ok(asynctc_cmd("detach", "veth0", "ingress", prog, "--netns", ns, pin_dir=pins.root))
    assert f"detached orphaned filter cli_tagged prog_id {pins.id(prog)} on veth0 ingress prio 32768 handle 0x1" in out
    assert tc_filters(ns, "veth0") == []


def test_foreign_programs_are_left_alone(veth: VethPair, pins: Pins) -> None:
    ns = veth.netns_a
    prog = pins.programs[pins.load("cli_foreign")]
    ifindex = in_netns(ns, socket.if_nametoindex, "veth0")
    link = in_netns(ns, bpf.link_create_tcx, prog.fd, ifindex, bpf.BPF_TCX_INGRESS)
    try:
        failed(asynctc_cmd("detach", "veth0", "ingress", f"id:{prog.id}", "--netns", ns, pin_dir=pins.root),
               "it is foreign and left alone")
        report = ok(asynctc_cmd("show", "--netns", ns, "--json", pin_dir=pins.root))
        (entry,) = report["hooks"][0]["entries"]
        assert entry["prog_id"] == prog.id and entry["owner"] is None and entry["owned"] is False
        assert tcx_query(ns, "veth0").prog_ids == (prog.id,)
    finally:
        os.close(link)


def test_an_unsafe_pin_directory_is_refused_and_nothing_stays(veth: VethPair, pins: Pins) -> None:
    ns = veth.netns_a
    prog = pins.load("cli_unsafe")
    os.mkdir(pins.root)
    os.chmod(pins.root, 0o777)
    failed(asynctc_cmd("attach", "veth0", "ingress", prog, "--netns", ns, pin_dir=pins.root),
           "others can write to it (mode 0777)")
    assert tcx_query(ns, "veth0").prog_ids == ()
    os.rmdir(pins.root)
    os.symlink(pins.bpffs, pins.root)
    failed(asynctc_cmd("attach", "veth0", "ingress", prog, "--netns", ns, "--backend", "netlink",
                       pin_dir=pins.root), "is a symbolic link")
    assert tc_filters(ns, "veth0") == []
    # Hooks are still shown from an untrusted pin directory, without pins, saying why.
    tc("qdisc", "add", "dev", "veth0", "clsact", netns=ns)
    tc("filter", "add", "dev", "veth0", "ingress", "prio", "7", "u32", "match", "u32", "0", "0", netns=ns)
    shown = asynctc_cmd("show", "--netns", ns, "--json", pin_dir=pins.root)
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.splitlines() == [
        f"asynctc show: warning: pins not shown: refusing pin directory {pins.root}: it is a symbolic link "
        "(remove it, or pass --pin-dir)"]
    assert {e["kind"] for e in json.loads(shown.stdout)["hooks"][0]["entries"]} == {"u32"}


def test_bad_requests_fail_in_one_line(veth: VethPair, pins: Pins) -> None:
    ns = veth.netns_a
    prog = pins.load("cli_bad")
    failed(asynctc_cmd("attach", "nosuch0", "ingress", prog, "--netns", ns, pin_dir=pins.root),
           "DeviceNotFound: no device named 'nosuch0'")
    failed(asynctc_cmd("attach", "veth0", "ingress", os.path.join(pins.bpffs, "nothing"), "--netns", ns,
                       pin_dir=pins.root), "asynctc attach: ")
    failed(asynctc_cmd("attach", "veth0", "ingress", "id:4294967295", "--netns", ns, pin_dir=pins.root),
           "asynctc attach: ")
    failed(asynctc_cmd("attach", "veth0", "ingress", prog, "--netns", ns, "--position", "before:4294967295",
                       pin_dir=pins.root), "asynctc attach: ")
    failed(asynctc_cmd("adopt", os.path.join(pins.bpffs, "nothing"), "--netns", ns), "asynctc adopt: ")
    assert tcx_query(ns, "veth0").prog_ids == () and tc_filters(ns, "veth0") == []


def test_unprivileged_commands_fail_in_one_line(netns: str) -> None:
    for args in (["show"], ["attach", "lo", "ingress", "id:1"], ["reap"], ["backends"]):
        code = f"import sys; from asynctc.cli import main; sys.exit(main({[*args, '--netns', netns]!r}))"
        proc = run_without_capabilities(code, timeout=120)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and "asynctc " in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_show_stats_counts_runs(veth: VethPair, pins: Pins) -> None:
    ns = veth.netns_a
    prog = pins.load("cli_stats")
    ok(asynctc_cmd("attach", "veth0", "ingress", prog, "--netns", ns, pin_dir=pins.root))
    proc = subprocess.Popen([sys.executable, "-m", "asynctc.cli", "show", "veth0", "ingress", "--netns", ns,
                             "--stats", "--stats-interval", "3", "--json", "--pin-dir", pins.root],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            send_frames(veth.b, 20, netns=veth.netns_b)  # traffic while the statistics are on
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    (entry,) = json.loads(out)["hooks"][0]["entries"]
    assert entry["prog_id"] == pins.id(prog)
    assert entry["run_cnt"] > 0 and entry["run_time_ns"] > 0
    text = ok(asynctc_cmd("show", "veth0", "ingress", "--netns", ns, "--stats", "--stats-interval", "0.1",
                          pin_dir=pins.root))
    assert " run_cnt " in text and " avg_ns " in text


def test_reap_reports_what_it_removed(veth: VethPair, pins: Pins) -> None:
    ns = veth.netns_a
    prog = pins.load("cli_reap")
    orphaned = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(ATTACH_AND_STAY.format(ns=ns, prog=prog, die=True))],
        capture_output=True, text=True, timeout=60)
    assert orphaned.stdout == "attached\n", orphaned.stderr
    assert ok(asynctc_cmd("reap", "--netns", ns, "--owner", "someone-else", "--json")) == {"reaped": []}
    assert len(tc_filters(ns, "veth0")) == 1
    reaped = ok(asynctc_cmd("reap", "--netns", ns, "--json"))["reaped"]
    assert [(e["prog_id"], e["kind"], e["priority"]) for e in reaped] == [(pins.id(prog), "cls_bpf", 32768)]
    assert tc_filters(ns, "veth0") == []


def test_positions_place_programs_in_run_order(veth: VethPair, pins: Pins) -> None:
    ns = veth.netns_a
    a, b, c = pins.load("pos_a"), pins.load("pos_b"), pins.load("pos_c")
    ok(asynctc_cmd("attach", "veth0", "ingress", a, "--netns", ns, "--backend", "bpf_link", pin_dir=pins.root))
    ok(asynctc_cmd("attach", "veth0", "ingress", b, "--netns", ns, "--backend", "bpf_link", "--position", "first",
                   pin_dir=pins.root))
    ok(asynctc_cmd("attach", "veth0", "ingress", c, "--netns", ns, "--backend", "bpf_link", "--position",
                   f"after:{pins.id(b)}", pin_dir=pins.root))
    assert tcx_query(ns, "veth0").prog_ids == (pins.id(b), pins.id(c), pins.id(a))
    failed(asynctc_cmd("attach", "veth0", "ingress", pins.load("pos_d"), "--netns", ns, "--backend", "bpf_link",
                       "--position", "before:4000000000", pin_dir=pins.root), "asynctc attach: AnchorNotFound: ")
    assert tcx_query(ns, "veth0").prog_ids == (pins.id(b), pins.id(c), pins.id(a))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attach_a_compiled_object_with_its_sections_direction(
    veth: VethPair, pins: Pins, backend: str, bpf_objects: dict[str, Path]
) -> None:
    """`asynctc attach DEV auto OBJECT.o:NAME`: the program is loaded from the object and attached to the
    direction its section names (tcx/egress); a direction that contradicts the section is refused."""
    ns = veth.netns_a
    obj = bpf_objects["objects"]
    bad = asynctc_cmd("attach", "veth0", "ingress", f"{obj}:count_egress", "--netns", ns, "--backend", backend,
                      pin_dir=pins.root)
    assert bad.returncode == 2 and "tcx/egress program" in bad.stderr and "Traceback" not in bad.stderr
    att = ok(asynctc_cmd("attach", "veth0", "auto", f"{obj}:count_egress", "--netns", ns, "--backend", backend,
                         "--json", pin_dir=pins.root))["attached"]
    assert att["direction"] == "egress" and att["backend"] == backend
    gone = ok(asynctc_cmd("detach", "veth0", "egress", f"id:{att['prog_id']}", "--netns", ns, "--json",
                          pin_dir=pins.root))["detached"]
    assert gone["prog_id"] == att["prog_id"]
