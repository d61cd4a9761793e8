"""Training throughput of the Transformer++ baseline and its achieved FLOP/s as a fraction of an fp32 matmul.

    python benchmarks/bench_transformer.py [--size tiny] [--threads 2] [--quick]

FLOPs per token (forward + backward = 3x forward): 6 * (non-embedding matmul parameters + the tied head,
dim * vocab) + 12 * n_layers * dim * T / 2 for causal attention scores and values (half the square is masked).
Both rates are measured in the same run, so the fraction is comparable across machines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nested_learning.training.cpu_memory import keep_freed_cpu_memory

sys.path.insert(0, str(Path(__file__).parent))
from _timing import matmul_flops_per_s, time_fn  # noqa: E402

from nested_learning.models import TransformerPP  # noqa: E402


def flops_per_token(model: TransformerPP, seq_len: int) -> float:
    c = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    head = c.dim * c.vocab_size
    attention = 12 * c.n_layers * c.dim * seq_len / 2
    return 6 * (matmul_params + head) + attention


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-lens", default="128,512")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()  # as the trainer does
    torch.manual_seed(0)
    model = TransformerPP.from_preset(args.size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seq_lens = [64] if args.quick else [int(s) for s in args.seq_lens.split(",")]
    iters = 1 if args.quick else 3
    peak = matmul_flops_per_s(1024)
    print(f"Transformer++ {args.size}: {model.num_parameters() / 1e6:.2f} M parameters, {args.threads} threads; "
          f"fp32 matmul (1024^3) in this run: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'T':>6} {'batch':>6} {'tokens/s':>10} {'GFLOP/s':>9} {'of matmul':>10}")
    for T in seq_lens:
        x = torch.randint(0, model.config.vocab_size, (args.batch, T))

        def step(x=x):
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        seconds = time_fn(step, warmup=1, iters=iters)
        tps = args.batch * T / seconds
        rate = tps * flops_per_token(model, T)
        print(f"{T:>6} {args.batch:>6} {tps:>10,.0f} {rate / 1e9:>9.1f} {rate / peak:>10.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
