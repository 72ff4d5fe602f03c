"""keep_freed_memory: large blocks come from the heap and stay there once freed (glibc)."""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

import vlprompt as vp

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo() -> _MallInfo2:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


@pytest.mark.skipif(not glibc, reason="glibc only")
def test_large_blocks_are_kept_in_the_heap():
    assert vp.keep_freed_memory() is True
    assert vp.keep_freed_memory() is True  # idempotent
    size = 64 * 2**20
    mapped_before = _mallinfo().hblkhd
    x = torch.empty(size, dtype=torch.uint8)
    x.fill_(1)
    during = _mallinfo()
    assert during.hblkhd <= mapped_before  # not a fresh mapping of its own
    assert during.uordblks >= size  # served from the heap
    del x
    after = _mallinfo()
    assert after.arena >= size and after.fordblks >= size  # freed, and kept for the next allocation
