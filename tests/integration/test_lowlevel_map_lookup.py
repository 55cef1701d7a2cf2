"""The kernel writes a map's whole value into the lookup buffer: a lookup that expects another size must
be refused before the syscall (reading another backend's 256-byte record with a 128-byte buffer corrupted
the heap, and the process died later in the garbage collector)."""

from __future__ import annotations

import errno
import os

import pytest

from asynctc.lowlevel import bpf

pytestmark = pytest.mark.kernel


def test_a_lookup_of_another_value_size_is_refused_not_overrun() -> None:
    fd = bpf.map_create_array(256, 1, name="atc_test_pin")
    try:
        bpf.map_update(fd, 0, b"x" * 256)
        assert bpf.map_lookup(fd, 0, 256) == b"x" * 256
        with pytest.raises(bpf.BpfError) as exc:
            bpf.map_lookup(fd, 0, 128)
        assert exc.value.errno == errno.EINVAL and "256-byte values" in str(exc.value)
    finally:
        os.close(fd)
