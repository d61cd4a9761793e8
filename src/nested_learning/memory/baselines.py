"""Matrix-memory baselines on the ops, with the layer contract ``y, state = layer(x, state=None)``, x: (B, T, dim).

- :class:`DeltaNetLayer`: DeltaNet (Eq 65), S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t.
- :class:`LinearAttentionLayer`: linear attention (Eq 14-18, the Hebbian FWP of Eq 5), S_t = alpha_t S_{t-1} +
  v_t phi(k_t)^T, o_t = S_t phi(q_t), with an optional data-dependent decay alpha_t.

Titans' neural memory is :class:`nested_learning.memory.NeuralMemory` itself (same contract).
Both layers read with the state after the token's write (read="after"), as in their original papers, and normalise
each head's read with an RMSNorm before the output projection.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops import delta_rule, linear_attention
from ..ops._validation import check_layer_input
from ..ops.fast_linear import linear_layer
from .conv import ShortConv
from .state import LayerState


@dataclasses.dataclass
class MatrixMemoryState(LayerState):
    """memory: ``(B, H, dh, dh)`` fast-weight matrix S_t (fp32, or fp64 for fp64 inputs); conv: ``(B, K-1, 3*dim)``
    cache of the short convolution on [q, k, v], or None."""

    memory: torch.Tensor
    conv: torch.Tensor | None


class _MatrixMemoryLayer(nn.Module):
    """q, k, v projections, optional short conv on them, per-head matrix memory, RMSNorm, output projection."""

    def __init__(
        self, dim: int, n_heads: int, chunk_size: int, conv_size: int, conv_activation: nn.Module | None
    ):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        self.dim, self.n_heads, self.head_dim, self.chunk_size = dim, n_heads, dim // n_heads, chunk_size
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        # one depthwise conv over the concatenation is exactly three separate convs on q, k, v
        self.conv = ShortConv(3 * dim, conv_size, conv_activation) if conv_size > 0 else None
        self.out_norm = nn.RMSNorm(self.head_dim)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> MatrixMemoryState:
        dh = self.head_dim
        conv = None if self.conv is None else self.conv.initial_cache(batch, device, dtype)
        return MatrixMemoryState(torch.zeros(batch, self.n_heads, dh, dh, device=device, dtype=dtype), conv)

    def _qkv(self, x: torch.Tensor, state: MatrixMemoryState):
        qkv, conv = linear_layer(self.to_qkv, x), state.conv  # over many rows through oneDNN (ops/fast_linear.py)
        if self.conv is not None:
            qkv, conv = self.conv(qkv, conv)
        q, k, v = rearrange(qkv, "b t (s h d) -> s b t h d", s=3, h=self.n_heads)
        return q, k, v, conv

    def _memory(self, x, q, k, v, state) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: MatrixMemoryState | None = None):
        """x: (B, T, dim) -> y: (B, T, dim), new state."""
        check_layer_input(x, self.to_out.in_features)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if state is None:
            state = self.initial_state(x.shape[0], x.device, dtype)
        q, k, v, conv = self._qkv(x, state)
        o, S = self._memory(x, q, k, v, state)
        y = rearrange(self.out_norm(o.to(x.dtype)), "b t h d -> b t (h d)")
        return linear_layer(self.to_out, y), MatrixMemoryState(S, conv)


class DeltaNetLayer(_MatrixMemoryLayer):
    """DeltaNet (Eq 65): q, k, v projections, short conv + SiLU, L2-normalised q and k, beta_t = sigmoid(x_t w_beta)
    per head, ``ops.delta_rule`` with alpha = None. State: :class:`MatrixMemoryState`."""

    def __init__(
        self, dim: int, n_heads: int = 4, chunk_size: int = 64, conv_size: int = 4, mode: str = "chunk"
    ):
        super().__init__(dim, n_heads, chunk_size, conv_size, nn.SiLU())
        self.to_beta = nn.Linear(dim, n_heads)
        self.mode = mode

    def _memory(self, x, q, k, v, state):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        beta = torch.sigmoid(self.to_beta(x))
        return delta_rule(
            q,
            k,
            v,
            beta,
            None,
            initial_state=state.memory,
            chunk_size=self.chunk_size,
            mode=self.mode,
            read="after",
        )


FEATURE_MAPS = ("elu", "l2")


class LinearAttentionLayer(_MatrixMemoryLayer):
    """Linear attention (Eq 14-18): S_t = alpha_t S_{t-1} + v_t phi(k_t)^T, o_t = S_t phi(q_t).

    feature_map: ``"elu"`` (phi = elu + 1, Katharopoulos et al.) or ``"l2"`` (phi = L2 normalisation).
    decay: alpha_t = sigmoid(x_t w_alpha + b) per head (b starts at ``decay_bias``); False gives alpha = 1 (Eq 16).
    No conv by default (the plain layer of Eq 14-16); conv_size > 0 adds the short conv.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 4,
        chunk_size: int = 64,
        conv_size: int = 0,
        feature_map: str = "elu",
        decay: bool = False,
        decay_bias: float = 3.0,
        mode: str = "chunk",
    ):
        super().__init__(dim, n_heads, chunk_size, conv_size, None)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        self.feature_map, self.mode = feature_map, mode
        self.to_decay = nn.Linear(dim, n_heads) if decay else None
        if decay:
            nn.init.constant_(self.to_decay.bias, decay_bias)

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1.0 if self.feature_map == "elu" else F.normalize(x, dim=-1)

    def _memory(self, x, q, k, v, state):
        alpha = None if self.to_decay is None else torch.sigmoid(self.to_decay(x))
        return linear_attention(
            self._phi(q),
            self._phi(k),
            v,
            alpha,
            initial_state=state.memory,
            chunk_size=self.chunk_size,
            mode=self.mode,
            read="after",
        )
