"""Timing helpers shared by the benchmark scripts.

Benchmarks report ratios measured in one run (see DESIGN.md), so they time a reference (an fp32 matmul, a
recurrent loop) next to the thing under test. Times are the fastest of ``iters`` runs: on a shared machine
other processes only ever add time, so the minimum is the most repeatable estimate.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_fn(fn: Callable[[], object], warmup: int = 1, iters: int = 3) -> float:
    """Seconds taken by one call of ``fn`` (fastest of ``iters`` after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(iters, 1)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def alternating_medians(runs: dict[str, Callable[[], object]], steps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each of ``runs`` (name -> a call that runs one step in that form), taking one step of each
    in turn, ``warmup`` untimed rounds first: every form sees the same machine state, and a slow stretch of the
    machine slows them all."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_flops_per_s(n: int = 1024, dtype: torch.dtype = torch.float32, iters: int = 5) -> float:
    """Achieved FLOP/s of one (n, n) @ (n, n) matmul (2 n^3 FLOPs) at the current torch thread count."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / time_fn(lambda: a @ b, warmup=2, iters=iters)


def onednn_matmul_flops_per_s(n: int = 1024, iters: int = 5) -> float | None:
    """The same fp32 product through oneDNN's kernel (``ops/fast_linear.py``), or None where it does not run:
    PyTorch's own fp32 matmul calls MKL, which takes a generic path on x86 CPUs not made by Intel."""
    from nested_learning.ops.fast_linear import linear, onednn_applies, onednn_products

    a, b = torch.randn(n, n), torch.randn(n, n)
    with onednn_products():
        if not onednn_applies(a, b):
            return None
        return 2 * n**3 / time_fn(lambda: linear(a, b), warmup=2, iters=iters)


def machine_line() -> str:
    """One line naming the CPU and the kernels this package chose for it (``ops/cpu.py``): figures from different
    machines are not comparable, and the output says which machine gave them."""
    from nested_learning.ops.cpu import cpu_model, cpu_vendor, l2_cache_bytes, mkl_generic_path
    from nested_learning.ops.fast_linear import onednn_preferred

    l2 = l2_cache_bytes()
    return (
        f"cpu: {cpu_model()} ({cpu_vendor() or 'vendor unknown'}), L2 {f'{l2 // 1024} KiB' if l2 else 'unknown'} a core,"
        f" torch {torch.__version__}; MKL generic path: {'yes' if mkl_generic_path() else 'no'}, large products"
        f" through {'oneDNN' if onednn_preferred() else 'PyTorch (MKL)'}"
    )


def add_tiny_step_arguments(p) -> None:
    """The options of a benchmark that compares two forms of the tiny presets' training step (``tiny_step_setup``)."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--no-compile", action="store_true", help="leave out compiled HOPE")
    p.add_argument("--quick", action="store_true", help="vocab 500, T = 64, 2 steps, no compile (a smoke test)")


def tiny_step_setup(args) -> tuple[int, int, int, list]:
    """Threads set and freed memory kept (as the trainer keeps it); returns (vocab, T, steps, configs), configs the
    (label, registry name, overrides) of the Transformer++, HOPE eager and, unless left out, HOPE compiled."""
    from nested_learning.training.cpu_memory import keep_freed_cpu_memory

    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()
    vocab, T, steps = (500, 64, 2) if args.quick else (32000, args.T, args.steps)
    configs = [("Transformer++", "transformer", {}), ("HOPE eager", "hope", {})]
    if not (args.quick or args.no_compile):
        configs.append(("HOPE compiled", "hope", {"titans_compile": "inductor"}))
    return vocab, T, steps, configs


def compare_tiny_models(configs, vocab: int, T: int, steps: int, compare, row) -> list:
    """For each ``(label, registry name, overrides)`` of :func:`tiny_step_setup`: the tiny preset built from seed 0,
    ``t = compare(model, x, steps)`` on one fixed batch of ids ``x: (1, T)``, and the line ``row(label, t)`` printed;
    returns the ``(label, t)`` pairs."""
    from nested_learning.models import build_model

    x = torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(0))
    rows = []
    for label, name, overrides in configs:
        torch.manual_seed(0)
        t = compare(build_model(name, "tiny", vocab_size=vocab, **overrides), x, steps)
        rows.append((label, t))
        print(row(label, t))
    return rows



def compare_model_switch(model, x: torch.Tensor, steps: int, attr: str, labels: tuple[str, str],
                         sgd_lr: float | None = None) -> dict:
    """Median seconds of one training step ``model(x, labels=x).loss.backward()`` with the model's boolean switch
    ``attr`` on (``labels[0]``) and off (``labels[1]``), alternating step by step (:func:`alternating_medians`);
    with ``sgd_lr`` an SGD step after each, so that every step meets changed weights, as in training. The switch is
    left on."""
    opt = torch.optim.SGD(model.parameters(), lr=sgd_lr) if sgd_lr is not None else None

    def step(on: bool):
        setattr(model, attr, on)
        model.zero_grad(set_to_none=True)
        model(x, labels=x).loss.backward()
        if opt is not None:
            opt.step()

    try:
        return alternating_medians({labels[0]: lambda: step(True), labels[1]: lambda: step(False)}, steps)
    finally:
        setattr(model, attr, True)
