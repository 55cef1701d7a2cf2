"""Compile BPF C sources for tests: `compile_bpf(source)` runs clang with the flags libbpf objects need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

__all__ = ["compile_bpf", "compile_bpf_skip_reason"]

_HELPERS_HEADER = "bpf/bpf_helpers.h"


def _include_dirs() -> list[str]:
    # <linux/bpf.h> includes <asm/types.h>, which lives under the multiarch directory on Debian/Ubuntu
    multiarch = sysconfig.get_config_var("MULTIARCH")
    dirs = [f"/usr/include/{multiarch}"] if multiarch else []
    return [d for d in dirs if os.path.isdir(d)]


def compile_bpf_skip_reason() -> str | None:
    """Why BPF C cannot be compiled here (None when it can): no clang, or no libbpf headers."""
    if shutil.which("clang") is None:
        return "needs clang to compile BPF C (Debian/Ubuntu: apt-get install clang)"
    if not any(os.path.exists(os.path.join(d, _HELPERS_HEADER)) for d in ("/usr/include", "/usr/local/include")):
        return f"needs libbpf's headers (<{_HELPERS_HEADER}>; Debian/Ubuntu: apt-get install libbpf-dev)"
    return None


def compile_bpf(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    extra_args: tuple[str, ...] = (),
) -> Path:
    """Compile a BPF C file into an ELF object: `clang -O2 -g -target bpf -c SOURCE -o OUTPUT`.

    Args:
        source: the .c file.
        output: the object to write (default: SOURCE with the suffix .o).
        extra_args: more clang arguments (`-DNAME=VALUE`...).

    Returns:
        The object's path.

    Raises:
        RuntimeError with clang's own messages when it fails, or when clang is missing.
    """
    reason = compile_bpf_skip_reason()
    if reason is not None:
        raise RuntimeError(reason)
    src = Path(source)
    out = Path(output) if output is not None else src.with_suffix(".o")
    cmd = ["clang", "-O2", "-g", "-target", "bpf", *(f"-I{d}" for d in _include_dirs()), *extra_args]
    cmd += ["-c", str(src), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
    return out
