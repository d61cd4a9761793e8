"""Linear attention and DeltaNet as two levels: level-0 projections (frozen) make the keys and values; a matrix
memory (frequency 1 per token) learns them by one gradient step per token on its own objective.

    linear attention:  S_t = argmin_S <S - S_{t-1}, grad(-<S k, v>)> + ||S - alpha_t S_{t-1}||^2 / 2     Eq 14-18
    DeltaNet:          S_t = argmin_S <S - S_{t-1}, grad(1/2 ||S k - v||^2)> + ||S - S_{t-1}||^2 / (2 beta_t)
                                                                                                         Eq 65
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from nested_learning.memory import DeltaNetLayer, LinearAttentionLayer

from ..proximal import linearized_step

OBJECTIVES = ("dot", "l2")


def _objective(kind: str, k: torch.Tensor, v: torch.Tensor):
    """The summed objective of every (batch, head) memory; S: (B, H, dv, dk), k: (B, H, dk), v: (B, H, dv)."""
    def read(S):
        return torch.einsum("bhvk,bhk->bhv", S, k)
    if kind == "dot":
        return lambda S: -(read(S) * v).sum()
    return lambda S: 0.5 * (read(S) - v).pow(2).sum()


def memory_level(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    objective: str,
    lr: torch.Tensor | None = None,
    retention: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix memory run token by token from its rule; read after the write (o_t = S_t q_t).

    q, k: (B, T, H, dk); v: (B, T, H, dv); lr, retention: (B, T, H) or None (1). Returns o: (B, T, H, dv), S_T."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    B, T, H, dk = k.shape
    S = torch.zeros(B, H, v.shape[-1], dk, dtype=q.dtype) if initial_state is None else initial_state
    outs = []
    for t in range(T):
        eta = 1.0 if lr is None else lr[:, t, :, None, None]
        anchor = S if retention is None else retention[:, t, :, None, None] * S
        S = linearized_step(_objective(objective, k[:, t], v[:, t]), S, eta, anchor)
        outs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, dim=1), S


def _level0_qkv(layer, x: torch.Tensor):
    state = layer.initial_state(x.shape[0], x.device, x.dtype)
    q, k, v, _ = layer._qkv(x, state)
    return q, k, v


def _level0_out(layer, o: torch.Tensor) -> torch.Tensor:
    return layer.to_out(rearrange(layer.out_norm(o), "b t h d -> b t (h d)"))


def linear_attention_from_levels(layer: LinearAttentionLayer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)[0]`` recomputed with the memory level stepped by its dot-product rule (lr 1, Eq 17-18)."""
    q, k, v = _level0_qkv(layer, x)
    alpha = None if layer.to_decay is None else torch.sigmoid(layer.to_decay(x))
    o, _ = memory_level(layer._phi(q), layer._phi(k), v, "dot", retention=alpha)
    return _level0_out(layer, o)


def deltanet_from_levels(layer: DeltaNetLayer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)[0]`` recomputed with the memory level stepped by its L2 rule (lr beta_t, Eq 65)."""
    q, k, v = _level0_qkv(layer, x)
    beta = torch.sigmoid(layer.to_beta(x))
    o, _ = memory_level(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, "l2", lr=beta)
    return _level0_out(layer, o)
