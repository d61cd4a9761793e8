"""Thread policy for stretches of small dependent CPU ops (chunk recurrences, per-chunk steps, a CMS language
model's segments, and their backward passes): one thread when OpenMP's idle threads sleep, the caller's threads back
for a large op inside; or, for a batch of independent problems, one part per thread side by side."""

from __future__ import annotations

import concurrent.futures
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
    # under torch.compile the stretch is traced, not run: a thread switch there would only break the graph
    if torch.compiler.is_compiling() or device.type != "cpu" or not threads_sleep_between_ops():
        yield
        return
    n = torch.get_num_threads()
    if n == 1:
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


def _restore_backward_threads(owner=None) -> None:
    """End a one-thread backward stretch: any (``owner=None``, the pass's end) or only the one ``owner`` began."""
    current = getattr(_CALLER, "backward_owner", None)
    if current is None or (owner is not None and current is not owner):
        return
    n = _CALLER.n
    _CALLER.n = _CALLER.backward_owner = None
    torch.set_num_threads(n)


def restore_threads_after_failed_backward() -> None:
    """Give back the caller's thread count if a backward pass that ``BackwardOnOneThread`` switched to one thread
    ended in an error (its end-of-pass callback then never ran). Called by the layers and models on entry."""
    _restore_backward_threads()


class _Switch(torch.autograd.Function):
    """Identity on a layer's outputs; its backward, the first of the layer's nodes the pass reaches, puts the pass on
    one thread until the layer's inputs are reached or the pass ends."""

    @staticmethod
    def forward(ctx, owner, *tensors):
        ctx.owner = owner
        ctx.set_materialize_grads(False)  # an output the loss does not use (the logits) gets no zeros to multiply
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        n = torch.get_num_threads()
        if n > 1 and getattr(_CALLER, "n", None) is None:
            torch.set_num_threads(1)
            _CALLER.n, _CALLER.backward_owner = n, ctx.owner  # caller_threads() inside: every thread for a large op
            torch.autograd.Variable._execution_engine.queue_callback(_restore_backward_threads)
        return (None, *grads)


class _Restore(torch.autograd.Function):
    """Identity on a layer's input; its backward, the layer's last node, gives the caller's threads back."""

    @staticmethod
    def forward(ctx, owner, x):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _restore_backward_threads(ctx.owner)
        return None, g


class BackwardOnOneThread:
    """When idle threads sleep, a CPU backward pass through a layer (or a model) runs on one thread between the
    layer's outputs and its inputs:

        span = BackwardOnOneThread(x)      # on entry; x = span.input(x)
        ...
        y, state = span.outputs(y), ...    # or span.outputs(logits, loss) -> a tuple

    The backward of a segment-by-segment or chunk-by-chunk layer is its forward's stretch of small dependent ops in
    reverse, run by the caller's ``loss.backward()``, out of reach of a context manager in the layer. The switch is
    the first node the pass reaches at the layer's outputs; the node at its input, or autograd's end-of-pass
    callback when the pass never gets there, restores the count, and ``caller_threads()`` inside gives a large op the
    caller's threads. A span inside another one's stretch changes nothing. Under the conditions of
    ``one_thread_if_threads_sleep``; elsewhere the tensors pass untouched."""

    def __init__(self, x: torch.Tensor):
        if not torch.compiler.is_compiling():  # traced, it would make the graph depend on the thread-local state
            restore_threads_after_failed_backward()
        self.on = (
            not torch.compiler.is_compiling()
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and threads_sleep_between_ops()
            and torch.get_num_threads() > 1
        )

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return _Restore.apply(self, x) if self.on and x.requires_grad else x

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.outputs(y)[0]

    def outputs(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.on or not any(t.requires_grad for t in tensors):
            return tensors
        return _Switch.apply(self, *tensors)


_POOL = {"executor": None, "size": 0, "pid": None}  # worker threads for run_side_by_side


def side_by_side_parts(device: torch.device, n: int) -> int:
    """Into how many parts to split ``n`` independent problems (the memories of a batch), each part on its own
    thread with one torch thread: when idle threads sleep, the caller's thread count (at most n), else 1.

    Under passive waiting a stretch of small ops runs on one thread (``one_thread_if_threads_sleep``) and the other
    cores idle; parts on threads of their own use them without a wake-up per op. With threads that spin between ops
    (the policy unset or ACTIVE) the parts' OpenMP teams would compete for the cores, so there is no split."""
    if torch.compiler.is_compiling() or device.type != "cpu" or not threads_sleep_between_ops():
        return 1
    return max(1, min(int(n), torch.get_num_threads()))


def _worker_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    pool = _POOL
    if pool["executor"] is None or pool["size"] < workers or pool["pid"] != os.getpid():  # none, too few, or forked
        if pool["executor"] is not None and pool["pid"] == os.getpid():
            pool["executor"].shutdown(wait=False)
        pool["executor"] = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="nested-learning-part", initializer=_one_torch_thread
        )
        pool["size"], pool["pid"] = workers, os.getpid()
    return pool["executor"]


def _one_torch_thread() -> None:
    # ATen sets a thread's count from the process-wide one at the thread's first use (once): make that use first, or
    # it would undo this choice whenever the caller has set its own count again before the worker's first op
    torch.get_num_threads()
    torch.set_num_threads(1)


def _without_grad(fn, args):
    with torch.no_grad():  # grad mode is per thread: a worker starts with it on
        return fn(*args)


def run_side_by_side(fn, parts: list) -> list:
    """``[fn(*args) for args in parts]``, the first on this thread (on one torch thread when idle threads sleep), the
    others at the same time on worker threads of one torch thread each, without autograd (for the bodies of an
    autograd function's forward and backward). A worker's error is raised here."""
    futures = [_worker_pool(len(parts) - 1).submit(_without_grad, fn, args) for args in parts[1:]]
    try:
        with one_thread_if_threads_sleep(torch.device("cpu")), torch.no_grad():
            first = fn(*parts[0])
    finally:
        concurrent.futures.wait(futures)  # every part has finished, also when the first failed
    return [first, *(f.result() for f in futures)]
