"""glibc's heap: freed memory goes back to the system where a run would otherwise keep it."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from lowrank_kit import heap
from lowrank_kit.data import texts
from lowrank_kit.testing import byte_level_tokenizer


@pytest.mark.skipif(heap._libc() is None, reason="glibc only")
def test_heap_trim_gives_freed_small_blocks_back() -> None:
    """What a fast tokenizer leaves after a long text: many small blocks freed among a few live
    ones. glibc keeps such pages resident until ``heap.trim``."""
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def resident_mb() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    blocks = [libc.malloc(512) for _ in range(400_000)]  # ~200 MB of small blocks, touched
    for block in blocks:
        libc.memset(block, 1, 512)
    kept = blocks[::64]  # one live block per 32 KB keeps the heap from shrinking at its top
    for i, block in enumerate(blocks):
        if i % 64:
            libc.free(block)
    before = resident_mb()
    heap.trim()
    after = resident_mb()
    for block in kept:
        libc.free(block)
    assert before - after > 100, (before, after)


def test_only_long_texts_trim_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1))
    tokenizer = byte_level_tokenizer()
    short = texts.tokenize(tokenizer, "a" * texts.TRIM_AFTER_CHARS)
    assert calls == [] and short.numel() > 0
    texts.tokenize(tokenizer, "a" * (texts.TRIM_AFTER_CHARS + 1))
    assert calls == [1]
