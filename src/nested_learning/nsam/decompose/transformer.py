"""Transformer++ as two levels: attention's KV cache, a non-parametric memory of frequency infinity (it stores
every pair), over level-0 weights (projections, MLPs, norms, embedding) that do not change in context.

The cache's read is the minimiser of its objective (Nadaraya-Watson regression, the attention of MIRAS):

    o_t = argmin_o sum_{i <= t} exp(q_t . k_i / sqrt(d)) ||o - v_i||^2 = sum_i softmax_i(q_t . k / sqrt(d)) v_i
"""

from __future__ import annotations

import math

import torch

from nested_learning.models.layers import apply_rope, rope_cache
from nested_learning.models.transformer import TransformerPP


class KeyValueMemory:
    """The level of frequency infinity: ``write`` stores a pair, ``read`` solves the weighted regression above.
    k, v: (B, H, 1, D) per write; q: (B, H, 1, D)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys.append(k)
        self.values.append(v)

    def read(self, q: torch.Tensor) -> torch.Tensor:
        K, V = torch.cat(self.keys, dim=2), torch.cat(self.values, dim=2)
        score = (q @ K.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        w = torch.exp(score - score.amax(-1, keepdim=True))  # the weights; the shift cancels in the ratio
        # d/do sum_i w_i ||o - v_i||^2 = 0  <=>  o = sum_i w_i v_i / sum_i w_i
        return (w @ V) / w.sum(-1, keepdim=True)


def transformer_from_levels(model: TransformerPP, ids: torch.Tensor) -> torch.Tensor:
    """``model(ids).logits`` recomputed token by token: level-0 modules for everything but attention's memory."""
    memories = [KeyValueMemory() for _ in model.blocks]
    logits = []
    for t in range(ids.shape[1]):
        x = model.embed(ids[:, t : t + 1])
        for block, memory in zip(model.blocks, memories):
            attn = block.mixer
            B = x.shape[0]
            q, k, v = attn.qkv(block.norm1(x)).view(B, 1, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            cos, sin = rope_cache(attn.head_dim, torch.tensor([t]), attn.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            memory.write(k, v)
            o = memory.read(q).transpose(1, 2).reshape(B, 1, -1)
            x = x + attn.out(o)
            x = x + block.mlp(block.norm2(x))
        logits.append(model.head(model.norm(x)))
    return torch.cat(logits, dim=1)
