"""Titans' neural memory, forward + backward: its whole-chunk step eager, compiled with its hand-written backward (as
one node for a call's run of chunks, and chunk by chunk), and compiled with the compiler's own backward, alternating
step by step in one process.

    python benchmarks/bench_neural_memory_step.py [--threads 2] [--steps 12] [--lengths 512 2048 8192] [--quick]

``NeuralMemory(256, n_heads=4, chunk_size=64, expansion=4)`` (Eq 90 exact, the configuration of ``bench_peers.py``),
batch 1, fp32, ``y.pow(2).mean().backward()``. The forms (``memory/neural_memory_chunk_grad.py``,
``memory/neural_memory_chunk_loop.py``):

- eager: the hand-written forward and backward op by op (what the layer runs by default);
- compiled: the same forward and backward, each compiled as one function without autograd (what
  ``NeuralMemory.compile_chunk_step`` runs). Under passive waiting with several threads both run a call's chunks
  as one node whose batch of memories splits across the threads once;
- compiled, chunk by chunk: the same, one node per chunk, the batch split and joined again every chunk;
- compiled, the compiler's backward: ``torch.compile`` of the reference ``mlp_chunk_step``, its backward derived
  by the compiler (under passive waiting it cannot split the batch's memories across threads).

The layer is switched between them before every step, so all see the same machine state; medians of ``--steps``
steps each after two warm-up steps each (the first compiles). Freed memory is kept in the heap, as the trainer
keeps it. Passive OpenMP waiting unless ``OMP_WAIT_POLICY`` is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from nested_learning.memory import NeuralMemory  # noqa: E402
from nested_learning.memory.compiled_steps import compiled  # noqa: E402
from nested_learning.memory.neural_memory_fused import mlp_chunk_step  # noqa: E402
from nested_learning.training.cpu_memory import keep_freed_cpu_memory  # noqa: E402


def forms(backend: str) -> dict:
    """The forms to compare: for each, (compile backend of the layer, the chunk step to run per chunk or None for the
    layer's own, whether a training call may run its chunks as one split node, ``neural_memory_chunk_loop``)."""
    return {
        "eager": (None, None, True),
        "compiled": (backend, None, True),
        "compiled, chunk by chunk": (backend, None, False),
        "compiled, compiler's backward": (None, lambda *a: compiled(mlp_chunk_step, backend)(*a), False),
    }


def compare(T: int, steps: int, backend: str, dim: int = 256) -> dict:
    """Median seconds of one forward + backward at length T with each form, alternating step by step."""
    torch.manual_seed(0)
    layer = NeuralMemory(dim, n_heads=4, chunk_size=64, expansion=4)
    x = torch.randn(1, T, dim)
    loop_parts = layer._loop_parts
    times = {name: [] for name in forms(backend)}
    for i in range(steps + 2):
        for name, (compile_backend, step, loop) in forms(backend).items():
            layer.compile_backend = compile_backend
            # instance attributes over the methods: this form for every whole chunk
            layer._chunk_step = step if step is not None else functools.partial(NeuralMemory._chunk_step, layer)
            layer._loop_parts = loop_parts if loop else (lambda *a: 1)
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
    print(f"{'T':>6} " + " ".join(f"{n:>30}" for n in names)
          + f" {'compiled / eager':>17} {'/ chunk by chunk':>17} {'/ compiler bwd':>15}")
    rows = []
    for T in lengths:
        t = compare(T, steps, backend)
        rows.append((T, t))
        rates = [T / t[n] for n in names]
        print(f"{T:6d} " + " ".join(f"{r:30.0f}" for r in rates)
              + f" {rates[1] / rates[0]:16.2f}x {rates[1] / rates[2]:16.2f}x {rates[1] / rates[3]:14.2f}x")
    return rows


if __name__ == "__main__":
    main()
