"""Forward+backward throughput of the memory layers next to causal softmax attention, and the chunk-wise speed-up.

    python benchmarks/bench_memory.py [--threads 2] [--quick] [--seq-lens 512,2048,8192] [--dim 256] [--heads 4]

Layers (fp32, batch 1): SelfModifyingTitans (L2 objective; matrix memories and Eq 89 MLP memories), NeuralMemory
(MLP memory, Eq 89), and softmax attention with q/k/v/o projections (F.scaled_dot_product_attention, causal) of the
same width. Every number is a ratio to something timed in the same run: tokens/s relative to attention at the same
T, and the chunk-wise form relative to its token loop (chunk_size=1, i.e. Eq 83-88 token by token, and the
recurrent delta-rule op at the same chunk size, which computes the same outputs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _timing import matmul_flops_per_s, time_fn  # noqa: E402

from nested_learning.memory import NeuralMemory, SelfModifyingTitans  # noqa: E402


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with q/k/v/o projections (the reference layer)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x, state=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D)), None


def fwd_bwd_step(layer: nn.Module, x: torch.Tensor):
    def step():
        y, _ = layer(x)
        y.pow(2).mean().backward()
        layer.zero_grad(set_to_none=True)

    return step


def interleaved_seconds(steps: dict, rounds: int) -> dict:
    """Fastest time of each step over ``rounds`` rounds, timing every step once per round: on a shared machine a
    busy period then slows all of them alike instead of one, so the ratios stay meaningful."""
    for step in steps.values():
        step()  # warm-up
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = min(best[name], time_fn(step, warmup=0, iters=1))
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="T = 512 only, one timed iteration")
    p.add_argument("--seq-lens", default="512,2048,8192")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--loop-len", type=int, default=512, help="T of the chunk-wise vs token-loop comparison")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    seq_lens = [512] if args.quick else [int(s) for s in args.seq_lens.split(",")]
    rounds = 1 if args.quick else 3
    dim, heads, chunk = args.dim, args.heads, args.chunk
    layers = {
        "attention": SoftmaxAttention(dim, heads),
        "self-modifying titans": SelfModifyingTitans(dim, heads, chunk_size=chunk),
        "self-modifying (mlp)": SelfModifyingTitans(dim, heads, chunk_size=chunk, memory="mlp"),
        "neural memory (mlp)": NeuralMemory(dim, heads, chunk_size=chunk),
    }
    print(
        f"dim {dim}, heads {heads}, chunk {chunk}, batch 1, fp32, {args.threads} threads; "
        f"fp32 matmul (1024^3) in this run: {matmul_flops_per_s(1024) / 1e9:.1f} GFLOP/s"
    )
    print(f"{'T':>6}  {'layer':<24}{'fwd+bwd tokens/s':>18}{'vs attention':>14}", flush=True)
    for T in seq_lens:
        x = torch.randn(1, T, dim)
        seconds = interleaved_seconds(
            {name: fwd_bwd_step(layer, x) for name, layer in layers.items()}, rounds
        )
        rates = {name: T / s for name, s in seconds.items()}
        for name, rate in rates.items():
            print(f"{T:>6}  {name:<24}{rate:>18.0f}{rate / rates['attention']:>13.2f}x", flush=True)

    T = min(args.loop_len, max(seq_lens))
    x = torch.randn(1, T, dim)
    print(f"\nchunk-wise vs token loop at T = {T} (fwd+bwd):")
    pairs = {
        "titans chunk=C vs chunk=1 (Eq 88 per token)": (
            SelfModifyingTitans(dim, heads, chunk_size=chunk),
            SelfModifyingTitans(dim, heads, chunk_size=1),
        ),
        "titans delta op chunk vs recurrent, same C": (
            SelfModifyingTitans(dim, heads, chunk_size=chunk),
            SelfModifyingTitans(dim, heads, chunk_size=chunk, op_mode="recurrent"),
        ),
        "neural memory chunk=C vs chunk=1": (
            NeuralMemory(dim, heads, chunk_size=chunk),
            NeuralMemory(dim, heads, chunk_size=1),
        ),
    }
    for name, (fast, slow) in pairs.items():
        seconds = interleaved_seconds(
            {"fast": fwd_bwd_step(fast, x), "slow": fwd_bwd_step(slow, x)}, min(rounds, 2)
        )
        t_fast, t_slow = seconds["fast"], seconds["slow"]
        print(
            f"  {name:<46} {t_slow / t_fast:>7.1f}x faster ({T / t_fast:.0f} vs {T / t_slow:.0f} tokens/s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
