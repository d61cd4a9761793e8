"""How close HOPE's inner steps come to the machine's matmul rate: the self-modifying Titans chunk step, the CMS
segment step and the whole HOPE training step, each as a fraction of a same-run fp32 GEMM.

    python benchmarks/bench_step_fractions.py [--threads 1] [--T 512] [--quick]

Shapes: HOPE ``tiny`` (dim 128, 4 heads, MLP memories of hidden 64, Eq 90 chunks of 16, CMS levels (16, 64, 256)),
batch 1, fp32, forward + backward of a sum of the outputs with dense gradients (a loss's).

FLOPs are the matmul FLOPs (mm, bmm, baddbmm, einsum; 2 per multiply-add; backward included) that
``torch.utils.flop_counter.FlopCounterMode`` counts in one untimed step, so "fraction" = (counted FLOPs / time) /
(fp32 1024^2 matmul FLOP/s in the same run). Elementwise work is not counted: a low fraction means that the step is
bound by many small ops (the "ops" column, dispatched aten ops per step from the profiler), not by arithmetic.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_line, matmul_flops_per_s, time_fn  # noqa: E402

from nested_learning.memory import ContinuumMemorySystem, SelfModifyingTitans  # noqa: E402
from nested_learning.models import build_model  # noqa: E402

DIM, HEADS, VOCAB = 128, 4, 32000


def layer_step(layer, T: int):
    x = torch.randn(1, T, DIM, requires_grad=True)
    grad = torch.randn(1, T, DIM)

    def step():
        y, _ = layer(x)
        y.backward(grad)

    return step


def hope_step(T: int):
    model = build_model("hope", "tiny", vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (1, T))

    def step():
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def count(step) -> tuple[float, int]:
    """Matmul FLOPs of one step, and the aten ops it dispatches."""
    with FlopCounterMode(display=False) as counter:
        step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return float(counter.get_total_flops()), sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="T = 64, one timed run (a smoke test)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T, iters = (64, 1) if args.quick else (args.T, 3)
    steps = {
        "self-modifying Titans (Eq 83-93), one layer": layer_step(SelfModifyingTitans(DIM, n_heads=HEADS), T),
        "CMS (Eq 70-71), one layer, next_input objective": layer_step(ContinuumMemorySystem(DIM), T),
        "HOPE tiny training step (2 layers, vocab 32000)": hope_step(T),
    }
    gemm = matmul_flops_per_s()
    print(f"T = {T}, batch 1, fp32, {args.threads} thread(s); fp32 1024^2 matmul: {gemm / 1e9:.1f} GFLOP/s")
    print(machine_line())
    print(f"{'step':52s} {'ms':>9} {'tok/s':>8} {'GFLOP':>7} {'GFLOP/s':>8} {'fraction':>9} {'ops':>8} {'ops/token':>9}")
    for name, step in steps.items():
        flops, ops = count(step)
        sec = time_fn(step, warmup=1, iters=iters)
        rate = flops / sec
        print(f"{name:52s} {sec * 1e3:9.1f} {T / sec:8.0f} {flops / 1e9:7.3f} {rate / 1e9:8.2f} "
              f"{rate / gemm:9.1%} {ops:8d} {ops / T:9.0f}")
    print(f"matmul again: {matmul_flops_per_s() / 1e9:.1f} GFLOP/s (a large change means the machine was busy)")


if __name__ == "__main__":
    main()
