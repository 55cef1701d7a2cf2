"""Built-in BPF programs for demos and tests: constant verdicts and packet counting.

Loading them needs CAP_BPF. Verdicts mean the same in the tcx and the cls_bpf (direct-action) hooks:
"pass" (TCX_PASS / TC_ACT_OK = 0), "drop" (TCX_DROP / TC_ACT_SHOT = 2) and "next" (TCX_NEXT /
TC_ACT_UNSPEC = -1: let the next program decide).
"""

from __future__ import annotations

import functools
import os
from typing import Literal, TypeAlias

import trio

from ._errors import Op, ProgramError, from_errno
from ._program import Program, adopt_program_fd
from .lowlevel import bpf

__all__ = [
    "VERDICTS",
    "CountingProgram",
    "Verdict",
    "constant",
    "counting",
    "load_constant",
    "load_counting",
    "verdict_value",
]

Verdict: TypeAlias = Literal["pass", "drop", "next"]
TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT = -1, 0, 2  # linux/pkt_cls.h
VERDICTS: dict[str, int] = {"pass": TC_ACT_OK, "drop": TC_ACT_SHOT, "next": TC_ACT_UNSPEC}


def verdict_value(verdict: str) -> int:
    """The return code of a verdict name; TypeError/ValueError naming the choices otherwise."""
    if not isinstance(verdict, str):
        raise TypeError(f"verdict must be one of {sorted(VERDICTS)} (a str), got {type(verdict).__name__} "
                        f"{verdict!r}")
    try:
        return VERDICTS[verdict]
    except KeyError:
        raise ValueError(f"verdict must be one of {sorted(VERDICTS)}, got {verdict!r}") from None


def _check_name(name: object) -> None:
    """A program name the kernel takes: up to 15 characters of letters, digits, '_' and '.'."""
    if name is None:
        return
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} {name!r}")
    if not name or len(name) > 15 or not all(c.isascii() and (c.isalnum() or c in "_.") for c in name):
        raise ValueError(f"name must be 1-15 characters of letters, digits, '_' and '.' (the kernel's rule for "
                         f"program names), got {name!r}")


def _load(insns: bytes, name: str) -> int:
    try:
        return bpf.prog_load(bpf.BPF_PROG_TYPE_SCHED_CLS, insns, name=name)
    except bpf.BpfError as exc:
        raise from_errno(exc.errno or 0, op=Op.PROG_LOAD, program=name, detail=exc.log or None) from None


def constant(verdict: Verdict = "pass", *, name: str | None = None) -> Program:
    """A SCHED_CLS program that returns `verdict` for every packet."""
    code = verdict_value(verdict)
    _check_name(name)
    a = bpf.asm
    fd = _load(a.mov64_imm(0, code) + a.exit(), name or f"atc_{verdict}")
    return adopt_program_fd(fd)


class CountingProgram(Program):
    """A SCHED_CLS program that counts the packets it sees in an array map, then returns its verdict."""

    __slots__ = ("_map_fd",)

    def __init__(self, fd: int, map_fd: int) -> None:
        info = bpf.prog_info(fd)
        super().__init__(fd, id=info.id, name=info.name, tag=info.tag, type=info.type)
        self._map_fd = map_fd

    def count(self) -> int:
        """How many packets this program has seen (reads its map)."""
        if self._map_fd < 0:
            raise ProgramError(f"{self} is closed; its counter is gone with it")
        return bpf.map_lookup_u64(self._map_fd, 0)

    def reset(self) -> None:
        """Set the counter back to 0."""
        if self._map_fd < 0:
            raise ProgramError(f"{self} is closed; its counter is gone with it")
        bpf.map_update(self._map_fd, 0, bytes(8))

    def close(self) -> None:
        super().close()
        if self._map_fd >= 0:
            fd, self._map_fd = self._map_fd, -1
            os.close(fd)


def counting(verdict: Verdict = "pass", *, name: str | None = None) -> CountingProgram:
    """A program that counts every packet (`.count()`) and returns `verdict`.

    Eleven instructions: look up key 0 of a one-entry array map, atomically add 1, return the verdict.
    """
    code = verdict_value(verdict)
    _check_name(name)
    try:
        map_fd = bpf.map_create_array(8, 1, name="atc_count")
    except bpf.BpfError as exc:
        raise from_errno(exc.errno or 0, op=Op.MAP_CREATE, program="counting program") from None
    a = bpf.asm
    insns = (
        a.ld_map_fd(1, map_fd)
        + a.st_mem_w(bpf.BPF_REG_FP, -4, 0)  # the key (0), on the stack
        + a.mov64_reg(2, bpf.BPF_REG_FP)
        + a.add64_imm(2, -4)
        + a.call(bpf.BPF_FUNC_MAP_LOOKUP_ELEM)
        + a.jeq_imm(0, 0, 2)
        + a.mov64_imm(1, 1)
        + a.atomic_add64(0, 1)
        + a.mov64_imm(0, code)
        + a.exit()
    )
    try:
        fd = _load(insns, name or f"atc_count_{verdict}"[: bpf.BPF_OBJ_NAME_LEN - 1])
    except BaseException:
        os.close(map_fd)
        raise
    return CountingProgram(fd, map_fd)


async def load_constant(verdict: Verdict = "pass", *, name: str | None = None) -> Program:
    """`constant` loaded in a worker thread: for trio tasks (the sync `constant` blocks its caller for the
    BPF_PROG_LOAD, ~0.2 ms on an idle machine and more while the verifier is busy)."""
    return await trio.to_thread.run_sync(functools.partial(constant, verdict, name=name))


async def load_counting(verdict: Verdict = "pass", *, name: str | None = None) -> CountingProgram:
    """`counting` loaded in a worker thread: for trio tasks (the sync `counting` blocks its caller)."""
    return await trio.to_thread.run_sync(functools.partial(counting, verdict, name=name))
