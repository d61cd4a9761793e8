"""Training steps with the large products through oneDNN (``onednn_products()``, ``ops/fast_linear.py``: the LM
head's, and the Transformer++'s attention and MLP projections over the whole sequence) against PyTorch's own product
(``library_products()``), alternating step by step in one process. Which of the two the package takes by default on
this CPU (``onednn_preferred()``: oneDNN where PyTorch's product is MKL's on an x86 CPU not made by Intel) is printed.

    python benchmarks/bench_head_products.py [--threads 2] [--steps 12] [--T 512] [--no-compile] [--quick] [--prepack]

Models: the Transformer++ 'tiny' (its head is most of its step at vocab 32000; its layers' projections over 512 rows
go through oneDNN too), HOPE 'tiny' eager and with
``titans_compile="inductor"`` (their per-segment head: logits, ``softmax @ W``, the tied weight's gradient); batch 1,
fp32, ``model(x, labels=x).loss.backward()``. The two forms alternate step by step, so both see the same machine
state; medians of ``--steps`` steps each after two warm-up steps each. Freed memory is kept in the heap, as the
trainer keeps it. Passive OpenMP waiting unless ``OMP_WAIT_POLICY`` is set. The same-run 1024 x 1024 product through
each is printed too (PyTorch's fp32 matmul calls MKL, which may take a generic path on CPUs it does not recognise).

``--prepack``: HOPE eager and compiled only, both with the package's default products, with the head reordered once
per call for its segments' products (``CMSLanguageModel.prepacked_head``, ``fast_linear.prepack``) against reordered
by oneDNN at every product; an optimizer step after each training step changes the head, as in training, so every
call reorders it again.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    add_tiny_step_arguments,
    alternating_medians,
    compare_model_switch,
    compare_tiny_models,
    machine_line,
    matmul_flops_per_s,
    onednn_matmul_flops_per_s,
    tiny_step_setup,
)

from nested_learning.ops.fast_linear import library_products, onednn_preferred, onednn_products  # noqa: E402


def compare(model, x: torch.Tensor, steps: int) -> dict:
    """Median seconds of one training step with each product, alternating step by step."""
    def step(products):
        model.zero_grad(set_to_none=True)
        with products():
            model(x, labels=x).loss.backward()

    # two warm-up steps each (the first compiles)
    return alternating_medians({"oneDNN": lambda: step(onednn_products), "PyTorch": lambda: step(library_products)},
                               steps)


def compare_prepacked(model, x: torch.Tensor, steps: int) -> dict:
    """Median seconds of one training step and an SGD step with the head reordered once per call and per product,
    alternating step by step."""
    return compare_model_switch(model, x, steps, "prepacked_head", ("once", "per product"), sgd_lr=1e-4)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tiny_step_arguments(p)
    p.add_argument("--prepack", action="store_true", help="HOPE's head reordered once per call vs per product")
    args = p.parse_args(argv)
    vocab, T, steps, configs = tiny_step_setup(args)
    if args.prepack:
        print(f"HOPE training step, tiny preset, vocab {vocab}, T = {T}, batch 1, fp32, {args.threads} thread(s), "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, median of {steps} steps each, alternating; the "
              f"head reordered for its segments' products once per call or at every product (oneDNN: "
              f"{'the default here' if onednn_preferred() else 'not the default here, so both run alike'})")
        print(machine_line())
        print(f"{'model':>16} {'once tok/s':>11} {'per product':>12} {'speed-up':>9}")
        return compare_tiny_models(
            [c for c in configs if c[1] == "hope"], vocab, T, steps, compare_prepacked,
            lambda label, t: f"{label:>16} {T / t['once']:11.0f} {T / t['per product']:12.0f}"
                             f" {t['per product'] / t['once']:8.2f}x",
        )
    onednn = onednn_matmul_flops_per_s()
    print(f"training step, tiny presets, vocab {vocab}, T = {T}, batch 1, fp32, {args.threads} thread(s), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, median of {steps} steps each, alternating; "
          f"1024 x 1024 product: PyTorch {matmul_flops_per_s() / 1e9:.0f} GFLOP/s, oneDNN "
          + (f"{onednn / 1e9:.0f} GFLOP/s" if onednn else "not available")
          + f"; default here: {'oneDNN' if onednn_preferred() else 'PyTorch'}")
    print(machine_line())
    print(f"{'model':>16} {'oneDNN tok/s':>13} {'PyTorch tok/s':>14} {'speed-up':>9}")
    return compare_tiny_models(
        configs, vocab, T, steps, compare,
        lambda label, t: f"{label:>16} {T / t['oneDNN']:13.0f} {T / t['PyTorch']:14.0f} {t['PyTorch'] / t['oneDNN']:8.2f}x",
    )


if __name__ == "__main__":
    main()
