"""Building blocks shared by the language models: RMSNorm, SwiGLU MLP, rotary position embedding."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nested_learning.ops.fast_linear import linear_layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Half precision is normalised in fp32; fp32 and fp64 keep their own precision.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """``W_down (silu(W_gate x) * W_up x)``; hidden size rounded to a multiple of 32 for matmul efficiency."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or int(8 * dim / 3)
        hidden = 32 * ((hidden + 31) // 32)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # products over many rows through oneDNN (ops/fast_linear.py)
        gate, up = linear_layer(self.gate_up, x).chunk(2, dim=-1)
        return linear_layer(self.down, F.silu(gate) * up)


def rope_cache(head_dim: int, positions: torch.Tensor, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (T, head_dim // 2) for integer ``positions: (T,)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of ``x: (B, H, T, D)`` (half-split layout) by the angles in ``cos, sin: (T, D/2)``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
