"""Titans' neural memory, forward + backward: its whole-chunk step eager, compiled with its hand-written backward,
and compiled with the compiler's own backward, alternating step by step in one process.

    python benchmarks/bench_neural_memory_step.py [--threads 2] [--steps 12] [--lengths 512 2048 8192] [--quick]

``NeuralMemory(256, n_heads=4, chunk_size=64, expansion=4)`` (Eq 90 exact, the configuration of ``bench_peers.py``),
batch 1, fp32, ``y.pow(2).mean().backward()``. The three forms of the chunk step (``memory/neural_memory_chunk_grad.py``):

- eager: ``mlp_chunk_step_hand_grad``, the hand-written forward and backward op by op;
- compiled: the same forward and backward, each compiled as one function without autograd (what
  ``NeuralMemory.compile_chunk_step`` runs);
- compiled, the compiler's backward: ``torch.compile`` of the reference ``mlp_chunk_step``, its backward derived
  by the compiler (under passive waiting it cannot split the batch's memories across threads).

The layer's step is switched between them before every step, so all three see the same machine state; medians of
``--steps`` steps each after two warm-up steps each (the first compiles). Freed memory is kept in the heap, as the
trainer keeps it. Passive OpenMP waiting unless ``OMP_WAIT_POLICY`` is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from nested_learning.memory import NeuralMemory  # noqa: E402
from nested_learning.memory.compiled_steps import compiled  # noqa: E402
from nested_learning.memory.neural_memory_chunk_grad import mlp_chunk_step_hand_grad  # noqa: E402
from nested_learning.memory.neural_memory_fused import mlp_chunk_step  # noqa: E402
from nested_learning.training.cpu_memory import keep_freed_cpu_memory  # noqa: E402


def forms(backend: str) -> dict:
    """The chunk steps to compare, each a function of ``mlp_chunk_step``'s arguments."""
    return {
        "eager": mlp_chunk_step_hand_grad,
        "compiled": lambda *a: mlp_chunk_step_hand_grad(*a, compile=backend),
        "compiled, compiler's backward": lambda *a: compiled(mlp_chunk_step, backend)(*a),
    }


def compare(T: int, steps: int, backend: str, dim: int = 256) -> dict:
    """Median seconds of one forward + backward at length T with each form, alternating step by step."""
    torch.manual_seed(0)
    layer = NeuralMemory(dim, n_heads=4, chunk_size=64, expansion=4)
    x = torch.randn(1, T, dim)
    steps_of = forms(backend)
    times = {name: [] for name in steps_of}
    for i in range(steps + 2):
        for name, step in steps_of.items():
            layer._chunk_step = step  # an instance attribute over the method: this form for every whole chunk
            start = time.perf_counter()
            y, _ = layer(x)
            y.pow(2).mean().backward()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
            layer.zero_grad(set_to_none=True)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--backend", default="inductor")
    p.add_argument("--quick", action="store_true", help="T = 128, 2 steps, backend aot_eager (a smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()
    lengths, steps, backend = ([128], 2, "aot_eager") if args.quick else (args.lengths, args.steps, args.backend)
    names = list(forms(backend))
    print(f"NeuralMemory(256, n_heads=4, chunk_size=64, expansion=4) forward+backward, batch 1, fp32, "
          f"{args.threads} thread(s), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, backend {backend}, "
          f"median of {steps} steps each, the forms alternating; tokens/s")
    print(f"{'T':>6} " + " ".join(f"{n:>30}" for n in names) + f" {'compiled / eager':>17} {'/ compiler bwd':>15}")
    rows = []
    for T in lengths:
        t = compare(T, steps, backend)
        rows.append((T, t))
        rates = [T / t[n] for n in names]
        print(f"{T:6d} " + " ".join(f"{r:30.0f}" for r in rates)
              + f" {rates[1] / rates[0]:16.2f}x {rates[1] / rates[2]:14.2f}x")
    return rows


if __name__ == "__main__":
    main()
