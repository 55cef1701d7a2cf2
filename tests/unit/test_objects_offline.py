"""Compiled BPF objects without loading them: what libbpf reads from the file, bad input, a missing or
too old libbpf, and the "OBJECT.o[:NAME]" helper of the command line. No privileges needed, except to
drop them (the test that runs a process without capabilities)."""

from __future__ import annotations

import errno
import json
import logging
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import asynctc
from asynctc._object import section_direction, split_object_spec
from asynctc.lowlevel import libbpf
from asynctc.testing import run_without_capabilities


async def test_open_without_loading_describes_the_object(bpf_objects: dict[str, Path], tmp_path: Path) -> None:
    async with asynctc.open_object(bpf_objects["objects"], load=False) as obj:
        assert not obj.loaded
        specs = {name: (s.section, s.type) for name, s in obj.program_specs.items()}
        # tcx sections are typed SCHED_CLS (3) by asynctc, the others by libbpf (XDP = 6)
        assert specs == {
            "count_ingress": ("tcx/ingress", 3),
            "count_egress": ("tcx/egress", 3),
            "classic": ("tc", 3),
            "xdp_pass": ("xdp", 6),
        }
        by_proto = obj.map_specs["by_proto"]
        assert (by_proto.type, by_proto.key_size, by_proto.value_size, by_proto.max_entries) == (1, 4, 8, 64)
        assert "not loaded" in repr(obj)
        with pytest.raises(asynctc.ProgramError, match=r"opened with load=False.*MockKernel\.program"):
            obj.programs  # noqa: B018
        with pytest.raises(asynctc.ProgramError, match="opened with load=False"):
            obj.map("by_proto")
    async with asynctc.open_object(bpf_objects["pinned"], pin_root=tmp_path, load=False) as obj:
        assert obj.map_specs["pinned_hits"].pin_path == str(tmp_path / "pinned_hits")
        assert obj.map_specs["fresh_hits"].pin_path is None


@pytest.mark.kernel
def test_unprivileged_process_opens_but_cannot_load(bpf_objects: dict[str, Path]) -> None:
    code = textwrap.dedent(
        f"""
        import json, trio, asynctc

        async def main():
            out = {{}}
            async with asynctc.open_object({str(bpf_objects["objects"])!r}, load=False) as obj:
                out["sections"] = {{n: s.section for n, s in obj.program_specs.items()}}
                out["maps"] = sorted(obj.map_specs)
            try:
                async with asynctc.open_object({str(bpf_objects["objects"])!r}):
                    pass
            except asynctc.PermissionDenied as exc:
                out["load"] = [exc.errno, str(exc)]
            print(json.dumps(out))

        trio.run(main)
        """
    )
    proc = run_without_capabilities(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sections"]["count_ingress"] == "tcx/ingress"
    assert out["maps"] == ["by_proto", "last_ran", "percpu_hits", "verdict"]
    err, message = out["load"]
    assert err == errno.EPERM
    assert "needs CAP_BPF and CAP_NET_ADMIN" in message and "load=False" in message
    assert "MockKernel.program" in message


async def test_bad_paths_are_refused_clearly(tmp_path: Path, bpf_objects: dict[str, Path]) -> None:
    before = os.listdir("/proc/self/fd")
    with pytest.raises(asynctc.ProgramError, match="does not exist; compile one with `clang") as exc:
        async with asynctc.open_object(tmp_path / "missing.o"):
            pass
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(asynctc.ProgramError, match="is not a regular file"):
        async with asynctc.open_object(tmp_path):
            pass
    junk = tmp_path / "junk.o"
    junk.write_text("not an ELF file")
    with pytest.raises(asynctc.ProgramError, match="not a proper ELF object"):
        async with asynctc.open_object(junk):
            pass
    with pytest.raises(ValueError, match="path must be a non-empty str"):
        async with asynctc.open_object(""):
            pass
    with pytest.raises(asynctc.PinError, match="pin_root .* is not a directory"):
        async with asynctc.open_object(bpf_objects["objects"], pin_root=tmp_path / "nowhere"):
            pass
    assert len(os.listdir("/proc/self/fd")) == len(before)  # nothing left open


async def test_libbpf_messages_go_to_the_logger(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    junk = tmp_path / "junk.o"
    junk.write_bytes(b"\x7fELF" + bytes(60))
    with caplog.at_level(logging.DEBUG, logger="asynctc.libbpf"), pytest.raises(asynctc.ProgramError):
        async with asynctc.open_object(junk):
            pass
    assert any(r.name == "asynctc.libbpf" and "libbpf: " in r.getMessage() for r in caplog.records)


async def test_missing_libbpf_names_the_package(
    monkeypatch: pytest.MonkeyPatch, bpf_objects: dict[str, Path]
) -> None:
    monkeypatch.setattr(libbpf, "_lib", None)
    monkeypatch.setattr(libbpf, "LIBBPF_SONAME", "libbpf-not-installed.so.1")
    with pytest.raises(asynctc.BackendUnavailable, match=r"cannot load libbpf-not-installed\.so\.1.*libbpf1"):
        async with asynctc.open_object(bpf_objects["objects"], load=False):
            pass


class _FakeLibrary:
    """A stand-in for a libbpf.so with the given version and without the symbols in `missing`."""

    def __init__(self, version: tuple[int, int] | None, missing: tuple[str, ...] = ()) -> None:
        self._version = version
        self._missing = missing

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name in self._missing or (self._version is None and name.startswith("libbpf_m")):
            raise AttributeError(name)
        version = self._version or (0, 0)

        def fn(*args: object) -> int:
            return version[0] if name == "libbpf_major_version" else version[1]

        return fn


def test_libbpf_version_is_checked() -> None:
    with pytest.raises(libbpf.LibbpfUnavailable, match=r"is libbpf 0\.8; asynctc needs libbpf >= 1\.0: .*libbpf1"):
        libbpf.Libbpf(_FakeLibrary((0, 8)), "libbpf.so.0")  # type: ignore[arg-type]
    with pytest.raises(libbpf.LibbpfUnavailable, match=r"older than libbpf 0\.6"):
        libbpf.Libbpf(_FakeLibrary(None), "libbpf.so.0")  # type: ignore[arg-type]
    with pytest.raises(
        libbpf.LibbpfUnavailable,
        match=r"libbpf 1\.0 \(fake\) has no bpf_program__set_log_buf, which asynctc needs \(libbpf >= 0\.8\)",
    ):
        libbpf.Libbpf(_FakeLibrary((1, 0), missing=("bpf_program__set_log_buf",)), "fake")  # type: ignore[arg-type]


def test_split_object_spec() -> None:
    assert split_object_spec("prog.o") == ("prog.o", None)
    assert split_object_spec("prog.o:count") == ("prog.o", "count")
    assert split_object_spec("/srv/a:b/prog.o") == ("/srv/a:b/prog.o", None)
    assert split_object_spec("/srv/a:b/prog.o:count_2") == ("/srv/a:b/prog.o", "count_2")
    assert split_object_spec(Path("dir/prog.o")) == ("dir/prog.o", None)
    with pytest.raises(ValueError, match="names no program"):
        split_object_spec("prog.o:")
    with pytest.raises(ValueError, match=r"expected OBJECT\.o\[:PROGRAM\]"):
        split_object_spec("")


def test_section_direction() -> None:
    assert section_direction("tcx/ingress") is asynctc.Direction.INGRESS
    assert section_direction("tcx/egress") is asynctc.Direction.EGRESS
    assert section_direction("tc/ingress") is asynctc.Direction.INGRESS
    assert section_direction("tc") is None
    assert section_direction("classifier") is None
    assert section_direction(None) is None
