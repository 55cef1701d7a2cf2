"""MockKernel at the bpf(2) boundary: `kernel.bpf` (asynctc.lowlevel.bpf.Bpf over MockSyscalls) and
`kernel.pins` answer as the kernel does (KERNEL.md; each errno rule its own test). The differential test
(tests/integration/test_mock_bpf_differential.py) checks the same answers against the real kernel."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Literal

import pytest

import asynctc
from asynctc import Direction
from asynctc.lowlevel import bpf
from asynctc.lowlevel.bpf import BPF_F_AFTER, BPF_F_BEFORE, BPF_F_ID, BPF_F_LINK, BPF_F_REPLACE, BpfError
from asynctc.lowlevel.kernel import Kernel
from asynctc_mock import KernelError, MockKernel
from asynctc_mock._kernel import SIM_PROG_ID_BASE

IN, EG = bpf.BPF_TCX_INGRESS, bpf.BPF_TCX_EGRESS
BPF_PROG_ATTACH, BPF_PROG_DETACH = 8, 9


def eth0(kernel: MockKernel) -> int:
    return kernel.devices()["eth0"]


def load(kernel: MockKernel, imm: int = -1, name: str = "") -> int:
    """A simulated constant program loaded through BPF_PROG_LOAD; its fd."""
    return kernel.bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, bpf.asm.mov64_imm(0, imm) + bpf.asm.exit(), name=name)


def pid(kernel: MockKernel, fd: int) -> int:
    return kernel.bpf.prog_info(fd).id


def lid(kernel: MockKernel, fd: int) -> int:
    return kernel.bpf.link_info(fd).id


def errno_of(fn: Callable[[], object]) -> int | None:
    with pytest.raises(BpfError) as exc:
        fn()
    return exc.value.errno


def raw(kernel: MockKernel, cmd: int, fmt: str, *values: int, op: str = "raw") -> ctypes.Array[ctypes.c_char]:
    """Call bpf(cmd) with an attr packed from `fmt` at offset 0; returns the attr."""
    attr = ctypes.create_string_buffer(bpf.ATTR_SIZE)
    struct.pack_into(fmt, attr, 0, *values)
    kernel.bpf.syscalls.bpf(cmd, attr, op)
    return attr


def prog_attach(kernel: MockKernel, ifindex: int, prog_fd: int, attach_type: int = IN, flags: int = 0,
                replace_fd: int = 0, relative: int = 0, revision: int = 0) -> None:
    raw(kernel, BPF_PROG_ATTACH, "=IIIIIIQ", ifindex, prog_fd, attach_type, flags, replace_fd, relative, revision)


def prog_detach(kernel: MockKernel, ifindex: int, prog_fd: int, attach_type: int = IN, flags: int = 0,
                relative: int = 0, revision: int = 0) -> None:
    raw(kernel, BPF_PROG_DETACH, "=IIIIIIQ", ifindex, prog_fd, attach_type, flags, 0, relative, revision)


def ids(kernel: MockKernel, ifindex: int, attach_type: int = IN) -> tuple[int, ...]:
    return kernel.bpf.prog_query(ifindex, attach_type).prog_ids


def revision(kernel: MockKernel, ifindex: int, attach_type: int = IN) -> int:
    return kernel.bpf.prog_query(ifindex, attach_type).revision


# -- the boundary itself --------------------------------------------------------------------------------------
def test_mock_kernel_is_a_kernel(kernel: MockKernel) -> None:
    assert isinstance(kernel, Kernel) and kernel.simulated
    sock = kernel.open_netlink_socket()
    try:
        assert sock.getsockname()[0] > 0  # a portid of its own
    finally:
        sock.close()


def test_fds_are_real_distinct_fd_numbers_with_fdinfo(kernel: MockKernel) -> None:
    p = load(kernel)
    m = kernel.bpf.map_create_array(8, 1)
    link = kernel.bpf.link_create_tcx(p, eth0(kernel), IN)
    fds = {p, m, link}
    assert len(fds) == 3 and all(os.fstat(fd) for fd in fds)  # open in this process: no real fd reuses them
    assert [kernel.bpf.fd_object_kind(fd) for fd in (p, m, link)] == ["prog", "map", "link"]
    assert "link_type:\ttcx" in kernel.bpf.syscalls.fdinfo(link)
    r, w = os.pipe()
    try:
        assert kernel.bpf.fd_object_kind(r) == ""
    finally:
        os.close(r)
        os.close(w)
    assert kernel.bpf.syscalls.fdinfo(p) and kernel.fds()[p] == ("prog", pid(kernel, p))
    kernel.bpf.close(m)
    assert m not in kernel.fds()
    with pytest.raises(OSError, match="Bad file descriptor") as exc:
        kernel.bpf.close(m)
    assert exc.value.errno == errno.EBADF


def test_unknown_command_and_bad_fds(kernel: MockKernel) -> None:
    assert errno_of(lambda: raw(kernel, 99, "=I", 0)) == errno.EINVAL
    r, w = os.pipe()
    os.close(w)
    try:
        assert errno_of(lambda: kernel.bpf.prog_info(r)) == errno.EINVAL  # open, not a BPF object
    finally:
        os.close(r)
    assert errno_of(lambda: kernel.bpf.prog_info(r)) == errno.EBADF  # not open


# -- programs -------------------------------------------------------------------------------------------------
def test_prog_load_simulates_the_constant_program(kernel: MockKernel) -> None:
    fd = load(kernel, 2, name="dropper")
    info = kernel.bpf.prog_info(fd)
    assert info.type == bpf.BPF_PROG_TYPE_SCHED_CLS and info.name == "dropper" and len(info.tag) == 16
    assert kernel.bpf.prog_test_run(fd) == 2
    assert kernel.bpf.prog_test_run(load(kernel, 0)) == 0
    assert kernel.bpf.prog_test_run(load(kernel, -1)) == -1  # TC_ACT_UNSPEC: next


def test_prog_load_refuses_anything_else_with_a_log(kernel: MockKernel) -> None:
    with pytest.raises(BpfError) as exc:
        kernel.bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, bpf.asm.mov64_imm(0, 0) + bpf.asm.mov64_imm(0, 0)
                             + bpf.asm.exit())
    assert exc.value.errno == errno.EINVAL and "constant program" in exc.value.log
    with pytest.raises(BpfError) as exc:
        kernel.bpf.prog_load(bpf.BPF_PROG_TYPE_XDP, bpf.asm.mov64_imm(0, 2) + bpf.asm.exit())
    assert exc.value.errno == errno.EINVAL and "SCHED_CLS" in exc.value.log
    with pytest.raises(BpfError) as exc:
        kernel.bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, bpf.asm.mov64_imm(0, 7) + bpf.asm.exit())
    assert exc.value.errno == errno.EINVAL and "returns 7" in exc.value.log


def test_simulated_program_fd_and_test_run(kernel: MockKernel) -> None:
    verdicts: tuple[tuple[Literal["pass", "drop", "next"], int], ...] = (("pass", 0), ("drop", 2), ("next", -1))
    for verdict, code in verdicts:
        prog = kernel.program(verdict)
        assert kernel.bpf.prog_test_run(prog.fd) == code
        assert kernel.bpf.prog_info(prog.fd).id == prog.id
    assert errno_of(lambda: kernel.bpf.prog_test_run(prog.fd, data=bytes(10))) == errno.EINVAL  # < ETH_HLEN


def test_prog_get_fd_by_id(kernel: MockKernel) -> None:
    prog = kernel.program()
    fd = kernel.bpf.prog_get_fd_by_id(prog.id)
    assert fd != prog.fd and kernel.bpf.prog_info(fd).id == prog.id
    assert errno_of(lambda: kernel.bpf.prog_get_fd_by_id(12345)) == errno.ENOENT


def test_real_program_is_registered_by_id_and_runs_for_real(kernel: MockKernel, root: None) -> None:
    from asynctc import programs

    with programs.constant("drop", name="real_drop") as real:
        link = kernel.bpf.link_create_tcx(real.fd, eth0(kernel), IN)
        assert ids(kernel, eth0(kernel)) == (real.id,)
        assert kernel.bpf.prog_info(real.fd).name == "real_drop"
        assert kernel.bpf.prog_test_run(real.fd) == 2  # run by the real kernel
        assert kernel.send("eth0", "ingress") == "drop"
        kernel.bpf.close(link)
    assert ids(kernel, eth0(kernel)) == ()


# -- tcx link create --------------------------------------------------------------------------------------------
def test_link_create_appends_and_counts_the_revision(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a, b = load(kernel), load(kernel)
    assert revision(kernel, dev) == 1
    la = kernel.bpf.link_create_tcx(a, dev, IN)
    lb = kernel.bpf.link_create_tcx(b, dev, IN)
    q = kernel.bpf.prog_query(dev, IN)
    assert q.prog_ids == (pid(kernel, a), pid(kernel, b)) and q.link_ids == (lid(kernel, la), lid(kernel, lb))
    assert q.revision == 3
    assert kernel.hook("eth0", "ingress").prog_ids == q.prog_ids  # one state for both APIs
    assert revision(kernel, dev, EG) == 1


def test_before_and_after_without_relative_prepend_and_append(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    p = [load(kernel) for _ in range(3)]
    kernel.bpf.link_create_tcx(p[0], dev, IN)
    kernel.bpf.link_create_tcx(p[1], dev, IN, flags=BPF_F_BEFORE)
    kernel.bpf.link_create_tcx(p[2], dev, IN, flags=BPF_F_AFTER)
    assert ids(kernel, dev) == tuple(pid(kernel, p[i]) for i in (1, 0, 2))


def test_relative_by_prog_fd_prog_id_link_fd_and_link_id(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    p = [load(kernel) for _ in range(5)]
    l0 = kernel.bpf.link_create_tcx(p[0], dev, IN)  # [0]
    kernel.bpf.link_create_tcx(p[1], dev, IN, flags=BPF_F_BEFORE, relative=p[0])  # [1 0]
    kernel.bpf.link_create_tcx(p[2], dev, IN, flags=BPF_F_AFTER | BPF_F_ID, relative=pid(kernel, p[1]))  # [1 2 0]
    kernel.bpf.link_create_tcx(p[3], dev, IN, flags=BPF_F_AFTER | BPF_F_LINK, relative=l0)  # [1 2 0 3]
    kernel.bpf.link_create_tcx(p[4], dev, IN, flags=BPF_F_BEFORE | BPF_F_LINK | BPF_F_ID,
                               relative=lid(kernel, l0))  # [1 2 4 0 3]
    assert ids(kernel, dev) == tuple(pid(kernel, p[i]) for i in (1, 2, 4, 0, 3))


def test_before_and_after_together_is_erange(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a = load(kernel)
    kernel.bpf.link_create_tcx(a, dev, IN)
    both = BPF_F_BEFORE | BPF_F_AFTER
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=both)) == errno.ERANGE
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=both, relative=a)) == errno.ERANGE


def test_unattached_relative_is_enoent(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    stray = load(kernel)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=BPF_F_BEFORE,
                                                       relative=stray)) == errno.ENOENT
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=BPF_F_AFTER | BPF_F_ID,
                                                       relative=999_999)) == errno.ENOENT
    detached = kernel.bpf.link_create_tcx(load(kernel), dev, EG)
    kernel.bpf.link_detach(detached)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=BPF_F_AFTER | BPF_F_LINK,
                                                       relative=detached)) == errno.ENOENT
    # with BEFORE|AFTER, the relative is looked up first
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=BPF_F_BEFORE | BPF_F_AFTER,
                                                       relative=stray)) == errno.ENOENT
    assert len(ids(kernel, dev)) == 1


def test_relative_without_before_or_after_is_einval(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a = load(kernel)
    kernel.bpf.link_create_tcx(a, dev, IN)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, relative=a)) == errno.EINVAL
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=BPF_F_LINK)) == errno.EINVAL
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=BPF_F_ID)) == errno.ENOENT


def test_anchor_that_is_an_xdp_program_id_is_einval(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    xdp = kernel.program(prog_type=bpf.BPF_PROG_TYPE_XDP)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=BPF_F_BEFORE | BPF_F_ID,
                                                       relative=xdp.id)) == errno.EINVAL


def test_same_program_twice_is_eexist(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a = load(kernel)
    kernel.bpf.link_create_tcx(a, dev, IN)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(a, dev, IN)) == errno.EEXIST
    assert errno_of(lambda: prog_attach(kernel, dev, a)) == errno.EEXIST
    kernel.bpf.link_create_tcx(a, dev, EG)  # the other direction is another hook


def test_the_64th_program_is_erange(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    for _ in range(63):
        kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN)) == errno.ERANGE
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=BPF_F_BEFORE)) == errno.ERANGE
    assert revision(kernel, dev) == 64


def test_expected_revision_mismatch_is_estale(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    kernel.bpf.link_create_tcx(load(kernel), dev, IN, expected_revision=1)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, expected_revision=1)) == errno.ESTALE
    kernel.bpf.link_create_tcx(load(kernel), dev, IN, expected_revision=2)
    assert revision(kernel, dev) == 3


def test_replace_flag_on_link_create_is_refused(kernel: MockKernel) -> None:
    """BPF_F_REPLACE names no program to replace on BPF_LINK_CREATE: mprog finds none (ENOENT, as the real
    kernel answers), on an empty hook and on a full one alike."""
    dev = eth0(kernel)
    a = load(kernel)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(a, dev, IN, flags=BPF_F_REPLACE)) == errno.ENOENT
    kernel.bpf.link_create_tcx(a, dev, IN)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), dev, IN, flags=BPF_F_REPLACE,
                                                       relative=a)) == errno.ENOENT
    assert revision(kernel, dev) == 2


def test_non_sched_cls_program_is_einval(kernel: MockKernel) -> None:
    xdp = kernel.program(prog_type=bpf.BPF_PROG_TYPE_XDP)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(xdp.fd, eth0(kernel), IN)) == errno.EINVAL


def test_unknown_ifindex_is_enodev(kernel: MockKernel) -> None:
    assert errno_of(lambda: kernel.bpf.link_create_tcx(load(kernel), 0xFFFFFFFF, IN)) == errno.ENODEV
    assert errno_of(lambda: kernel.bpf.prog_query(999, IN)) == errno.ENODEV


def test_bad_program_fd(kernel: MockKernel) -> None:
    m = kernel.bpf.map_create_array()
    assert errno_of(lambda: kernel.bpf.link_create_tcx(m, eth0(kernel), IN)) == errno.EINVAL
    kernel.bpf.close(m)
    assert errno_of(lambda: kernel.bpf.link_create_tcx(m, eth0(kernel), IN)) == errno.EBADF


# -- link update ----------------------------------------------------------------------------------------------
def test_link_update_swaps_in_place(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a, b, c = load(kernel), load(kernel), load(kernel)
    kernel.bpf.link_create_tcx(c, dev, IN)
    link = kernel.bpf.link_create_tcx(a, dev, IN, flags=BPF_F_BEFORE)
    kernel.bpf.link_update(link, b)
    assert ids(kernel, dev) == (pid(kernel, b), pid(kernel, c)) and revision(kernel, dev) == 4
    assert kernel.bpf.link_info(link).prog_id == pid(kernel, b)


def test_link_update_flags_other_than_replace_are_einval(kernel: MockKernel) -> None:
    link = kernel.bpf.link_create_tcx(load(kernel), eth0(kernel), IN)
    b = load(kernel)
    assert errno_of(lambda: raw(kernel, bpf.BPF_LINK_UPDATE, "=IIII", link, b, BPF_F_BEFORE, 0)) == errno.EINVAL


def test_link_update_old_prog_without_replace_is_einval(kernel: MockKernel) -> None:
    a = load(kernel)
    link = kernel.bpf.link_create_tcx(a, eth0(kernel), IN)
    assert errno_of(lambda: raw(kernel, bpf.BPF_LINK_UPDATE, "=IIII", link, load(kernel), 0, a)) == errno.EINVAL


def test_link_update_cas_mismatch_is_eperm(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a, b, other = load(kernel), load(kernel), load(kernel)
    link = kernel.bpf.link_create_tcx(a, dev, IN)
    assert errno_of(lambda: kernel.bpf.link_update(link, b, old_prog_fd=other)) == errno.EPERM
    assert ids(kernel, dev) == (pid(kernel, a),) and revision(kernel, dev) == 2
    kernel.bpf.link_update(link, b, old_prog_fd=a)
    assert ids(kernel, dev) == (pid(kernel, b),) and revision(kernel, dev) == 3


def test_link_update_to_the_same_program_changes_nothing(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a = load(kernel)
    link = kernel.bpf.link_create_tcx(a, dev, IN)
    kernel.bpf.link_update(link, a)
    kernel.bpf.link_update(link, a, old_prog_fd=a)
    assert revision(kernel, dev) == 2


def test_link_update_to_a_program_elsewhere_on_the_hook_is_eexist(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a, b = load(kernel), load(kernel)
    link = kernel.bpf.link_create_tcx(a, dev, IN)
    kernel.bpf.link_create_tcx(b, dev, IN)
    assert errno_of(lambda: kernel.bpf.link_update(link, b)) == errno.EEXIST


def test_link_update_of_a_severed_link_is_enolink(kernel: MockKernel) -> None:
    link = kernel.bpf.link_create_tcx(load(kernel), eth0(kernel), IN)
    kernel.remove_device("eth0")
    assert errno_of(lambda: kernel.bpf.link_update(link, load(kernel))) == errno.ENOLINK
    info = kernel.bpf.link_info(link)
    assert info.ifindex == 0 and info.attach_type == IN
    kernel.bpf.link_detach(link)  # detaching a severed link succeeds
    assert errno_of(lambda: kernel.bpf.prog_query(2, IN)) == errno.ENODEV


def test_link_update_of_a_detached_link_is_enolink(kernel: MockKernel) -> None:
    link = kernel.bpf.link_create_tcx(load(kernel), eth0(kernel), IN)
    kernel.bpf.link_detach(link)
    assert errno_of(lambda: kernel.bpf.link_update(link, load(kernel))) == errno.ENOLINK


# -- detach, close, revisions ---------------------------------------------------------------------------------
def test_revision_resets_when_the_hook_empties_without_a_qdisc(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    la = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    lb = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    kernel.bpf.link_detach(la)
    assert revision(kernel, dev) == 4
    kernel.bpf.link_detach(lb)
    assert revision(kernel, dev) == 1
    kernel.bpf.link_detach(lb)  # again: nothing to do, success
    info = kernel.bpf.link_info(lb)
    assert info.ifindex == 0 and info.prog_id != 0


def test_clsact_keeps_the_revision_counting(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    kernel.qdisc_add("eth0", "clsact")
    for attach_type in (IN, EG):
        link = kernel.bpf.link_create_tcx(load(kernel), dev, attach_type)
        kernel.bpf.link_detach(link)
        assert revision(kernel, dev, attach_type) == 3
    kernel.qdisc_delete("eth0")
    assert revision(kernel, dev, IN) == revision(kernel, dev, EG) == 1


def test_ingress_qdisc_keeps_only_ingress_counting(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    kernel.qdisc_add("eth0", "ingress")
    for attach_type in (IN, EG):
        kernel.bpf.link_detach(kernel.bpf.link_create_tcx(load(kernel), dev, attach_type))
    assert revision(kernel, dev, IN) == 3 and revision(kernel, dev, EG) == 1


def test_closing_the_last_fd_of_an_unpinned_link_detaches_it(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    link = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    link_id = lid(kernel, link)
    again = kernel.bpf.link_get_fd_by_id(link_id)
    kernel.bpf.close(link)
    assert len(ids(kernel, dev)) == 1  # another fd still holds it
    kernel.bpf.close(again)
    assert ids(kernel, dev) == () and revision(kernel, dev) == 1
    assert errno_of(lambda: kernel.bpf.link_get_fd_by_id(link_id)) == errno.ENOENT
    assert link_id not in kernel.bpf.link_ids()


def test_a_dup_of_a_link_fd_holds_the_link(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    link = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    dup = os.dup(link)
    assert kernel.bpf.link_info(dup).id == lid(kernel, link)  # the same file
    kernel.bpf.close(link)
    assert len(ids(kernel, dev)) == 1
    kernel.bpf.close(dup)
    assert ids(kernel, dev) == ()


def test_a_link_fd_closed_behind_the_kernels_back_is_released(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    link = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    os.close(link)
    assert ids(kernel, dev) == ()


def test_a_pinned_link_survives_every_fd_and_goes_with_its_pin(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    link = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    kernel.pins.pin_object(link, "/sys/fs/bpf/l")
    kernel.bpf.close(link)
    assert len(ids(kernel, dev)) == 1 and kernel.pins() == {"/sys/fs/bpf/l": f"link {ids_link(kernel, dev)}"}
    fd = kernel.pins.get_object("/sys/fs/bpf/l")
    assert kernel.bpf.fd_object_kind(fd) == "link"
    kernel.bpf.close(fd)
    assert kernel.pins.unpin("/sys/fs/bpf/l")
    assert ids(kernel, dev) == ()


def ids_link(kernel: MockKernel, dev: int) -> int:
    return kernel.bpf.prog_query(dev, IN).link_ids[0]


# -- queries ----------------------------------------------------------------------------------------------------
def test_query_too_small_an_array_is_enospc_with_the_count(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    progs = [load(kernel) for _ in range(3)]
    for p in progs:
        kernel.bpf.link_create_tcx(p, dev, IN)
    prog_ids = (ctypes.c_uint32 * 2)()
    attr = ctypes.create_string_buffer(bpf.ATTR_SIZE)
    struct.pack_into("=IIIIQI", attr, 0, dev, IN, 0, 0, ctypes.addressof(prog_ids), 2)
    with pytest.raises(BpfError) as exc:
        kernel.bpf.syscalls.bpf(bpf.BPF_PROG_QUERY, attr, "prog_query")
    assert exc.value.errno == errno.ENOSPC
    assert struct.unpack_from("=I", attr, 24)[0] == 3
    assert list(prog_ids) == [pid(kernel, p) for p in progs[:2]]
    assert kernel.bpf.prog_query(dev, IN, capacity=1).prog_ids == tuple(pid(kernel, p) for p in progs)


def test_query_flags_are_einval(kernel: MockKernel) -> None:
    assert errno_of(lambda: raw(kernel, bpf.BPF_PROG_QUERY, "=IIII", eth0(kernel), IN, 2, 0)) == errno.EINVAL
    assert errno_of(lambda: raw(kernel, bpf.BPF_PROG_QUERY, "=IIII", eth0(kernel), IN, 0, 1)) == errno.EINVAL


# -- BPF_PROG_ATTACH / BPF_PROG_DETACH ------------------------------------------------------------------------
def test_prog_attach_entries_have_no_link(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a, b = load(kernel), load(kernel)
    kernel.bpf.link_create_tcx(a, dev, IN)
    prog_attach(kernel, dev, b, flags=BPF_F_BEFORE, relative=a)
    q = kernel.bpf.prog_query(dev, IN)
    assert q.prog_ids == (pid(kernel, b), pid(kernel, a)) and q.link_ids[0] == 0 and q.link_ids[1] != 0
    kernel.bpf.close(b)
    assert len(ids(kernel, dev)) == 2  # the attachment holds the program
    assert errno_of(lambda: prog_detach(kernel, dev, a)) == errno.EBUSY  # a link's entry
    prog_detach(kernel, dev, kernel.bpf.prog_get_fd_by_id(q.prog_ids[0]))
    assert ids(kernel, dev) == (pid(kernel, a),) and revision(kernel, dev) == 4


def test_prog_attach_replace(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a, b = load(kernel), load(kernel)
    prog_attach(kernel, dev, a)
    prog_attach(kernel, dev, b, flags=BPF_F_REPLACE, replace_fd=a)
    assert ids(kernel, dev) == (pid(kernel, b),) and revision(kernel, dev) == 3
    assert errno_of(lambda: prog_detach(kernel, dev, b, flags=BPF_F_REPLACE)) == errno.EINVAL
    assert errno_of(lambda: prog_detach(kernel, dev, a)) == errno.ENOENT
    prog_detach(kernel, dev, 0)  # the last entry
    assert ids(kernel, dev) == () and revision(kernel, dev) == 1
    assert errno_of(lambda: prog_detach(kernel, dev, 0)) == errno.ENOENT  # the hook is gone


# -- maps -------------------------------------------------------------------------------------------------------
def test_array_map_calls(kernel: MockKernel) -> None:
    m = kernel.bpf.map_create_array(8, 3, name="rec")
    info = kernel.bpf.map_info(m)
    assert (info.type, info.key_size, info.value_size, info.max_entries, info.name) == (2, 4, 8, 3, "rec")
    assert kernel.bpf.map_lookup_u64(m, 2) == 0
    kernel.bpf.map_update(m, 1, struct.pack("=Q", 42))
    assert kernel.bpf.map_lookup_u64(m, 1) == 42
    assert kernel.bpf.map_get_next_key(m, None, 4) == struct.pack("=I", 0)
    assert kernel.bpf.map_get_next_key(m, struct.pack("=I", 1), 4) == struct.pack("=I", 2)
    assert kernel.bpf.map_get_next_key(m, struct.pack("=I", 2), 4) is None
    assert kernel.bpf.map_get_next_key(m, struct.pack("=I", 9), 4) == struct.pack("=I", 0)
    fd = kernel.bpf.map_get_fd_by_id(info.id)
    assert kernel.bpf.map_lookup_u64(fd, 1) == 42
    assert errno_of(lambda: kernel.bpf.map_get_fd_by_id(999)) == errno.ENOENT


def test_array_lookup_out_of_range_is_enoent(kernel: MockKernel) -> None:
    m = kernel.bpf.map_create_array(8, 1)
    assert kernel.bpf.map_lookup_elem(m, struct.pack("=I", 1), 8) is None
    assert errno_of(lambda: kernel.bpf.map_lookup(m, 1, 8)) == errno.ENOENT


def test_array_update_out_of_range_is_e2big(kernel: MockKernel) -> None:
    m = kernel.bpf.map_create_array(8, 1)
    assert errno_of(lambda: kernel.bpf.map_update(m, 1, bytes(8))) == errno.E2BIG


def test_array_update_noexist_is_eexist(kernel: MockKernel) -> None:
    m = kernel.bpf.map_create_array(8, 1)
    assert errno_of(lambda: kernel.bpf.map_update_elem(m, bytes(4), bytes(8), bpf.BPF_NOEXIST)) == errno.EEXIST
    kernel.bpf.map_update_elem(m, bytes(4), bytes(8), bpf.BPF_EXIST)


def test_array_delete_is_einval(kernel: MockKernel) -> None:
    m = kernel.bpf.map_create_array(8, 1)
    assert errno_of(lambda: kernel.bpf.map_delete_elem(m, bytes(4))) == errno.EINVAL


def test_map_create_of_another_type_is_einval(kernel: MockKernel) -> None:
    assert errno_of(lambda: raw(kernel, bpf.BPF_MAP_CREATE, "=IIIII", 1, 4, 8, 16, 0)) == errno.EINVAL
    assert errno_of(lambda: raw(kernel, bpf.BPF_MAP_CREATE, "=IIIII", 2, 8, 8, 16, 0)) == errno.EINVAL


def test_map_calls_on_a_program_fd_are_einval(kernel: MockKernel) -> None:
    assert errno_of(lambda: kernel.bpf.map_update(load(kernel), 0, bytes(8))) == errno.EINVAL


# -- pins -------------------------------------------------------------------------------------------------------
def test_pin_errnos(kernel: MockKernel) -> None:
    m = kernel.bpf.map_create_array(8, 1)
    kernel.pins.pin_object(m, "/sys/fs/bpf/rec")
    assert errno_of(lambda: kernel.pins.pin_object(m, "/sys/fs/bpf/rec")) == errno.EEXIST
    assert errno_of(lambda: kernel.pins.get_object("/sys/fs/bpf/none")) == errno.ENOENT
    assert errno_of(lambda: kernel.pins.pin_object(m, "/sys/fs/bpf/rec/below")) == errno.ENOTDIR
    assert not kernel.pins.unpin("/sys/fs/bpf/none")
    assert kernel.pins.unpin("/sys/fs/bpf/rec") and not kernel.pins.unpin("/sys/fs/bpf/rec")


def test_pin_paths_follow_the_real_rules(kernel: MockKernel) -> None:
    m = kernel.bpf.map_create_array(8, 1)
    for bad, why in (("relative/p", "not absolute"), ("/sys/fs/bpf/../p", "'..'"),
                     ("/sys/fs/bpf/", "directory"), ("/a\0b", "NUL")):
        with pytest.raises(ValueError, match=why):
            kernel.pins.pin_object(m, bad)
    with pytest.raises(asynctc.PinError) as exc:
        kernel.pins.pin_object(m, "/sys/fs/bpf/a.b")
    assert exc.value.errno == errno.EPERM
    kernel.pins.pin_object(m, "/sys/fs/bpf//./x/p")  # normalised, as the real one does
    assert set(kernel.pins()) == {"/sys/fs/bpf/x/p"}
    assert not os.path.exists("/sys/fs/bpf/x/p")  # nothing touched the real filesystem


def test_pin_holds_a_map_and_read_pinned_value(kernel: MockKernel) -> None:
    m = kernel.bpf.map_create_array(8, 1)
    kernel.bpf.map_update(m, 0, b"record!!")
    kernel.pins.pin_object(m, "/p/rec")
    kernel.bpf.close(m)
    assert kernel.pins.read_pinned_value("/p/rec", 8) == b"record!!"
    assert kernel.pins.read_pinned_value("/p/rec", 16) is None  # another shape
    assert kernel.pins.read_pinned_value("/p/none", 8) is None
    prog = load(kernel)
    kernel.pins.pin_object(prog, "/p/prog")
    kernel.bpf.close(prog)
    assert kernel.pins.read_pinned_value("/p/prog", 8) is None  # not a map
    assert kernel.fds() == {}  # every fd the calls above opened was closed


def test_pin_over_replaces_atomically_and_rename_over(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    old = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    new = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    kernel.pins.pin_object(old, "/p/att")
    kernel.bpf.close(old)
    kernel.pins.pin_over(new, "/p/att", "_next")
    kernel.bpf.close(new)
    assert list(kernel.pins()) == ["/p/att"]
    assert len(ids(kernel, dev)) == 1  # the old link lost its last reference, the pin
    assert not kernel.pins.rename_over("/p/att", "_next")
    m = kernel.bpf.map_create_array()
    kernel.pins.pin_object(m, "/p/att_next")
    assert kernel.pins.rename_over("/p/att", "_next")
    assert kernel.pins() == {"/p/att": f"map {kernel.bpf.map_info(m).id}"} and ids(kernel, dev) == ()


def test_obj_get_of_a_prog_pin(kernel: MockKernel) -> None:
    prog = kernel.program("drop")
    kernel.pins.pin_object(prog.fd, "/p/prog")
    fd = kernel.pins.get_object("/p/prog")
    assert kernel.bpf.prog_info(fd).id == prog.id and kernel.bpf.prog_test_run(fd) == 2


# -- instrumentation, processes -------------------------------------------------------------------------------
def test_injected_fault_fails_the_call_and_changes_nothing(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    a = load(kernel)
    kernel.inject_fault("link_create", errno.EIO)
    with pytest.raises(BpfError) as exc:
        kernel.bpf.link_create_tcx(a, dev, IN)
    assert exc.value.errno == errno.EIO and exc.value.op == "link_create"
    assert ids(kernel, dev) == () and revision(kernel, dev) == 1
    link = kernel.bpf.link_create_tcx(a, dev, IN)
    kernel.inject_fault("link_update_cas", errno.EAGAIN)
    assert errno_of(lambda: kernel.bpf.link_update(link, load(kernel), old_prog_fd=a)) == errno.EAGAIN
    kernel.inject_fault("obj_pin", errno.ENOSPC)
    assert errno_of(lambda: kernel.pins.pin_object(link, "/p/x")) == errno.ENOSPC
    assert kernel.calls["link_create"] == 2 and kernel.pins() == {}


def test_latency_blocks_the_calling_thread_holding_the_lock(kernel: MockKernel) -> None:
    import time

    kernel.set_latency(0.05, "link_create")
    a = load(kernel)
    t0 = time.monotonic()
    done: list[float] = []

    def attach() -> None:
        kernel.bpf.link_create_tcx(a, eth0(kernel), IN)
        done.append(time.monotonic())

    th = threading.Thread(target=attach)
    th.start()
    th.join()
    assert done[0] - t0 >= 0.05


def test_kill_process_closes_its_fds(kernel: MockKernel) -> None:
    dev = eth0(kernel)
    tag = f"svc:{os.getpid()}.999999.1"
    with kernel.process(tag):
        mine = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
        pinned = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
        kernel.pins.pin_object(pinned, "/p/pinned")
    kept = kernel.bpf.link_create_tcx(load(kernel), dev, IN)
    assert kernel.tagged(tag) == (("tcx", lid(kernel, mine)), ("tcx", lid(kernel, pinned)))
    kernel.kill_process(tag)
    assert len(ids(kernel, dev)) == 2 and lid(kernel, kept) in kernel.bpf.prog_query(dev, IN).link_ids
    assert errno_of(lambda: kernel.bpf.link_info(mine)) == errno.EBADF  # a dead process's fd
    kernel.bpf.close(mine)
    assert not kernel.session_alive(tag)
    from asynctc.lowlevel.tcpolicy import process_start_time

    real_start = process_start_time(os.getpid())
    assert real_start is not None and kernel.session_alive(f"svc:{os.getpid()}.{real_start}.2")  # the real answer
    assert not kernel.session_alive(f"svc:{os.getpid()}.{int(real_start) + 1}.1")  # no such process
    assert not kernel.tag_alive(tag)


def test_same_state_for_both_apis(kernel: MockKernel) -> None:
    prog = kernel.program()
    link_id = kernel.link_create("eth0", Direction.INGRESS, prog.id)
    fd = kernel.bpf.link_get_fd_by_id(link_id)
    kernel.link_close(link_id)
    assert kernel.bpf.prog_query(eth0(kernel), IN).link_ids == (link_id,)  # the fd holds it
    kernel.bpf.close(fd)
    assert kernel.hook("eth0", "ingress").entries == ()



@pytest.mark.parametrize("op", ["close", "dup"])
def test_close_and_dup_latency_applies(kernel: MockKernel, op: Literal["close", "dup"]) -> None:
    """Closing an attached link's last fd waits on the real kernel (the detach): latency under "close"
    delays close(), latency under "dup" delays dup(), and neither delays other calls."""
    prog = load(kernel)
    link = kernel.bpf.link_create_tcx(prog, eth0(kernel), IN)
    kernel.set_latency(0.1, op=op)
    t0 = time.monotonic()
    kernel.bpf.prog_query(eth0(kernel), IN)
    assert time.monotonic() - t0 < 0.1
    t0 = time.monotonic()
    if op == "dup":
        extra = kernel.bpf.dup(link)
        assert time.monotonic() - t0 >= 0.1
        kernel.set_latency(0, op=op)
        kernel.bpf.close(extra)
        kernel.bpf.close(link)
    else:
        kernel.bpf.close(link)
        assert time.monotonic() - t0 >= 0.1
        kernel.set_latency(0, op=op)
    assert kernel.bpf.prog_query(eth0(kernel), IN).prog_ids == ()  # the last close detached it
    assert kernel.calls[op] >= 1
    kernel.bpf.close(prog)


LinkUpdateCase = Literal["detached_other_type", "other_type", "already_on_hook", "cas_mismatch",
                         "detached_cas_mismatch", "same_program", "swap"]


def _link_update_answer(case: LinkUpdateCase, path: Literal["bpf", "api"]) -> tuple[int | None, int, tuple[int, ...]]:
    """One BPF_LINK_UPDATE case through the bpf(2) call or the high-level `link_update`, on a fresh kernel:
    (errno or None, the hook's revision after, its program ids after)."""
    kernel = MockKernel()
    try:
        a, b = kernel.program(), kernel.program()
        xdp = kernel.program(prog_type=bpf.BPF_PROG_TYPE_XDP)
        new = {"detached_other_type": xdp, "other_type": xdp, "already_on_hook": b}.get(case, b)
        if case == "same_program":
            new = a
        old = b if case in ("cas_mismatch", "detached_cas_mismatch") else None
        if path == "bpf":
            link_fd = kernel.bpf.link_create_tcx(a.fd, eth0(kernel), IN)
            link_id = lid(kernel, link_fd)
        else:
            link_id = kernel.link_create("eth0", Direction.INGRESS, a.id)
        if case == "already_on_hook":
            kernel.link_create("eth0", Direction.INGRESS, b.id)
        if case.startswith("detached"):
            kernel.link_detach(link_id)
        err: int | None = None
        try:
            if path == "bpf":
                kernel.bpf.link_update(link_fd, new.fd, old_prog_fd=old.fd if old is not None else None)
            else:
                kernel.link_update(link_id, new.id, old_prog_id=old.id if old is not None else None)
        except (BpfError, KernelError) as exc:
            err = exc.errno
        q = kernel.prog_query("eth0", Direction.INGRESS)
        return err, q.revision, tuple(e.prog_id - SIM_PROG_ID_BASE for e in q.entries)
    finally:
        kernel.close()


@pytest.mark.parametrize("case", ["detached_other_type", "other_type", "already_on_hook", "cas_mismatch",
                                  "detached_cas_mismatch", "same_program", "swap"])
def test_link_update_answers_the_same_through_bpf_and_the_high_level_api(case: LinkUpdateCase) -> None:
    """The high-level `link_update` is the bpf(2) call's rules, not a copy of them: a detached link answers
    ENOLINK before the program's type is looked at, as tcx_link_update does."""
    expected = {"detached_other_type": errno.ENOLINK, "other_type": errno.EINVAL,
                "already_on_hook": errno.EEXIST, "cas_mismatch": errno.EPERM,
                "detached_cas_mismatch": errno.ENOLINK}.get(case)
    answers = {path: _link_update_answer(case, path) for path in ("bpf", "api")}
    assert answers["bpf"][0] == expected
    assert answers["api"] == answers["bpf"]


def test_latency_queues_kernel_calls_but_not_fd_dup_and_close(kernel: MockKernel) -> None:
    """A call sleeping for its injected latency holds up the calls behind it (as rtnl does), never a dup or
    close of a program fd (the netlink backend makes those on the trio thread: they must not wait)."""
    prog = load(kernel)
    kernel.set_latency(0.5, op="link_create")
    started = threading.Event()
    assert not kernel.calls["link_create"]

    def slow_attach() -> None:
        started.set()
        kernel.bpf.close(kernel.bpf.link_create_tcx(prog, eth0(kernel), IN))

    th = threading.Thread(target=slow_attach)
    th.start()
    started.wait()
    deadline = time.monotonic() + 5
    while not kernel.calls["link_create"]:  # counted as it goes to sleep in the kernel
        assert time.monotonic() < deadline
        time.sleep(0.001)
    t0 = time.monotonic()
    dup = kernel.bpf.dup(prog)
    kernel.bpf.close(dup)
    fast = time.monotonic() - t0
    kernel.bpf.prog_query(eth0(kernel), IN)  # a kernel call: it waits for the attach to finish
    queued = time.monotonic() - t0
    th.join()
    assert fast < 0.2 and queued > 0.3, (fast, queued)
