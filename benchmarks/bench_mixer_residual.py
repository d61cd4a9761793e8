"""HOPE's training step with each block's norms and residual sum inside its Titans layer call, against the block
op by op, alternating step by step in one process.

    python benchmarks/bench_mixer_residual.py [--threads 2] [--steps 12] [--T 512] [--no-compile] [--quick]

``CMSLanguageModel.fused_mixer_residual`` switches between ``SelfModifyingTitans.residual_forward`` (``x +
mixer(norm1(x))`` and ``norm2`` of it in one call: one compiled graph when the layer calls are compiled) and the
block as written (two norms, the layer and the sum, each on its own). HOPE 'tiny' eager and with
``titans_compile="inductor"``, vocab 32000, batch 1, ``model(x, labels=x).loss.backward()``; medians of ``--steps``
steps each after two warm-up steps each (the first compiles both forms); freed memory kept in the heap; passive
OpenMP waiting unless ``OMP_WAIT_POLICY`` is set.
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
    compare_model_switch,
    compare_tiny_models,
    machine_line,
    tiny_step_setup,
)


def compare(model, x: torch.Tensor, steps: int) -> dict:
    """Median seconds of one training step with each form, alternating step by step."""
    return compare_model_switch(model, x, steps, "fused_mixer_residual", ("fused", "op by op"))


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tiny_step_arguments(p)
    args = p.parse_args(argv)
    vocab, T, steps, configs = tiny_step_setup(args)
    print(f"HOPE tiny training step, vocab {vocab}, T = {T}, batch 1, {args.threads} thread(s), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, median of {steps} steps each, alternating")
    print(machine_line())
    print(f"{'model':>14} {'fused tok/s':>12} {'op by op tok/s':>15} {'fused / op by op':>17}")
    return compare_tiny_models(
        [c for c in configs if c[1] == "hope"], vocab, T, steps, compare,
        lambda label, t: f"{label:>14} {T / t['fused']:12.0f} {T / t['op by op']:15.0f} "
                         f"{t['op by op'] / t['fused']:16.3f}x",
    )


if __name__ == "__main__":
    main()
