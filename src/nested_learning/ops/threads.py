"""Thread policy for stretches of small dependent CPU ops (chunk recurrences, per-chunk steps, a CMS language
model's segments): one thread when OpenMP's idle threads sleep, the caller's threads back for a large op inside."""

from __future__ import annotations

import contextlib
import os
import threading

import torch

_CALLER = threading.local()  # the thread count a one-thread stretch replaced (None outside one)


def threads_sleep_between_ops() -> bool:
    """Whether OpenMP's idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE): then every parallel region wakes them."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


@contextlib.contextmanager
def one_thread_if_threads_sleep(device: torch.device):
    """Run a stretch of small dependent CPU ops on one thread when idle threads sleep between ops (restored
    afterwards, also on error).

    Ops of a few hundred thousand elements are too small to gain from splitting, yet with more threads each one
    opens a parallel region: with passive waiting (OMP_WAIT_POLICY=PASSIVE) that costs a wake-up per op (a 16 x 128
    by 128 x 128 product: 14 us at one thread, 127 us at two on a 2-core machine), which made the delta rule's chunk
    recurrence and a batched 64 x 64 triangular solve 2-10x slower at two threads than at one. With OpenMP's default
    policy (threads spin a while before sleeping) such stretches run faster on the caller's threads (the delta rule's
    recurrence: 3.6 ms at one thread against 2.3 ms at two for T = 8192, four heads), so the thread count is left
    alone there. No effect on other devices, nor while torch.compile traces the code.

    Measured at the sizes of the tiny presets on a 2-core machine; the switch does not look at sizes, so with much
    larger layers on a many-core machine, leave OMP_WAIT_POLICY unset (or ACTIVE) to keep every thread.
    """
    n = torch.get_num_threads()
    # under torch.compile the stretch is traced, not run: a thread switch there would only break the graph
    if device.type != "cpu" or n == 1 or not threads_sleep_between_ops() or torch.compiler.is_compiling():
        yield
        return
    torch.set_num_threads(1)
    before, _CALLER.n = getattr(_CALLER, "n", None), n
    try:
        yield
    finally:
        _CALLER.n = before
        torch.set_num_threads(n)


@contextlib.contextmanager
def caller_threads():
    """Inside a stretch that ``one_thread_if_threads_sleep`` put on one thread: the caller's threads back, for an op
    large enough to gain from them (e.g. a product with a whole LM head). Elsewhere it changes nothing."""
    n = getattr(_CALLER, "n", None)
    if n is None or torch.compiler.is_compiling():
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)

