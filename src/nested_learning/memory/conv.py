"""Causal depthwise short convolution with a streaming cache (the local convolution, window 4, of Hope/Titans)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class ShortConv(nn.Module):
    """``y_t = sum_{j=0}^{K-1} w_j * x_{t-K+1+j}`` per channel: a causal depthwise convolution over time.

    ``forward(x, cache)`` takes ``x: (B, T, D)`` and ``cache: (B, K-1, D)`` (the last K-1 inputs of the previous call,
    or ``None`` for zeros) and returns ``(y: (B, T, D), new_cache: (B, K-1, D))``. Feeding a sequence in pieces with
    the cache gives the same outputs as one call. ``activation`` (e.g. ``nn.SiLU()``) is applied to ``y``.
    """

    def __init__(self, dim: int, kernel_size: int = 4, activation: nn.Module | None = None):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.dim, self.kernel_size = dim, kernel_size
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        # nn.Conv1d's default for a depthwise kernel (fan_in = K), so the layer starts as a small random mix
        bound = 1.0 / math.sqrt(kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        self.activation = activation if activation is not None else nn.Identity()

    def initial_cache(self, batch: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch, self.kernel_size - 1, self.dim, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        if cache is None:
            cache = self.initial_cache(B, x.device, x.dtype)
        padded = torch.cat([cache.to(x.dtype), x], dim=1)  # (B, K-1+T, D)
        # K shifted multiply-adds instead of F.conv1d: on CPU the depthwise conv1d backward is ~100x slower
        w = self.weight.to(x.dtype)
        y = padded[:, :T] * w[:, 0]
        for j in range(1, self.kernel_size):
            y = y + padded[:, j : j + T] * w[:, j]
        # a fresh contiguous copy, not a view of padded: every cache then has the same strides as a fresh one (one
        # compiled graph for a stream's calls, guards compare strides) and does not keep the call's whole input alive.
        # It keeps the given cache's dtype (a layer's state dtype: fp32 for bf16 inputs; x's values are cast up
        # exactly), so a stream's state has the dtypes its model's initial state has.
        new_cache = torch.empty(cache.shape, dtype=cache.dtype, device=x.device)
        new_cache.copy_(padded[:, padded.shape[1] - (self.kernel_size - 1) :])
        return self.activation(y), new_cache
