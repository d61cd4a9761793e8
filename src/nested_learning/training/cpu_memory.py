"""Keep freed CPU memory in the process heap, so the large activations of every training step are reused.

glibc serves each allocation above 32 MiB with a fresh ``mmap`` and returns it on free; the kernel then zero-fills
every page again on first touch. A language model's logits at GPT-2's vocabulary (4 x 128 x 50,257 fp32 = 100 MB)
are such allocations, made several times per step, and the page faults cost more than the arithmetic on them: on a
2-core machine a fresh ``x.mul(1.0)`` of that size takes about 80 ms against 12 ms in place. Turning off ``mmap``
for large blocks and never trimming the heap makes the second step reuse the first step's pages: the tiny
Transformer++ trains about 1.4x faster and HOPE about 1.1x (``benchmarks/bench_models.py``).

The price is that the process keeps its peak heap until it exits, which is what a training process wants anyway.
Set ``NESTED_LEARNING_KEEP_FREED_MEMORY=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def keep_freed_cpu_memory() -> bool:
    """Tune glibc's malloc as above; returns whether it is in effect (False off Linux/glibc or when disabled)."""
    global _applied
    if _applied:
        return True
    if os.environ.get("NESTED_LEARNING_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc (e.g. musl): nothing to tune
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
