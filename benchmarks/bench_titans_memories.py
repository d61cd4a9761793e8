"""HOPE's training step with matrix vs Eq 89 MLP self-modifying Titans memories, in one run.

    python benchmarks/bench_titans_memories.py [--seq-len 512] [--threads 1] [--repeats 3]

HOPE tiny (dim 128, 2 layers, 4 heads, vocab 32000, default CMS chunks), batch 1, ``model(x, labels=x).loss.backward()``
with test-time memory writes; the two models alternate and each reports its best of ``--repeats`` steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from nested_learning.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {m: build_model("hope", "tiny", vocab_size=32000, titans_memory=m) for m in ("linear", "mlp")}
    x = torch.randint(0, 32000, (1, args.seq_len))
    best = {m: 0.0 for m in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(x, labels=x).loss.backward()
            best[name] = max(best[name], args.seq_len / (time.perf_counter() - t0))
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{name:>6} memories: {best[name]:7.0f} tok/s  {n:.2f} M parameters")
    print(f"mlp / linear: {best['mlp'] / best['linear']:.2f}x")


if __name__ == "__main__":
    main()
