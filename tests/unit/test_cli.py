"""The `asynctc` command without the real kernel: errors, exit codes, tc's spellings, event lines, argument
parsing, the pin directory's safety checks, completion, and a closed stdout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from _children import run as run_child

import asynctc
from asynctc import Direction, cli
from asynctc import events as ev


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_child([sys.executable, "-m", "asynctc.cli", *args], timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert text in proc.stderr, proc.stderr


# -- the error a user sees ------------------------------------------------------------------------------


def test_reported_error_unwraps_nested_groups_and_skips_cancellations() -> None:
    err = asynctc.DeviceNotFound("no device named 'x'")
    cancelled = trio.Cancelled._create()
    group = BaseExceptionGroup("outer", [cancelled, ExceptionGroup("inner", [err, ValueError("later")])])
    assert cli.reported_error(group) is err
    assert cli.reported_error(err) is err
    only_cancelled = BaseExceptionGroup("g", [cancelled])
    assert cli.reported_error(only_cancelled) is cancelled


@pytest.mark.parametrize("args", [
    ("backends", "--netns", "nope-h13"),
    ("monitor", "--netns", "nope-h13"),
    ("show", "--netns", "nope-h13"),
    ("adopt", "/nonexistent/pin", "--netns", "nope-h13"),
])
def test_a_missing_namespace_is_one_line_and_exit_1(args: tuple[str, ...]) -> None:
    assert_one_line_error(run(*args), 1, "network namespace 'nope-h13' not found")


@pytest.mark.parametrize("args", [
    ("demo", "--backend", "foo"),
    ("show", "--backend", "foo"),
    ("monitor", "--backend", "foo"),
    ("attach", "lo", "ingress", "id:1", "--backend", "foo"),
])
def test_an_unknown_backend_is_bad_usage(args: tuple[str, ...]) -> None:
    assert_one_line_error(run(*args), 2, "no backend named 'foo' is installed (installed: ")


@pytest.mark.parametrize(("args", "text"), [
    (("frobnicate",), "invalid choice: 'frobnicate'"),
    (("attach", "lo", "sideways", "id:1"), "DIRECTION must be 'ingress' or 'egress'"),
    (("attach", "lo", "ingress", "id:x"), "PROGRAM id:N needs a program id"),
    (("attach", "lo", "ingress", "prog"), "PROGRAM must be id:N or the path of a pinned program"),
    (("detach", "lo", "ingress", "x.o:main"), "a compiled object loads a new program"),
    (("attach", "lo", "auto", "id:1"), "DIRECTION must be 'ingress' or 'egress'"),
    (("attach", "lo", "ingress", "id:1", "--position", "middle"), "--position must be first, last"),
    (("show", "--backend", "mock"), "in-memory kernel that lives inside one process"),
    (("show", "--stats-interval", "0"), "--stats-interval must be > 0"),
    (("completion", "fish"), "invalid choice: 'fish'"),
    (("detach", "lo"), "the following arguments are required"),
])
def test_bad_usage_is_one_line_and_exit_2(args: tuple[str, ...], text: str) -> None:
    assert_one_line_error(run(*args), 2, text)


def test_demo_on_the_mock_tells_the_whole_story() -> None:
    proc = run("demo", "--backend", "mock")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "backend: mock" in out
    assert "counted 10" in out
    assert "by link_update" in out
    assert "demo_v1 10, demo_v2 5" in out
    assert "now holds 0 program(s)" in out


def test_backends_lists_every_installed_backend_with_a_reason() -> None:
    proc = run("backends", "--json")
    report = json.loads(proc.stdout)
    rows = {r["backend"]: r for r in report["backends"]}
    assert {"mock", "bpf_link", "netlink"} <= set(rows)
    assert rows["mock"]["available"] is True and rows["mock"]["kernel"] == "mock"
    assert all(isinstance(r["reason"], str) and r["reason"] for r in rows.values())
    real = any(r["available"] for r in rows.values() if r["kernel"] != "mock")
    assert report["real_kernel_usable"] is real
    assert proc.returncode == (0 if real else 1), proc.stderr


@pytest.mark.parametrize("args", [("completion", "bash"), ("backends", "--json"), ("demo", "--backend", "mock")])
def test_a_closed_stdout_ends_quietly(args: tuple[str, ...]) -> None:
    r, w = os.pipe()
    os.close(r)  # nobody will ever read: the first write fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "asynctc.cli", *args], stdout=w, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(w)
    assert proc.returncode == 0
    assert proc.stderr == ""


@pytest.mark.parametrize(("netns", "code", "says"), [
    ("", 2, "netns must be a non-empty name or path"),
    ("/proc/self/ns/uts", 1, "is a uts namespace, not a network namespace"),
])
def test_a_bad_netns_is_one_line_never_a_traceback(netns: str, code: int, says: str) -> None:
    proc = run("backends", "--netns", netns)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- tc's spellings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("parent", "text"), [
    (0xFFFFFFF1, "ffff:fff1"), (0xFFFFFFF2, "ffff:fff2"), (0xFFFFFFF3, "ffff:fff3"), (0xFFFF0000, "ffff:"),
    (0x00010002, "1:2"), (0xFFFFFFFF, "root"),
])
def test_parents_are_written_as_tc_writes_them(parent: int, text: str) -> None:
    assert cli.tc_parent(parent) == text


@pytest.mark.parametrize(("kind", "handle", "text"), [
    ("bpf", 1, "0x1"), ("cls_bpf", 0x2A, "0x2a"), ("u32", 0x80000000, "800:"), ("u32", 0x80000800, "800::800"),
    ("u32", 0x80001800, "800:1:800"), ("u32", 1, ":1"),
])
def test_handles_are_written_as_tc_writes_them(kind: str, handle: int, text: str) -> None:
    assert cli.tc_handle(kind, handle) == text


# -- arguments --------------------------------------------------------------------------------------------


def test_program_specs() -> None:
    assert cli.parse_program("id:42") == cli.ProgramSpec("id:42", prog_id=42)
    assert cli.parse_program("/sys/fs/bpf/p") == cli.ProgramSpec("/sys/fs/bpf/p", path="/sys/fs/bpf/p")
    assert cli.parse_program("obj.o:main") == cli.ProgramSpec("obj.o:main", obj="obj.o:main")
    for bad in ("id:0", f"id:{2**32}", "id:-1", "name"):
        with pytest.raises(cli.UsageError):
            cli.parse_program(bad)


def test_positions() -> None:
    assert cli._position("first") == asynctc.First()
    assert cli._position("last") == asynctc.Last()
    assert cli._position("before:7") == asynctc.Before(7)
    assert cli._position("after:9") == asynctc.After(9)
    for bad in ("before:", "after:0", "before:x", "around:1", ""):
        with pytest.raises(cli.UsageError):
            cli._position(bad)


def test_every_subcommand_takes_netns_and_json() -> None:
    parser = cli.build_parser()
    words = cli._completion_words(parser)
    assert set(words) == {c.name for c in cli.SUBCOMMANDS}
    for name, opts in words.items():
        if name in ("demo", "stress", "completion"):
            continue  # the demo and stress make their own namespaces; completion prints a script
        assert {"--netns", "--json"} <= set(opts), name


# -- monitor lines ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (ev.DeviceAdded(7, "eth9"), "DeviceAdded      dev eth9 ifindex 7"),
        (ev.QdiscAdded(3, "clsact", 0xFFFF0000, 0xFFFFFFF1),
         "QdiscAdded       dev veth0 ifindex 3 qdisc clsact handle ffff: parent ffff:fff1"),
        (ev.FilterRemoved(3, Direction.INGRESS, 49152, 1, "bpf", 42, True),
         "FilterRemoved    dev veth0 ifindex 3 ingress parent ffff:fff2 prio 49152 bpf handle 0x1 prog_id 42 owned"),
        (ev.FilterAdded(3, Direction.EGRESS, 7, 0x80000800, "u32", None, False),
         "FilterAdded      dev veth0 ifindex 3 egress parent ffff:fff3 prio 7 u32 handle 800::800 foreign"),
        (ev.FilterAdded(9, None, 7, 1, "u32", None, False),
         "FilterAdded      dev ? ifindex 9 prio 7 u32 handle :1 foreign"),
        (ev.Resynced("lost"), "Resynced         reason lost"),
        (ev.EventsDropped(4), "EventsDropped    count 4"),
    ],
)
def test_events_read_in_tcs_words(event: ev.Event, text: str) -> None:
    line = cli.format_event(event, as_json=False, now=0.0, names={3: "veth0"})
    assert line.split("  ", 1)[1] == text


def test_events_are_one_json_object_for_programs() -> None:
    line = cli.format_event(ev.FilterAdded(3, Direction.EGRESS, 7, 1, "u32", None, False), as_json=True, now=1.5,
                            names={3: "veth0"})
    assert json.loads(line) == {
        "time": 1.5, "event": "FilterAdded", "ifindex": 3, "dev": "veth0", "direction": "egress", "priority": 7,
        "handle": 1, "handle_tc": ":1", "parent_tc": "ffff:fff3", "kind": "u32", "prog_id": None, "owned": False,
    }
    line = cli.format_event(ev.QdiscRemoved(3, "clsact", 0xFFFF0000, 0xFFFFFFF1), as_json=True, now=1.5)
    assert json.loads(line) == {
        "time": 1.5, "event": "QdiscRemoved", "ifindex": 3, "dev": None, "kind": "clsact", "handle": 0xFFFF0000,
        "parent": 0xFFFFFFF1, "handle_tc": "ffff:", "parent_tc": "ffff:fff1",
    }


# -- the default pin directory ------------------------------------------------------------------------------


@pytest.fixture
def fake_bpffs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary directory the checks take for a bpffs mount (they are about ownership and links)."""
    monkeypatch.setattr(cli, "_is_bpffs", lambda path: True)
    return tmp_path


def test_the_pin_directory_is_created_owner_only(fake_bpffs: Path) -> None:
    root = fake_bpffs / "asynctc"
    assert cli.pin_directory(str(root), "me", create=False) is None
    made = cli.pin_directory(str(root), "me", create=True)
    assert made == str(root / "me")
    for d in (root, root / "me"):
        st = d.stat()
        assert st.st_mode & 0o777 == 0o700 and st.st_uid == os.geteuid()
    assert cli.pin_directory(str(root), "me", create=False) == made


def test_a_pin_directory_others_can_write_is_refused(fake_bpffs: Path) -> None:
    root = fake_bpffs / "asynctc"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(asynctc.PinError, match=r"others can write to it \(mode 0777\)"):
        cli.pin_directory(str(root), "me", create=True)
    assert not (root / "me").exists()


def test_a_symlinked_pin_directory_is_refused(fake_bpffs: Path) -> None:
    elsewhere = fake_bpffs / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (fake_bpffs / "asynctc").symlink_to(elsewhere)
    with pytest.raises(asynctc.PinError, match="is a symbolic link"):
        cli.pin_directory(str(fake_bpffs / "asynctc"), "me", create=True)
    linked_parent = fake_bpffs / "mnt"
    linked_parent.symlink_to(elsewhere)
    with pytest.raises(asynctc.PinError, match=f"{linked_parent} is a symbolic link"):
        cli.pin_directory(str(linked_parent / "asynctc"), "me", create=True)
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_pin_directory_of_another_user_is_refused(fake_bpffs: Path) -> None:
    root = fake_bpffs / "asynctc"
    root.mkdir(mode=0o700)
    os.chown(root, 65534, 65534)
    with pytest.raises(asynctc.PinError, match="belongs to uid 65534"):
        cli.pin_directory(str(root), "me", create=True)


def test_pins_need_a_bpffs_mount(tmp_path: Path) -> None:
    with pytest.raises(asynctc.PinError, match="is not a bpffs mount"):
        cli.pin_directory(str(tmp_path / "asynctc"), "me", create=True)
    assert not (tmp_path / "asynctc").exists()


# -- completion ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_and_options() -> None:
    proc = run("completion", "bash")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout

    def complete(*words: str) -> set[str]:
        line = " ".join(("asynctc", *words))
        code = (f"{script}\nCOMP_WORDS=(asynctc {' '.join(words)}); COMP_CWORD={len(words)}; "
                f"COMP_LINE='{line}'; _asynctc; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
        out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return set(out.stdout.split())

    assert {c.name for c in cli.SUBCOMMANDS} <= complete("")
    assert complete("at") == {"attach"}
    assert {"--netns", "--json", "--pin", "--position", "--backend", "--owner"} <= complete("attach", "--")
    assert complete("attach", "--position", "f") == {"first"}
    assert complete("show", "lo", "e") == {"egress"}
    assert complete("completion", "") == {"bash", "zsh"}


@pytest.mark.skipif(shutil.which("zsh") is None, reason="needs zsh")
def test_zsh_completion_loads() -> None:
    proc = run("completion", "zsh")
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run(["zsh", "-c", proc.stdout + "\nwhence -w _asynctc"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "function" in out.stdout, out.stderr


def test_zsh_completion_uses_bash_completion() -> None:
    script = cli.completion_script("zsh", cli.build_parser())
    assert script.startswith("#compdef asynctc\n")
    assert "bashcompinit" in script and "complete -F _asynctc asynctc" in script


def test_every_command_and_option_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for name, options in cli._completion_words(cli.build_parser()).items():
        assert f"\n### {name}\n" in doc, name
        for opt in options:
            if opt != "--help":
                assert opt in doc, (name, opt)


def test_library_warnings_are_one_line_each() -> None:
    code = ("import logging, sys; from asynctc import cli; cli._log_to_stderr('show'); "
            "log = logging.getLogger('asynctc')\n"
            "try:\n    raise OSError('boom')\nexcept OSError:\n    log.exception('cleanup failed:\\nsecond line')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stderr == "asynctc show: error: cleanup failed: second line\n"
