"""Training steps in fp32 against the same steps under bf16 autocast (the trainer's ``precision=bf16``), alternating
step by step in one process.

    python benchmarks/bench_precision.py [--threads 2] [--steps 12] [--T 512] [--no-compile] [--quick]

Models: the Transformer++ 'tiny', HOPE 'tiny' eager and with ``titans_compile="inductor"``; vocab 32000, batch 1,
the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)`` and the backward outside it, as the trainer runs
them. Medians of ``--steps`` steps each after two warm-up steps each; freed memory kept in the heap; passive
OpenMP waiting unless ``OMP_WAIT_POLICY`` is set. The same-run 1024 x 1024 product in fp32 and in bf16 is printed
too: bf16 pays off where the CPU multiplies bf16 faster than fp32 (AMX or AVX-512 BF16 units) and the step is made
of large products.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_tiny_step_arguments,
    alternating_medians,
    compare_tiny_models,
    machine_line,
    matmul_flops_per_s,
    tiny_step_setup,
)

from nested_learning.training.trainer import autocast_for  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def compare(model, x: torch.Tensor, steps: int) -> dict:
    """Median seconds of one training step in each precision, alternating step by step."""
    def step(precision):
        model.zero_grad(set_to_none=True)
        with autocast_for(precision, x.device):
            loss = model(x, labels=x).loss
        loss.backward()

    # two warm-up steps each (the first compiles)
    return alternating_medians({p: functools.partial(step, p) for p in PRECISIONS}, steps)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tiny_step_arguments(p)
    args = p.parse_args(argv)
    vocab, T, steps, configs = tiny_step_setup(args)
    print(f"training step, tiny presets, vocab {vocab}, T = {T}, batch 1, {args.threads} thread(s), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, median of {steps} steps each, alternating; "
          f"1024 x 1024 product: fp32 {matmul_flops_per_s() / 1e9:.0f} GFLOP/s, "
          f"bf16 {matmul_flops_per_s(dtype=torch.bfloat16) / 1e9:.0f} GFLOP/s")
    print(machine_line())
    print(f"{'model':>16} {'fp32 tok/s':>11} {'bf16 tok/s':>11} {'bf16 / fp32':>12}")
    return compare_tiny_models(
        configs, vocab, T, steps, compare,
        lambda label, t: f"{label:>16} {T / t['fp32']:11.0f} {T / t['bf16']:11.0f} {t['fp32'] / t['bf16']:11.2f}x",
    )


if __name__ == "__main__":
    main()
