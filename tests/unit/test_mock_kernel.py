"""The MockKernel's own rules (KERNEL.md), driven directly, without a session."""

from __future__ import annotations

import ast
import errno
import math
import threading
import time
from pathlib import Path

import pytest

from asynctc import Direction
from asynctc.lowlevel import bpf
from asynctc_mock import MAX_TCX_PROGS, KernelError, MockKernel
from asynctc_mock._kernel import OPERATIONS

IN = Direction.INGRESS


def _errno(exc: pytest.ExceptionInfo[KernelError]) -> int | None:
    return exc.value.errno


def test_revision_counts_and_resets_without_clsact(kernel: MockKernel) -> None:
    a, b = kernel.program(), kernel.program()
    assert kernel.hook("eth0", IN).revision == 1
    la = kernel.link_create("eth0", IN, a.id)
    lb = kernel.link_create("eth0", IN, b.id)
    assert kernel.hook("eth0", IN).revision == 3
    kernel.link_detach(la)
    assert kernel.hook("eth0", IN).revision == 4
    kernel.link_detach(lb)
    assert kernel.hook("eth0", IN).revision == 1  # the hook was freed with its last program


def test_revision_goes_on_while_clsact_exists_and_resets_with_it(kernel: MockKernel) -> None:
    a = kernel.program()
    kernel.qdisc_add("eth0", creator="x")
    la = kernel.link_create("eth0", IN, a.id)
    lb = kernel.link_create("eth0", IN, kernel.program().id)
    kernel.link_detach(la)
    kernel.link_detach(lb)
    assert kernel.hook("eth0", IN).revision == 5
    kernel.link_create("eth0", IN, a.id)
    assert kernel.hook("eth0", IN).revision == 6
    kernel.link_detach(kernel.hook("eth0", IN).entries[0].link_id)
    assert kernel.hook("eth0", IN).revision == 7
    kernel.qdisc_delete("eth0")
    assert kernel.hook("eth0", IN).revision == 1


def test_anchors_and_their_errors(kernel: MockKernel) -> None:
    p = [kernel.program(name=f"p{i}") for i in range(5)]
    l0 = kernel.link_create("eth0", IN, p[0].id)
    kernel.link_create("eth0", IN, p[1].id, before=True)  # prepend
    kernel.link_create("eth0", IN, p[2].id, after=True, relative_id=l0, relative_is_link=True)
    kernel.link_create("eth0", IN, p[3].id, before=True, relative_id=p[2].id)
    assert kernel.hook("eth0", IN).prog_ids == (p[1].id, p[0].id, p[3].id, p[2].id)
    with pytest.raises(KernelError) as e:
        kernel.link_create("eth0", IN, p[4].id, before=True, relative_id=999)
    assert _errno(e) == errno.ENOENT
    with pytest.raises(KernelError) as e:
        kernel.link_create("eth0", IN, p[4].id, before=True, after=True)
    assert _errno(e) == errno.ERANGE
    with pytest.raises(KernelError) as e:
        kernel.link_create("eth0", IN, p[0].id)
    assert _errno(e) == errno.EEXIST
    with pytest.raises(KernelError) as e:
        kernel.link_create("eth0", IN, p[4].id, expected_revision=2)
    assert _errno(e) == errno.ESTALE
    kernel.link_create("eth0", IN, p[4].id, expected_revision=kernel.hook("eth0", IN).revision)
    assert len(kernel.hook("eth0", IN).entries) == 5


def test_the_64th_program_is_refused(kernel: MockKernel) -> None:
    for _ in range(MAX_TCX_PROGS):
        kernel.link_create("veth0", IN, kernel.program().id)
    before = kernel.hook("veth0", IN)
    with pytest.raises(KernelError) as e:
        kernel.link_create("veth0", IN, kernel.program().id)
    assert _errno(e) == errno.ERANGE
    assert kernel.hook("veth0", IN) == before


def test_non_sched_cls_program_is_refused(kernel: MockKernel) -> None:
    xdp = kernel.program(prog_type=bpf.BPF_PROG_TYPE_XDP)
    with pytest.raises(KernelError) as e:
        kernel.link_create("eth0", IN, xdp.id)
    assert _errno(e) == errno.EINVAL
    with pytest.raises(KernelError) as e:
        kernel.link_create("nope0", IN, kernel.program().id)
    assert _errno(e) == errno.ENODEV


def test_link_update_compare_and_swap(kernel: MockKernel) -> None:
    a, b, c = kernel.program(), kernel.program(), kernel.program()
    link = kernel.link_create("eth0", IN, a.id)
    rev = kernel.hook("eth0", IN).revision
    kernel.link_update(link, a.id)  # same program: success, no new revision
    assert kernel.hook("eth0", IN).revision == rev
    with pytest.raises(KernelError) as e:
        kernel.link_update(link, c.id, old_prog_id=b.id)
    assert _errno(e) == errno.EPERM
    assert kernel.hook("eth0", IN).prog_ids == (a.id,)
    kernel.link_update(link, c.id, old_prog_id=a.id)
    assert kernel.hook("eth0", IN).prog_ids == (c.id,)
    assert kernel.hook("eth0", IN).revision == rev + 1


def test_device_removal_severs_links(kernel: MockKernel) -> None:
    a = kernel.program()
    link = kernel.link_create("veth1", IN, a.id)
    kernel.qdisc_add("veth1")
    kernel.filter_add("veth1", IN, kernel.program().id, priority=5)
    kernel.remove_device("veth1")
    info = kernel.link_info(link)
    assert info.ifindex == 0
    with pytest.raises(KernelError) as e:
        kernel.link_update(link, kernel.program().id)
    assert _errno(e) == errno.ENOLINK
    kernel.link_detach(link)  # succeeds on a severed link, as the kernel's does
    with pytest.raises(KernelError) as e:
        kernel.prog_query("veth1", IN)
    assert _errno(e) == errno.ENODEV
    new = kernel.add_device("veth1")
    assert kernel.hook(new, IN).revision == 1
    assert kernel.qdisc(new) is None


def test_closing_the_last_fd_detaches_unless_pinned(kernel: MockKernel) -> None:
    a, b = kernel.program(), kernel.program()
    la = kernel.link_create("eth0", IN, a.id)
    lb = kernel.link_create("eth0", IN, b.id)
    kernel.obj_pin(lb, "/sys/fs/bpf/b")
    kernel.link_close(la)
    kernel.link_close(lb)
    assert kernel.hook("eth0", IN).prog_ids == (b.id,)
    kind, got = kernel.obj_get("/sys/fs/bpf/b")
    assert (kind, got) == ("link", lb)
    kernel.obj_unpin("/sys/fs/bpf/b")
    assert kernel.hook("eth0", IN).prog_ids == (b.id,)  # obj_get's holder keeps it
    kernel.link_close(lb)
    assert kernel.hook("eth0", IN).prog_ids == ()
    with pytest.raises(KernelError) as e:
        kernel.obj_pin(la, "relative/path")
    assert _errno(e) == errno.EINVAL


def test_filters_excl_replace_delete(kernel: MockKernel) -> None:
    a, b = kernel.program(), kernel.program()
    with pytest.raises(KernelError) as e:
        kernel.filter_add("eth0", IN, a.id, priority=3)
    assert _errno(e) == errno.ENOENT  # no clsact
    kernel.qdisc_add("eth0", creator="me")
    f = kernel.filter_add("eth0", IN, a.id, priority=3, name="mine")
    assert (f.priority, f.handle, f.in_hw) == (3, 1, False)
    with pytest.raises(KernelError) as e:
        kernel.filter_add("eth0", IN, b.id, priority=3, handle=1)
    assert _errno(e) == errno.EEXIST
    kernel.filter_add("eth0", IN, b.id, priority=3, handle=1, excl=False)  # CREATE|REPLACE
    assert kernel.filters("eth0", IN)[0].prog_id == b.id
    kernel.filter_replace("eth0", IN, 3, 1, a.id)
    assert kernel.filters("eth0", IN)[0].prog_id == a.id
    # Priority 0: the kernel picks one below the lowest priority from 0x8000 up, 0xC000 when none is
    # there (priority 3 does not count).
    auto = kernel.filter_add("eth0", IN, b.id)
    assert auto.priority == 0xC000
    assert kernel.filter_add("eth0", IN, b.id).priority == 0xBFFF
    kernel.filter_delete("eth0", IN, 3, 1)
    with pytest.raises(KernelError) as e:
        kernel.filter_delete("eth0", IN, 3, 1)
    assert _errno(e) == errno.ENOENT
    with pytest.raises(KernelError) as e:
        kernel.filter_replace("eth0", IN, 3, 1, a.id)
    assert _errno(e) == errno.ENOENT
    kernel.qdisc_delete("eth0")
    assert kernel.filters("eth0", IN) == ()


def test_ingress_qdisc_blocks_clsact_and_kinds_do_not_mix(kernel: MockKernel) -> None:
    kernel.qdisc_add("eth0", "ingress", creator="tc")
    with pytest.raises(KernelError) as e:
        kernel.qdisc_add("eth0", "clsact")
    assert _errno(e) == errno.EEXIST
    with pytest.raises(KernelError) as e:
        kernel.filter_add("eth0", Direction.EGRESS, kernel.program().id, priority=1)
    assert _errno(e) == errno.ENOENT
    kernel.add_foreign_filter("eth0", IN, priority=7)
    with pytest.raises(KernelError) as e:
        kernel.filter_add("eth0", IN, kernel.program().id, priority=7, handle=2)
    assert _errno(e) == errno.EINVAL


def test_skip_sw_needs_an_offload_device(kernel: MockKernel) -> None:
    nic = kernel.add_device("nic0", offload=True)
    for dev in ("veth0", nic):
        kernel.qdisc_add(dev)
    with pytest.raises(KernelError) as e:
        kernel.filter_add("veth0", IN, kernel.program().id, priority=1, skip_sw=True)
    assert (e.value.errno, e.value.op) == (errno.EINVAL, "filter_add_hw")
    f = kernel.filter_add(nic, IN, kernel.program().id, priority=1, skip_sw=True)
    assert f.in_hw and f.skip_sw
    bad = kernel.program(offloadable=False)
    with pytest.raises(KernelError) as e:
        kernel.filter_replace(nic, IN, 1, 1, bad.id)
    assert e.value.op == "filter_replace_hw"
    assert kernel.filters(nic, IN)[0].prog_id == f.prog_id


def test_send_runs_tcx_in_order_then_filters_by_priority(kernel: MockKernel) -> None:
    n1, n2, f_next, f_drop, late = (kernel.program("next"), kernel.program("next"), kernel.program("next"),
                                    kernel.program("drop"), kernel.program("pass"))
    kernel.link_create("eth0", IN, n1.id)
    kernel.link_create("eth0", IN, n2.id)
    kernel.qdisc_add("eth0")
    kernel.filter_add("eth0", IN, late.id, priority=30)
    kernel.filter_add("eth0", IN, f_drop.id, priority=20)
    kernel.filter_add("eth0", IN, f_next.id, priority=10)
    assert kernel.send("eth0", IN, 4) == "drop"
    assert [p.count() for p in (n1, n2, f_next, f_drop, late)] == [4, 4, 4, 4, 0]
    stop = kernel.program("pass")
    kernel.link_create("eth0", IN, stop.id, before=True)
    assert kernel.send("eth0", IN) == "pass"
    assert (stop.count(), n1.count(), f_drop.count()) == (1, 4, 4)
    assert kernel.send("eth0", Direction.EGRESS) == "pass"  # nobody decides: it passes


def test_send_runs_real_programs_through_test_run(kernel: MockKernel, root: None) -> None:
    from asynctc import programs

    counter = programs.counting("next")  # (`with` would type it as a plain Program)
    with counter, programs.constant("drop") as dropper:
        kernel.link_create("eth0", IN, kernel.register_program(counter))
        kernel.link_create("eth0", IN, kernel.register_program(dropper))
        assert kernel.send("eth0", IN, 3) == "drop"
        assert counter.count() == 3
    # The kernel keeps its own references: the closed handles do not stop the programs.
    assert kernel.send("eth0", IN) == "drop"
    kernel.close()


def test_fault_injection_nth_and_times(kernel: MockKernel) -> None:
    kernel.inject_fault("link_create", errno.EBUSY, nth=2, times=2)
    kernel.link_create("eth0", IN, kernel.program().id)
    for _ in range(2):
        with pytest.raises(KernelError) as e:
            kernel.link_create("eth0", IN, kernel.program().id)
        assert _errno(e) == errno.EBUSY
    kernel.link_create("eth0", IN, kernel.program().id)
    assert kernel.calls["link_create"] == 4
    assert len(kernel.hook("eth0", IN).entries) == 2


@pytest.mark.parametrize(("op", "close"), [("link_creat", "link_create"), ("filter_ad", "filter_add"),
                                           ("bogus", None)])
def test_inject_fault_refuses_an_unknown_operation(kernel: MockKernel, op: str, close: str | None) -> None:
    with pytest.raises(ValueError, match=repr(op)) as exc:
        kernel.inject_fault(op, errno.EBUSY)
    if close is not None:
        assert repr(close) in str(exc.value).split("did you mean", 1)[1].split("?")[0]
    kernel.link_create("eth0", IN, kernel.program().id)  # nothing was recorded


@pytest.mark.parametrize("op", ["close", "dup"])
def test_inject_fault_refuses_close_and_dup(kernel: MockKernel, op: str) -> None:
    with pytest.raises(ValueError, match=repr(op)):
        kernel.inject_fault(op, errno.EIO)


def test_set_latency_refuses_an_unknown_operation(kernel: MockKernel) -> None:
    with pytest.raises(ValueError, match="'bogus'"):
        kernel.set_latency(1, op="bogus")
    with pytest.raises(ValueError, match="'link_creat'.*'link_create'"):
        kernel.set_latency(1, op="link_creat")
    t0 = time.monotonic()
    kernel.link_create("eth0", IN, kernel.program().id)
    assert time.monotonic() - t0 < 0.5  # no latency was recorded under any name


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -math.inf, -0.5])
def test_set_latency_refuses_nan_inf_and_negative(kernel: MockKernel, seconds: float) -> None:
    with pytest.raises(ValueError, match=repr(seconds)):
        kernel.set_latency(seconds, op="link_create")
    with pytest.raises(ValueError, match=repr(seconds)):
        kernel.set_latency(seconds)


def _op_names_in(path: Path, funcs: set[str]) -> set[str]:
    """The string constants passed to calls of `funcs` and assigned to a variable `op` in a source file."""
    names: set[str] = set()

    def strings(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Dict):
            return {s for v in node.values for s in strings(v)}
        return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in funcs:
                for arg in node.args:
                    names |= strings(arg)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "op" for t in node.targets):
            names |= strings(node.value)
    return names


def test_operations_name_every_operation_the_code_uses() -> None:
    """OPERATIONS is the one list: every op name the mock counts and bpf.Bpf passes to the syscalls is in it."""
    root = Path(__file__).resolve().parents[2]
    used = _op_names_in(root / "asynctc" / "lowlevel" / "bpf.py", {"_sys_bpf", "_get_info", "_elem_call", "_fd_by_id"})
    assert {"prog_load", "link_update_cas", "map_info"} <= used  # the scan sees the calls
    for name in ("_kernel.py", "_syscalls.py", "_rtnl.py"):
        used |= _op_names_in(root / "plugins" / "asynctc_mock" / name, {"_enter", "_delay", "_hw_step"})
    assert {"dev_get", "close", "dup", "filter_add_hw", "link_dump", "qdisc_delete"} <= used
    assert used - OPERATIONS == set()
    assert OPERATIONS - used == set()


def test_latency_blocks_the_calling_thread_and_serialises(kernel: MockKernel) -> None:
    kernel.set_latency(0.05, op="link_create")
    progs = [kernel.program() for _ in range(3)]
    t0 = time.monotonic()
    threads = [threading.Thread(target=kernel.link_create, args=("eth0", IN, p.id)) for p in progs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive(), "link_create still blocked after 10 s"
    assert time.monotonic() - t0 >= 0.15  # under one lock, as under rtnl
    assert len(kernel.hook("eth0", IN).entries) == 3
    kernel.set_latency(0, op="link_create")
    t0 = time.monotonic()
    kernel.link_create("eth0", IN, kernel.program().id)
    assert time.monotonic() - t0 < 0.05


def test_kill_process_drops_unpinned_links_keeps_filters(kernel: MockKernel) -> None:
    tag = "svc:1.2.3"
    a, b = kernel.program(), kernel.program()
    kernel.link_create("eth0", IN, a.id, creator=tag)
    pinned = kernel.link_create("eth0", IN, b.id, creator=tag)
    kernel.obj_pin(pinned, "/bpf/p")
    kernel.qdisc_add("eth0", creator=tag)
    kernel.filter_add("eth0", IN, a.id, priority=1, name=tag)
    kernel.kill_process(tag)
    assert kernel.hook("eth0", IN).prog_ids == (b.id,)
    assert len(kernel.filters("eth0", IN)) == 1
    assert not kernel.tag_alive(tag)


@pytest.mark.parametrize("tag", ["not a tag", "owner:1.2", "a b:1.2.3", "", "svc:1.2.3"])
def test_tag_alive_agrees_with_session_alive(kernel: MockKernel, tag: str) -> None:
    """One answer for one tag: what cannot be parsed counts as alive for both (nothing is reaped whose
    owner cannot be told); a parsable one is alive for neither once killed."""
    assert kernel.tag_alive(tag) is kernel.session_alive(tag)
    if tag == "svc:1.2.3":
        kernel.kill_process(tag)
        assert kernel.tag_alive(tag) is kernel.session_alive(tag) is False
    else:
        assert kernel.tag_alive(tag) is True


def test_devices_as_a_str_is_a_type_error_naming_the_fix() -> None:
    with pytest.raises(TypeError, match=r"tuple of names.*\('eth0',\)"):
        MockKernel(devices="eth0")


@pytest.mark.parametrize("devices", [(1,), ("eth0", None)])
def test_device_names_must_be_str(devices: tuple[object, ...]) -> None:
    with pytest.raises(TypeError, match="device name must be a str"):
        MockKernel(devices=devices)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "a" * 16, "é" * 8, "a/b", "a:b", "a b", "tab\t", "nul\0", ".", ".."])
def test_invalid_device_names_are_value_errors(kernel: MockKernel, name: str) -> None:
    with pytest.raises(ValueError, match="invalid device name"):
        MockKernel(devices=("lo", name))
    with pytest.raises(ValueError, match="invalid device name"):
        kernel.add_device(name)
    assert name not in kernel.devices()


def test_device_names_are_unique() -> None:
    with pytest.raises(ValueError, match="unique.*'eth0'"):
        MockKernel(devices=("lo", "eth0", "eth0"))
    k = MockKernel(devices=("lo", "a" * 15, "x.y", "eth0.100"))
    try:
        assert list(k.devices()) == ["lo", "a" * 15, "x.y", "eth0.100"]
        with pytest.raises(KernelError) as exc:  # at run time, as `ip link add` answers
            k.add_device("lo")
        assert exc.value.errno == errno.EEXIST
    finally:
        k.close()


@pytest.mark.parametrize("what", ["x", 7, None])
def test_register_program_takes_a_program(kernel: MockKernel, what: object) -> None:
    with pytest.raises(TypeError, match=r"asynctc\.Program"):
        kernel.register_program(what)  # type: ignore[arg-type]


def test_device_names_answer_from_the_device_table_without_sleeping(kernel: MockKernel) -> None:
    """`open_device_names` (the real kernel's SIOCGIF* ioctls on a socket of the namespace): the device table
    as it is at each call, counted and faulted as "dev_get", never sleeping injected latency (the real
    ioctls never sleep, and they are made on the trio thread); closed, it answers nothing (EBADF)."""
    names = kernel.open_device_names()
    assert (names.if_nametoindex("eth0"), names.if_indextoname(2)) == (2, "eth0")
    kernel.add_device("late0")
    ifindex = names.if_nametoindex("late0")
    assert names.if_indextoname(ifindex) == "late0"
    kernel.remove_device("late0")
    with pytest.raises(OSError, match="no device named 'late0'") as by_name:
        names.if_nametoindex("late0")
    assert by_name.value.errno == errno.ENODEV
    with pytest.raises(OSError, match="no device with ifindex") as by_index:
        names.if_indextoname(ifindex)
    assert by_index.value.errno == errno.ENXIO
    before = kernel.calls["dev_get"]
    kernel.set_latency(0.5)
    kernel.set_latency(0.5, "dev_get")
    t0 = time.monotonic()
    assert names.if_nametoindex("veth0") == 3
    assert time.monotonic() - t0 < 0.25  # the latency is not slept
    kernel.set_latency(0)
    kernel.set_latency(0, "dev_get")
    assert kernel.calls["dev_get"] == before + 1
    kernel.inject_fault("dev_get", errno.EIO)
    with pytest.raises(OSError, match="injected fault") as faulted:
        names.if_indextoname(1)
    assert faulted.value.errno == errno.EIO
    names.close()
    names.close()  # idempotent
    with pytest.raises(OSError, match="closed") as closed:
        names.if_nametoindex("eth0")
    assert closed.value.errno == errno.EBADF
    assert kernel.if_nametoindex("eth0") == 2  # the kernel's own lookups are another way in
