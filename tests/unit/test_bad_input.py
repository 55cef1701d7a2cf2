"""The bad-input catalogue, on the mock: every public call, given a value out of its C field's range or of
the wrong type, raises TypeError/ValueError (programmer error) or the specific TCError subclass, with a
message naming the culprit, and leaves nothing behind in the kernel or the session.

(Real-kernel-only cases, such as the raw bpf(2) calls, are in tests/integration/test_bad_input_kernel.py.)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any

import pytest
from _mockutil import kernel_entries

import asynctc
from asynctc import After, Before, programs
from asynctc.lowlevel import bpf
from asynctc.lowlevel.pins import check_path
from asynctc_mock import MockKernel

U32 = 2**32
U64 = 2**64


def assert_nothing_left(kernel: MockKernel, session: asynctc.Session) -> None:
    assert kernel_entries(kernel) == set()
    assert kernel.pins() == {}
    assert session.attachments == ()
    assert all(kernel.qdisc(name) is None for name in kernel.devices())


async def expect(exc: type[BaseException], culprit: str, call: Callable[[], Awaitable[Any]]) -> None:
    with pytest.raises(exc) as info:
        await call()
    assert re.search(culprit, str(info.value)), (culprit, str(info.value))


# (argument overrides, exception, a regex the message must contain)
ATTACH_CASES: list[tuple[dict[str, Any], type[BaseException], str]] = [
    ({"dev": 1.5}, TypeError, r"dev must be a device name or an ifindex.*float 1\.5"),
    ({"dev": True}, TypeError, r"dev must be .*bool True"),
    ({"dev": None}, TypeError, r"dev must be .*NoneType"),
    ({"dev": b"eth0"}, TypeError, r"dev must be .*bytes"),
    ({"dev": -1}, ValueError, r"ifindex must be in 1\.\.2147483647, got -1"),
    ({"dev": 2**31}, ValueError, r"ifindex must be in 1\.\.2147483647, got 2147483648"),
    ({"dev": U64}, ValueError, r"ifindex must be in 1\.\.2147483647"),
    ({"dev": 0}, asynctc.DeviceNotFound, r"ifindex must be positive, got 0"),
    ({"dev": ""}, asynctc.DeviceNotFound, r"'' is not a valid device name"),
    ({"dev": "x" * 16}, asynctc.DeviceNotFound, r"'x{16}' is not a valid device name"),
    ({"dev": "a\0b"}, asynctc.DeviceNotFound, r"not a valid device name"),
    ({"dev": "nope0"}, asynctc.DeviceNotFound, r"nope0"),
    ({"direction": 3}, ValueError, r"direction must be 'ingress' or 'egress'.*got 3"),
    ({"direction": None}, ValueError, r"direction must be .*got None"),
    ({"direction": "sideways"}, ValueError, r"direction must be .*'sideways'"),
    ({"program": "x"}, asynctc.ProgramError, r"program must be an asynctc\.Program, got str"),
    ({"program": 5}, asynctc.ProgramError, r"program must be an asynctc\.Program, got int"),
    ({"position": "junk"}, TypeError, r"position must be .*'junk'"),
    ({"position": 0}, TypeError, r"position must be"),
    ({"position": Before(U32)}, ValueError, r"anchor program id must be in 1\.\.2\*\*32-1, got 4294967296"),
    ({"position": After(-1)}, TypeError, r"anchor is a Program, an Attachment or a positive program id, got -1"),
    ({"position": Before(1.5)}, TypeError, r"anchor .* got 1\.5"),  # type: ignore[arg-type]
    ({"position": Before("x")}, TypeError, r"anchor .* got 'x'"),  # type: ignore[arg-type]
    ({"expected_revision": U64}, ValueError, r"expected_revision must be None or an int in 0\.\.2\*\*64-1.*"
                                             r"18446744073709551616"),
    ({"expected_revision": -1}, ValueError, r"expected_revision must be .*got -1"),
    ({"expected_revision": 1.0}, ValueError, r"expected_revision must be .*got 1\.0"),
    ({"expected_revision": "1"}, ValueError, r"expected_revision must be .*got '1'"),
    ({"expected_revision": True}, ValueError, r"expected_revision must be .*got True"),
    ({"offload": "sometimes"}, ValueError, r"offload must be one of .*'sometimes'"),
    ({"offload": None}, ValueError, r"offload must be one of .*None"),
    ({"backend": 5}, TypeError, r"backend must be None or a backend name .*int 5"),
    ({"backend": "nope"}, asynctc.BackendUnavailable, r"no backend named 'nope'"),
]


@pytest.mark.parametrize(("override", "exc", "culprit"), ATTACH_CASES,
                         ids=[f"{next(iter(c[0]))}={next(iter(c[0].values()))!r}" for c in ATTACH_CASES])
async def test_attach_rejects(kernel: MockKernel, session: asynctc.Session, override: dict[str, Any],
                              exc: type[BaseException], culprit: str) -> None:
    args: dict[str, Any] = {"dev": "eth0", "direction": "ingress", "program": kernel.program("pass")}
    args.update(override)
    dev, direction, program = args.pop("dev"), args.pop("direction"), args.pop("program")
    await expect(exc, culprit, lambda: session.attach(dev, direction, program, **args))
    assert_nothing_left(kernel, session)

    async def via_block() -> None:
        async with session.open_attachment(dev, direction, program, **args):
            raise AssertionError("the block must not run")  # pragma: no cover

    await expect(exc, culprit, via_block)
    assert_nothing_left(kernel, session)


DEV_CASES: list[tuple[object, type[BaseException], str]] = [
    (2**31, ValueError, r"ifindex must be in 1\.\.2147483647"),
    (-5, ValueError, r"ifindex must be in 1\.\.2147483647, got -5"),
    (1.5, TypeError, r"dev must be"),
    (None, TypeError, r"dev must be"),
]


@pytest.mark.parametrize(("dev", "exc", "culprit"), DEV_CASES)
async def test_query_and_resolve_reject_bad_devices(kernel: MockKernel, session: asynctc.Session, dev: Any,
                                                    exc: type[BaseException], culprit: str) -> None:
    await expect(exc, culprit, lambda: session.query(dev, "ingress"))
    await expect(exc, culprit, lambda: session.resolve_device(dev))
    await expect(ValueError, r"direction must be .*got 7", lambda: session.query("eth0", 7))  # type: ignore[arg-type]
    assert_nothing_left(kernel, session)


PATH_CASES: list[tuple[object, type[BaseException], str]] = [
    (5, TypeError, r"pin path must be a str or an os\.PathLike\[str\], got int"),
    (None, TypeError, r"pin path must be .*NoneType"),
    (b"/sys/fs/bpf/x", TypeError, r"pin path must be .*bytes"),
    ("/sys/fs/bpf/a\0b", ValueError, r"contains a NUL byte \(at offset 13\)"),
    ("relative/pin", ValueError, r"'relative/pin' is not absolute"),
    ("", ValueError, r"'' is not absolute"),
    ("/sys/fs/bpf/../x", ValueError, r"has a '\.\.' component"),
    ("/sys/fs/bpf/..", ValueError, r"has a '\.\.' component"),
    ("/sys/fs/bpf/", ValueError, r"names a directory, not a file"),
    ("/", ValueError, r"names a directory"),
]


@pytest.mark.parametrize(("path", "exc", "culprit"), PATH_CASES)
async def test_pin_and_adopt_reject_bad_paths(kernel: MockKernel, session: asynctc.Session, path: Any,
                                              exc: type[BaseException], culprit: str) -> None:
    att = await session.attach("eth0", "ingress", kernel.program("pass"))
    await expect(exc, culprit, lambda: att.pin(path))
    assert not att.pinned and kernel.pins() == {}
    await expect(exc, culprit, lambda: session.adopt_pinned(path))
    assert session.attachments == (att,)
    await att.detach()
    assert_nothing_left(kernel, session)


def test_pin_paths_are_normalised() -> None:
    assert check_path("/sys/fs/bpf//a/./b") == "/sys/fs/bpf/a/b"
    assert check_path(PurePosixPath("/sys/fs/bpf/x")) == "/sys/fs/bpf/x"


async def test_update_rejects_wrong_types(kernel: MockKernel, session: asynctc.Session) -> None:
    p = kernel.program("pass")
    att = await session.attach("eth0", "ingress", p)
    for bad in ("x", 5, None, U64):
        await expect(asynctc.ProgramError, r"update\(\) takes an asynctc\.Program", functools.partial(att.update, bad))  # type: ignore[arg-type]
    await expect(asynctc.ProgramError, r"expected= takes an asynctc\.Program, got str",
                 lambda: att.update(kernel.program("drop"), expected="x"))  # type: ignore[arg-type]
    assert att.info.prog_id == p.id
    await att.detach()
    assert_nothing_left(kernel, session)


@pytest.mark.parametrize(("kwargs", "exc", "culprit"), [
    ({"backend": 5}, TypeError, r"backend must be a backend name \(str\), got int 5"),
    ({"netns": 5}, TypeError, r"netns must be None, a name under /run/netns or a path .*int 5"),
    ({"netns": b"ns"}, TypeError, r"netns must be .*bytes"),
    ({"netns": "a\0b"}, ValueError, r"netns must be a non-empty name or path without NUL"),
    ({"netns": ""}, ValueError, r"netns must be a non-empty name"),
    ({"netns": "/proc/self/ns/uts"}, asynctc.TCError, r"/proc/self/ns/uts is a uts namespace, not a network"),
    ({"netns": "/proc/self/ns/pid"}, asynctc.TCError, r"is a pid namespace, not a network namespace"),
    ({"netns": "/proc/self/status"}, asynctc.TCError, r"/proc/self/status is not a namespace file"),
    ({"netns": "no-such-ns-h11a"}, asynctc.TCError, r"network namespace 'no-such-ns-h11a' not found"),
    ({"owner": 5}, ValueError, r"owner must be a short tag .*got 5"),
    ({"owner": "a:b"}, ValueError, r"owner must be .*'a:b'"),
    ({"max_workers": 1.5}, TypeError, r"max_workers must be an int, got float 1\.5"),
    ({"max_workers": True}, TypeError, r"max_workers must be an int, got bool"),
    ({"max_workers": 0}, ValueError, r"max_workers must be >= 1, got 0"),
    ({"cleanup_timeout": "x"}, TypeError, r"cleanup_timeout must be a number of seconds, got str"),
    ({"cleanup_timeout": -1}, ValueError, r"cleanup_timeout must be > 0"),
    ({"cleanup_timeout": float("nan")}, ValueError, r"cleanup_timeout must be > 0"),
    ({"backend_options": 5}, TypeError, r"backend_options must be a mapping .*int 5"),
    ({"kernel": "x"}, TypeError, r"cannot run on 'x' \(kernel=\): it needs a asynctc_mock"),
])
async def test_open_session_rejects(kwargs: dict[str, Any], exc: type[BaseException], culprit: str) -> None:
    async def open_it() -> None:
        async with asynctc.open_session(**({"backend": "mock"} | kwargs)):
            raise AssertionError("the session must not open")  # pragma: no cover

    await expect(exc, culprit, open_it)


@pytest.mark.parametrize(("buffer", "exc", "culprit"), [
    (0, ValueError, r"buffer must be >= 1, got 0"),
    ("x", TypeError, r"buffer must be an int \(events\), got str"),
    (1.5, TypeError, r"buffer must be an int .*float"),
])
async def test_open_monitor_rejects(session: asynctc.Session, buffer: Any, exc: type[BaseException],
                                    culprit: str) -> None:
    async def open_it() -> None:
        async with session.open_monitor(buffer=buffer):
            raise AssertionError("the monitor must not open")  # pragma: no cover

    await expect(exc, culprit, open_it)


@pytest.mark.parametrize(("prog_id", "exc", "culprit"), [
    (U32, ValueError, r"Program\.from_id: prog_id must be in 1\.\.4294967295, got 4294967296"),
    (0, ValueError, r"prog_id must be in 1\.\.4294967295, got 0"),
    (-1, ValueError, r"prog_id must be in 1\.\.4294967295, got -1"),
    ("x", TypeError, r"prog_id must be an int, got str 'x'"),
    (1.5, TypeError, r"prog_id must be an int, got float"),
    (True, TypeError, r"prog_id must be an int, got bool"),
])
def test_program_from_id_rejects(prog_id: Any, exc: type[BaseException], culprit: str) -> None:
    with pytest.raises(exc, match=culprit):
        asynctc.Program.from_id(prog_id)


@pytest.mark.parametrize(("fd", "exc", "culprit"), [
    (2**31, ValueError, r"Program\.from_fd: fd must be in 0\.\.2147483647, got 2147483648"),
    (-1, ValueError, r"fd must be in 0\.\.2147483647, got -1"),
    ("x", TypeError, r"fd must be an int, got str"),
    (1.5, TypeError, r"fd must be an int, got float"),
])
def test_program_from_fd_rejects(fd: Any, exc: type[BaseException], culprit: str) -> None:
    with pytest.raises(exc, match=culprit):
        asynctc.Program.from_fd(fd)


@pytest.mark.parametrize(("path", "exc", "culprit"), [
    (5, TypeError, r"program's pin path must be a str"),
    ("rel", ValueError, r"program's pin path 'rel' is not absolute"),
    ("/sys/fs/bpf/a\0b", ValueError, r"contains a NUL byte"),
    ("/sys/fs/bpf/../etc", ValueError, r"'\.\.' component"),
])
def test_program_from_pinned_rejects(path: Any, exc: type[BaseException], culprit: str) -> None:
    with pytest.raises(exc, match=culprit):
        asynctc.Program.from_pinned(path)


@pytest.mark.parametrize(("kwargs", "exc", "culprit"), [
    ({"verdict": "maybe"}, ValueError, r"verdict must be one of \['drop', 'next', 'pass'\], got 'maybe'"),
    ({"verdict": ["pass"]}, TypeError, r"verdict must be one of .*got list"),
    ({"verdict": "pass", "name": "x" * 16}, ValueError, r"name must be 1-15 characters.*'x{16}'"),
    ({"verdict": "pass", "name": "a-b"}, ValueError, r"name must be 1-15 characters.*'a-b'"),
    ({"verdict": "pass", "name": 5}, TypeError, r"name must be a str, got int"),
])
@pytest.mark.parametrize("make", [programs.constant, programs.counting])
def test_builtin_programs_reject(make: Callable[..., asynctc.Program], kwargs: dict[str, Any],
                                 exc: type[BaseException], culprit: str) -> None:
    # checked before anything is loaded: no privilege needed to be told
    with pytest.raises(exc, match=culprit):
        make(**kwargs)


@pytest.mark.parametrize(("call", "culprit"), [
    (lambda: bpf.link_create_tcx(3, 2**32, bpf.BPF_TCX_INGRESS), r"ifindex must be in 0\.\.4294967295"),
    (lambda: bpf.link_create_tcx(3, 1, bpf.BPF_TCX_INGRESS, expected_revision=U64),
     r"expected_revision must be in 0\.\.18446744073709551615"),
    (lambda: bpf.link_create_tcx(3, 1, bpf.BPF_TCX_INGRESS, relative=-1), r"relative \(anchor id or fd\)"),
    (lambda: bpf.link_create_tcx(2**31, 1, bpf.BPF_TCX_INGRESS), r"prog_fd must be in 0\.\.2147483647"),
    (lambda: bpf.prog_query(2**32, bpf.BPF_TCX_INGRESS), r"ifindex must be in"),
    (lambda: bpf.prog_get_fd_by_id(U32), r"prog_id must be in 0\.\.4294967295"),
    (lambda: bpf.link_get_fd_by_id(-1), r"link_id must be in"),
    (lambda: bpf.link_update(3, 2**31), r"new_prog_fd must be in"),
    (lambda: bpf.obj_pin(3, "/sys/fs/bpf/a\0b"), r"contains a NUL byte"),
    (lambda: bpf.obj_get("/sys/fs/bpf/a\0b"), r"contains a NUL byte"),
])
def test_lowlevel_bpf_checks_fields_before_packing(call: Callable[[], object], culprit: str) -> None:
    """No raw struct.error: each field is checked against its C type's range, by name, before any call."""
    with pytest.raises(ValueError, match=culprit):
        call()
    with pytest.raises(TypeError, match="ifindex must be an int, got float"):
        bpf.prog_query(1.5, bpf.BPF_TCX_INGRESS)  # type: ignore[arg-type]
