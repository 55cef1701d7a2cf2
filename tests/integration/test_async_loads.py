"""Loading programs from trio tasks without blocking the event loop: the async variants of the blocking
loaders run them in a worker thread and give the same results."""

from __future__ import annotations

import os
import threading

import pytest
import trio

import asynctc
from asynctc import programs

pytestmark = pytest.mark.kernel


async def test_async_loads_run_in_a_worker_thread_and_match_the_sync_ones(
    bpffs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asynctc.lowlevel import bpf

    trio_thread = threading.current_thread()
    seen: list[threading.Thread] = []
    real_load = bpf.prog_load

    def spy(*args: object, **kwargs: object) -> int:
        seen.append(threading.current_thread())
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bpf, "prog_load", spy)
    with trio.fail_after(30):
        const = await programs.load_constant("drop", name="atc_async")
        count = await programs.load_counting("pass")
    assert seen and all(t is not trio_thread for t in seen)
    with const, count:
        assert const.name == "atc_async" and count.count() == 0
        path = os.path.join(bpffs, "asyncprog")
        bpf.obj_pin(const.fd, path)
        with trio.fail_after(30):
            by_pin = await asynctc.Program.open_pinned(path)
            by_id = await asynctc.Program.open_id(const.id)
            by_fd = await asynctc.Program.open_fd(const.fd)
        with by_pin, by_id, by_fd:
            assert by_pin.id == by_id.id == by_fd.id == const.id
        os.unlink(path)
        with pytest.raises(asynctc.PinError), trio.fail_after(30):
            await asynctc.Program.open_pinned(path)
        with pytest.raises(ValueError, match="sometimes"), trio.fail_after(30):
            await programs.load_constant("sometimes")  # type: ignore[arg-type]
