"""Fast path of :class:`~nested_learning.memory.neural_memory.NeuralMemory` for whole chunks of an MLP memory.

The reference form (``NeuralMemory._segment``) works on one chunk at a time through the generic
``FastWeightMemory`` interface. This module computes the same numbers (tested against it and against the token loop)
with less work per chunk, which matters because the chunks form a sequential recurrence (Eq 90: chunk c's gradients
are taken at its own start weights):

- everything that depends only on the gates and on q, k, v is computed once for all whole chunks of a call, batched
  (``gate_terms``, the products q k^T, the write columns k scaled by each token's last-row coefficients);
- the weights stay as deviations from the initial memory and transposed, ``(N, d_in, d_out)``, so that every
  product on the chunk path multiplies stored operands as X @ Y (with earlier torch builds batched X @ Y^T was
  about 2.5x slower on CPU; with torch 2.13 the two run at the same speed);
- each read of a weight, its momentum and its initial value is one product against the three side by side;
- ``mlp_chunk_step`` is a pure function of tensors, so ``torch.compile`` can take it whole (one graph, static
  shapes; ``compiled_steps``), with the eager function as the fallback.
"""

from __future__ import annotations

import functools

import torch

from .memories import _ACTIVATION_VJPS, _ACTIVATIONS


@functools.lru_cache(maxsize=64)
def _strict_upper(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def causal_ratio(log_cum: torch.Tensor) -> torch.Tensor:
    """``R[..., t, i] = exp(log_cum_t - log_cum_i)`` for i <= t, else 0. log_cum: (..., n) -> (..., n, n)."""
    diff = log_cum.unsqueeze(-1) - log_cum.unsqueeze(-2)
    # masked before exp, so the entries above the diagonal never overflow
    return torch.exp(diff.masked_fill(_strict_upper(log_cum.shape[-1], log_cum.device), float("-inf")))


def gate_terms(theta: torch.Tensor, log_eta: torch.Tensor, log_keep: torch.Tensor):
    """Coefficients of the unrolled momentum and retention recurrences over segments of n tokens (module docstring
    of ``neural_memory``), for any leading shape: gates (..., n) ->

    coef (..., n, n): C[t, i] theta_i, the weight of -g_i in M_t;  scales (..., n, 2): [F_t, B_t];
    c_last (..., 2, n, 1): the weights of -g_i in the segment's last M and last S;
    f_last, b_last, e_last (..., 1, 1): F, B and E at the segment's last token.
    """
    g = torch.stack([log_eta, log_keep]).cumsum(-1)  # (2, ..., n): log E_t, log F_t
    P, D = causal_ratio(g)  # P[j, i] = E_j / E_i, D[t, j] = F_t / F_j
    E, Fk = torch.exp(g)
    coef = (D @ P) * theta.unsqueeze(-2)
    scales = torch.stack([Fk, (D @ E.unsqueeze(-1)).squeeze(-1)], dim=-1)
    c_last = torch.stack([coef[..., -1, :], P[..., -1, :] * theta], dim=-2).unsqueeze(-1)
    f_last, b_last, e_last = (t[..., -1, None, None] for t in (Fk, scales[..., 1], E))
    return coef, scales, c_last, f_last, b_last, e_last


def mlp_chunk_step(
    W2t, W1t, S2t, S1t, W2st, W1st, k, kv, q, qk_coef, ck_T, coef, scales, c_last, f_last, b_last, e_last,
    activation: str, grad_clip: float | None,
):
    """One whole Eq 90 chunk of an MLP memory M(x) = x + W1 sigma(W2 x) (Eq 89), starting at a chunk boundary.

    Weights, transposed: W2t, S2t, W2st: (N, dh, hid); W1t, S1t, W1st: (N, hid, dh). W*t are the memory minus its
    initial value W*st (the running deviation the retention decays), S*t the momenta; W2st = W1st = None for
    retention toward zero (then W*t are the weights themselves). Per chunk, from ``gate_terms`` and the call's
    batched products: k, q: (N, n, dh); kv = k - v; qk_coef = (q k^T) * coef: (N, n, n); ck_T = (c_last * k)^T:
    (N, 2, dh, n). Returns the reads M_t(q_t) (N, n, dh) and the new W2t, W1t, S2t, S1t.
    """
    sigma, sigma_vjp = _ACTIVATIONS[activation], _ACTIVATION_VJPS[activation]
    initial = W2st is not None
    W2f, W1f = (W2t + W2st, W1t + W1st) if initial else (W2t, W1t)  # the memory the chunk's gradients are taken at
    # associative loss ||M(k) - v||^2 at the chunk's start weights: per-token factors [d0 (x) k, e (x) h]
    z = k @ W2f
    h = sigma(z)
    e = 2.0 * torch.baddbmm(kv, h, W1f)
    d0 = sigma_vjp(e @ W1f.mT, z)
    if grad_clip is not None:  # ||g_t||_F^2 = ||d0_t||^2 ||k_t||^2 + ||e_t||^2 ||h_t||^2
        sq = d0.square().sum(-1) * k.square().sum(-1) + e.square().sum(-1) * h.square().sum(-1)
        scale = (grad_clip * sq.clamp_min(grad_clip**2).rsqrt()).unsqueeze(-1)
        d0, e = d0 * scale, e * scale

    # reads with the per-token weights (dual form): F_t W a + B_t S a [+ W* a] - sum_i C[t, i] theta_i (a_i.a) delta_i
    row = torch.cat([scales, torch.ones_like(scales[..., :1])], -1) if initial else scales
    row = row.unsqueeze(-1)  # (N, n, 3 or 2, 1)

    def read(a, Wt, St, Wst, dual, delta):
        side = torch.cat([Wt, St, Wst] if initial else [Wt, St], dim=-1)
        base = (a @ side).unflatten(-1, (row.shape[-2], Wt.shape[-1]))
        return torch.baddbmm((base * row).sum(-2), dual, delta, alpha=-1.0)

    a1 = sigma(read(q, W2t, S2t, W2st, qk_coef, d0))
    y = q + read(a1, W1t, S1t, W1st, (a1 @ h.mT) * coef, e)

    # the chunk's end state: M = F M + B S - sum_i c_i g_i, S = E S - sum_i c'_i g_i, g_i = delta_i a_i^T
    dW2, dS2 = (ck_T @ d0.unsqueeze(1)).unbind(1)  # (N, dh, hid) each
    dW1, dS1 = (h.mT.unsqueeze(1) @ (c_last * e.unsqueeze(1))).unbind(1)  # (N, hid, dh) each
    W2n = f_last * W2t + b_last * S2t - dW2
    W1n = f_last * W1t + b_last * S1t - dW1
    return y, W2n, W1n, e_last * S2t - dS2, e_last * S1t - dS1

