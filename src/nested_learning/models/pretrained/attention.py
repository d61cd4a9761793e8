"""A pretrained Llama-family attention as a sequence layer with a bounded, sliding KV cache.

``y, state = layer(x, state)``. The projections and the rotary embedding are the pretrained model's own modules
(grouped-query attention, its RoPE variant and scaling), so with the whole stream inside the window the output
equals the ``transformers`` layer's. Position t attends to positions (t - window, t]; the state keeps the last
``window - 1`` rotated keys and values, so a stream runs past the model's position limit with constant memory (what
leaves the window survives only in the CMS levels' fast weights). Any split of a stream gives the same outputs as
one call, because the mask is written in absolute stream positions.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from nested_learning.memory.state import LayerState


@dataclasses.dataclass
class WindowedKVCache(LayerState):
    """k, v: (B, H_kv, L, D), the last L <= window - 1 rotated keys and values; position: tokens seen so far."""

    k: torch.Tensor
    v: torch.Tensor
    position: int


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class WindowedLlamaAttention(nn.Module):
    """Wraps the ``q_proj, k_proj, v_proj, o_proj`` of a ``transformers`` Llama attention and the model's rotary
    embedding module; ``window`` bounds the attention span (tokens, the query's own included)."""

    def __init__(self, attn: nn.Module, rotary: nn.Module, n_heads: int, n_kv_heads: int, head_dim: int,
                 window: int):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be a positive number of tokens, got {window}")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.rotary = rotary
        self.n_heads, self.n_kv_heads, self.head_dim, self.window = n_heads, n_kv_heads, head_dim, window

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> WindowedKVCache:
        empty = torch.zeros(batch, self.n_kv_heads, 0, self.head_dim, device=device, dtype=dtype)
        return WindowedKVCache(empty, empty.clone(), 0)

    def forward(self, x: torch.Tensor, state: WindowedKVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        start = 0 if state is None else state.position
        positions = torch.arange(start, start + T, device=x.device)
        cos, sin = self.rotary(v, positions[None])  # (1, T, D), the model's RoPE variant and scaling
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        cached = 0 if state is None else state.k.shape[2]
        if cached:
            k = torch.cat([state.k.to(k.dtype), k], dim=2)
            v = torch.cat([state.v.to(v.dtype), v], dim=2)
        gqa = self.n_heads != self.n_kv_heads
        if cached == 0 and T <= self.window:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            key_pos = torch.arange(start - cached, start + T, device=x.device)
            rel = positions[:, None] - key_pos[None, :]  # how far back each key is
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=(rel >= 0) & (rel < self.window), enable_gqa=gqa)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        keep = min(self.window - 1, k.shape[2])
        tail = slice(k.shape[2] - keep, k.shape[2])
        return y, WindowedKVCache(k[:, :, tail], v[:, :, tail], start + T)
