"""Causal softmax self-attention as a sequence layer whose state is its KV cache.

In the paper's terms attention is the level of frequency infinity: a non-parametric memory that stores every key and
value it sees. ``y, state = layer(x, state)``; with a state, the new tokens attend to the cached ones, so streaming a
sequence in pieces gives the same outputs as one call.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from nested_learning.memory.state import LayerState
from nested_learning.models.layers import apply_rope, rope_cache
from nested_learning.ops.fast_linear import linear_layer


@dataclasses.dataclass
class KVCache(LayerState):
    k: torch.Tensor  # (B, H, T_cached, D)
    v: torch.Tensor  # (B, H, T_cached, D)

    @property
    def length(self) -> int:
        return self.k.shape[2]


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, rope_theta: float = 10000.0, max_cache: int | None = None):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} must be divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.rope_theta = rope_theta
        self.max_cache = max_cache
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        B, T, _ = x.shape
        # products over many rows through oneDNN (ops/fast_linear.py)
        q, k, v = linear_layer(self.qkv, x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        start = 0 if state is None else state.length
        if self.max_cache is not None and start + T > self.max_cache:
            raise ValueError(
                f"attention context of {start + T} tokens exceeds the model's limit of {self.max_cache} tokens"
            )
        cos, sin = rope_cache(self.head_dim, torch.arange(start, start + T, device=x.device), self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None and start > 0:
            k = torch.cat([state.k, k], dim=2)
            v = torch.cat([state.v, v], dim=2)
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # New queries sit at positions start..start+T-1: each sees the whole cache and its own prefix.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return linear_layer(self.out, y), KVCache(k=k, v=v)
