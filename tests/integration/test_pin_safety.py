"""Pin paths under attack, on the real kernel: a second user (uid 65534) plants directories and symlinks in
the world-writable bpffs root; asynctc must neither pin where that user could undo it nor follow a symlink
to another attachment. Stale pins are removable, and a detached attachment leaves no pin behind.

Each test has its own namespace and its own bpffs mount (the `bpffs` fixture), both removed afterwards.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import trio

import asynctc
from asynctc import programs
from asynctc.testing import ip, tc

pytestmark = pytest.mark.kernel

NOBODY = 65534
BACKENDS = ["bpf_link", "netlink"]


def as_nobody(*cmd: str) -> None:
    """Run a command as uid/gid 65534 with no supplementary groups and no capabilities."""
    proc = subprocess.run(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "--", *cmd],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, (cmd, proc.stderr)


def entries(root: str) -> set[str]:
    """Every path under a bpffs mount, relative to it (the kernel's own *.debug iterators left out)."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if not rel.endswith(".debug"):
                out.add(rel)
    return out


def dummy(netns: str, name: str = "d0") -> None:
    """A device of the test's own in `netns` (a veth pair with both ends there; deleting one deletes both)."""
    ip("link", "add", name, "type", "veth", "peer", "name", name + "p", netns=netns)
    ip("link", "set", name, "up", netns=netns)


async def hook_is_empty(s: asynctc.Session, dev: str = "d0") -> bool:
    return [(await s.query(dev, d)).entries for d in ("ingress", "egress")] == [(), ()]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_refuses_directories_another_user_could_change(netns: str, bpffs: str, backend: str) -> None:
    dummy(netns)
    as_nobody("mkdir", os.path.join(bpffs, "evil"))
    os.mkdir(os.path.join(bpffs, "evil", "inner"))  # root's own directory, but under nobody's
    for name, mode in (("open", 0o777), ("group", 0o775), ("sticky", 0o1777)):
        os.mkdir(os.path.join(bpffs, name))
        os.chmod(os.path.join(bpffs, name), mode)
    before = entries(bpffs)
    async with asynctc.open_session(backend, netns=netns) as s:
        att = await s.attach("d0", "ingress", programs.constant("pass"))
        cases = [
            ("evil/p", rf"{bpffs}/evil is owned by uid {NOBODY}, not by this user \(uid 0\) or root"),
            ("evil/inner/p", rf"{bpffs}/evil is owned by uid {NOBODY}"),
            ("open/p", rf"{bpffs}/open is writable by group and others \(mode 0777\)"),
            ("group/p", rf"{bpffs}/group is writable by group \(mode 0775\)"),
            # sticky is accepted only on the bpffs mount root itself
            ("sticky/p", rf"{bpffs}/sticky is writable by group and others \(mode 1777\)"),
        ]
        for rel, why in cases:
            with pytest.raises(asynctc.PinError, match=why):
                await att.pin(os.path.join(bpffs, rel))
            assert not att.pinned
        assert entries(bpffs) == before  # nothing was pinned anywhere
        # the sticky bpffs root itself (mode 1777, root's) and a directory of root's own are fine
        assert stat.S_IMODE(os.stat(bpffs).st_mode) == 0o1777
        os.mkdir(os.path.join(bpffs, "mine"), 0o755)
        await att.pin(os.path.join(bpffs, "mine", "p"))
        await att.detach()
        assert not os.path.exists(os.path.join(bpffs, "mine", "p"))
        assert await hook_is_empty(s)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_planted_symlink_cannot_redirect_adopt_or_pin(netns: str, bpffs: str, backend: str) -> None:
    dummy(netns)
    a_path, b_path = os.path.join(bpffs, "a"), os.path.join(bpffs, "b")
    real = os.path.join(bpffs, "real")
    os.mkdir(real, 0o755)
    async with asynctc.open_session(backend, netns=netns) as s:
        a = await s.attach("d0", "ingress", programs.constant("pass", name="prog_a"))
        b = await s.attach("d0", "egress", programs.constant("pass", name="prog_b"))
        await a.pin(a_path)
        await b.pin(b_path)
        await a.unpin()  # a's name is free again in the sticky root: another user can take it
    suffixes = ["", "_record"] if backend == "netlink" else [""]
    for suffix in suffixes:
        as_nobody("ln", "-s", b_path + suffix, a_path + suffix)
    as_nobody("ln", "-s", bpffs, os.path.join(bpffs, "dirlink"))
    async with asynctc.open_session(backend, netns=netns) as s:
        with pytest.raises(asynctc.PinError, match=rf"{a_path}.* is a symbolic link"):
            await s.adopt_pinned(a_path)
        with pytest.raises(asynctc.PinError, match=rf"{bpffs}/dirlink is a symbolic link"):
            await s.adopt_pinned(os.path.join(bpffs, "dirlink", "b"))
        assert s.attachments == ()  # b was not taken over through either symlink
        # the real pin is adopted, and pinning through a symlinked directory is refused
        b2 = await s.adopt_pinned(b_path)
        assert b2.info.direction is asynctc.Direction.EGRESS
        await b2.unpin()
        with pytest.raises(asynctc.PinError, match="is a symbolic link"):
            await b2.pin(os.path.join(bpffs, "dirlink", "real", "x"))
        assert os.listdir(real) == []
        # a pin name taken by a symlink is not pinned through: the kernel refuses (EEXIST)
        with pytest.raises(asynctc.PinError, match="already pinned at this path|something is already"):
            await b2.pin(a_path)
        assert os.path.islink(a_path) and not b2.pinned
        await b2.detach()
        assert await hook_is_empty(s)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_nul_and_dotdot_are_rejected_before_anything_is_pinned(netns: str, bpffs: str, backend: str) -> None:
    dummy(netns)
    os.mkdir(os.path.join(bpffs, "sub"), 0o755)
    before = entries(bpffs)
    async with asynctc.open_session(backend, netns=netns) as s:
        att = await s.attach("d0", "ingress", programs.constant("pass"))
        with pytest.raises(ValueError, match=r"NUL byte.*the kernel would cut the path there"):
            await att.pin(os.path.join(bpffs, "p\0x"))
        with pytest.raises(ValueError, match=r"'\.\.' component"):
            await att.pin(os.path.join(bpffs, "sub", "..", "p"))
        with pytest.raises(ValueError, match=r"'\.\.' component"):
            await s.adopt_pinned(os.path.join(bpffs, "sub", "..", "p"))
        assert entries(bpffs) == before and not att.pinned
        await att.detach()
        assert await hook_is_empty(s)
        assert entries(bpffs) == before


@pytest.mark.parametrize("backend", BACKENDS)
async def test_pins_are_owner_only_and_detach_removes_them(netns: str, bpffs: str, backend: str) -> None:
    dummy(netns)
    path = os.path.join(bpffs, "p")
    old_umask = os.umask(0)  # the most permissive umask: the pin must still be 0600
    try:
        async with asynctc.open_session(backend, netns=netns) as s:
            att = await s.attach("d0", "ingress", programs.constant("pass"))
            await att.pin(path)
            made = [path] + ([path + "_record"] if backend == "netlink" else [])
            for p in made:
                st = os.stat(p, follow_symlinks=False)
                assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (p, oct(st.st_mode))
                assert st.st_uid == os.geteuid()
            await att.detach()
            assert att.info.pinned is None
            assert entries(bpffs) == set()  # detaching a pinned attachment leaves no pin behind
            assert await hook_is_empty(s)
    finally:
        os.umask(old_umask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("noticed", [False, True], ids=["unnoticed", "severed"])
async def test_unpin_removes_the_pin_of_a_severed_attachment(netns: str, bpffs: str, backend: str,
                                                             noticed: bool) -> None:
    dummy(netns)
    path = os.path.join(bpffs, "p")
    async with asynctc.open_session(backend, netns=netns) as s:
        att = await s.attach("d0", "ingress", programs.constant("pass"))
        await att.pin(path)
        ip("link", "del", "d0", netns=netns)
        if noticed:
            with trio.fail_after(15):
                await att.wait_severed()
            assert att.state is asynctc.State.SEVERED
        await att.unpin()  # no Severed: removing a stale pin is always allowed
        assert att.info.pinned is None
        assert entries(bpffs) == set()
        await att.unpin()  # idempotent
        await att.detach()  # a no-op on a severed attachment (it finds the link or filter gone)
        assert att.state is asynctc.State.SEVERED and s.attachments == ()


async def test_unpin_removes_the_record_of_a_filter_deleted_by_someone_else(netns: str, bpffs: str) -> None:
    dummy(netns)
    path = os.path.join(bpffs, "p")
    async with asynctc.open_session("netlink", netns=netns) as s:
        att = await s.attach("d0", "ingress", programs.constant("pass"), priority=40)
        await att.pin(path)
        tc("filter", "del", "dev", "d0", "ingress", "prio", "40", netns=netns)
        await att.unpin()
        assert entries(bpffs) == set()
        await att.detach()
        assert await hook_is_empty(s)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_pin_owned_by_another_user_is_not_adopted(netns: str, bpffs: str, backend: str) -> None:
    dummy(netns)
    path = os.path.join(bpffs, "p")
    async with asynctc.open_session(backend, netns=netns) as s:
        att = await s.attach("d0", "ingress", programs.constant("pass"))
        await att.pin(path)
    os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    try:
        async with asynctc.open_session(backend, netns=netns) as s:
            with pytest.raises(asynctc.PinError, match=rf"pin at '{path}'.* owned by uid {NOBODY}"):
                await s.adopt_pinned(path)
            assert s.attachments == ()
    finally:
        os.chown(path, 0, 0, follow_symlinks=False)
    async with asynctc.open_session(backend, netns=netns) as s:
        again = await s.adopt_pinned(path)
        await again.unpin()
        await again.detach()
        assert await hook_is_empty(s)
    assert entries(bpffs) == set()


async def test_adopting_a_file_that_is_not_on_bpffs(netns: str, tmp_path: os.PathLike[str]) -> None:
    plain = os.path.join(os.fspath(tmp_path), "plain")
    with open(plain, "w") as f:
        f.write("not a BPF object")
    async with asynctc.open_session("bpf_link", netns=netns) as s:
        with pytest.raises(asynctc.PinError, match=r"is not on a bpffs mount; mount one"):
            await s.adopt_pinned(plain)
        assert s.attachments == ()
    # Program.from_pinned reads pins as asynctc reads its own: refused for what it is, never told as a
    # missing capability (the kernel's EACCES for a file that is not a BPF object)
    with pytest.raises(asynctc.PinError, match="not on a bpffs mount") as info:
        asynctc.Program.from_pinned(plain)
    assert "CAP_" not in str(info.value)


def test_capability_hint_names_the_capability_actually_missing(netns: str) -> None:
    """A process with CAP_BPF but without CAP_NET_ADMIN (and CAP_SYS_ADMIN) is told it lacks CAP_NET_ADMIN,
    not CAP_BPF; one with CAP_NET_ADMIN but no CAP_BPF is told it lacks CAP_BPF."""
    code = textwrap.dedent("""
        import asynctc
        try:
            asynctc.programs.constant("pass")
        except asynctc.PermissionDenied as exc:
            print(exc)
    """)

    def run(caps: str) -> str:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, "setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--",
             sys.executable, "-c", code],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    only_bpf = run("+bpf")
    assert "needs CAP_NET_ADMIN or CAP_SYS_ADMIN" in only_bpf and "it has CAP_BPF" in only_bpf, only_bpf
    assert "needs CAP_BPF" not in only_bpf
    only_net = run("+net_admin")
    assert "needs CAP_BPF or CAP_SYS_ADMIN" in only_net and "it has CAP_NET_ADMIN" in only_net, only_net


async def test_a_pin_whose_directory_became_unsafe_is_not_touched(netns: str, bpffs: str) -> None:
    """bpf_link removes the pin before it detaches: when the pin cannot be removed safely (its directory
    became writable by others since), detach() says so and changes nothing."""
    dummy(netns)
    d = os.path.join(bpffs, "mine")
    os.mkdir(d, 0o755)
    path = os.path.join(d, "p")
    async with asynctc.open_session("bpf_link", netns=netns) as s:
        att = await s.attach("d0", "ingress", programs.constant("pass"))
        await att.pin(path)
        os.chmod(d, 0o777)
        with pytest.raises(asynctc.PinError, match=rf"{d} is writable by group and others"):
            await att.detach()
        assert att.state is asynctc.State.ATTACHED and att.info.pinned == path and os.path.exists(path)
        assert [e.link_id for e in (await s.query("d0", "ingress")).entries] == [att.info.link_id]
        os.chmod(d, 0o755)
        await att.detach()
        assert not os.path.exists(path) and await hook_is_empty(s)


def test_programs_and_maps_are_read_and_pinned_under_the_same_rules(bpffs: str) -> None:
    """Program.from_pinned, Map.from_pinned and Map.pin follow no symlink and make owner-only pins, as the
    attachments' pins do."""
    from asynctc import programs
    from asynctc.lowlevel import bpf

    with programs.constant("pass") as prog:
        real = os.path.join(bpffs, "real")
        bpf.obj_pin(prog.fd, real)
        os.symlink(real, os.path.join(bpffs, "alias"))
        with asynctc.Program.from_pinned(real) as again:
            assert again.id == prog.id
        with pytest.raises(asynctc.PinError, match="symbolic link"):
            asynctc.Program.from_pinned(os.path.join(bpffs, "alias"))
    fd = bpf.map_create_array(8, 1, name="atc_test")
    with asynctc.Map.from_fd(fd) as m:
        path = os.path.join(bpffs, "amap")
        m.pin(path)
        assert os.stat(path).st_mode & 0o777 == 0o600
        with asynctc.Map.from_pinned(path) as again_map:
            assert again_map.id == m.id
        os.symlink(path, os.path.join(bpffs, "maplink"))
        with pytest.raises(asynctc.PinError, match="symbolic link"):
            asynctc.Map.from_pinned(os.path.join(bpffs, "maplink"))
    os.close(fd)
