"""Chunk-parallel form of the delta rule (Eq 65/88/93) via the WY (UT) representation.

Inside a chunk of C tokens starting from state S_0, write the update as
    S_t = alpha_t S_{t-1} + u_t k_t^T,   u_t = eta_t (v_t - S_{t-1} k_t)
so that, with gamma_t = prod_{i <= t} alpha_i (inside the chunk),
    S_t = gamma_t S_0 + sum_{i <= t} (gamma_t / gamma_i) u_i k_i^T.
Substituting S_{t-1} into u_t gives a unit-lower-triangular system for the rows of U (C, Dv):
    (I + L) U = diag(eta) V - diag(eta gamma_prev) K S_0^T,   L[t, i] = eta_t (gamma_{t-1} / gamma_i) k_t.k_i  (i < t)
One triangular solve per chunk, independent of S_0, gives U = W1 - W2 S_0^T, and the chunk's end state is
    S_C = gamma_C S_0 + U^T K_tail,   K_tail[i] = (gamma_C / gamma_i) k_i.
The solves and every C x C product are batched over all chunks at once; the only Python loop is the state
recurrence over chunks (U_n = W1_n - W2_n S^T, then S <- gamma_C S + U_n^T K_tail_n). Outputs, again batched:
    read="after":  o_t = gamma_t S_0 q_t + sum_{i <= t} (gamma_t / gamma_i) (q_t.k_i) u_i
    read="before": o_t = gamma_{t-1} S_0 q_t + sum_{i < t} (gamma_{t-1} / gamma_i) (q_t.k_i) u_i

Decay ratios gamma_t / gamma_i come from log-cumsums g = log gamma. When every chunk's log-decay range |g_C| is
small enough that exp(+-g) stays far from overflow, they are factored as exp(g_t) exp(-g_i) into the row and
column scales of the matmuls (no C x C exp); otherwise the masked differences exp(g_t - g_i) are formed directly,
which is exact for any alpha in (0, 1].
"""

from __future__ import annotations

import torch

from ._common import chunk_log_decay, decay_matrix, factored_decay_ok, from_chunks, to_chunks
from ._common import scale_rows as _rows


def _intra_chunk_masked(q, k, eta, g, g_prev, read):
    """L (strict lower part used) and the read matrix P with decays exp(g_rows_t - g_i) formed on the causal
    mask: exact for any decay range. q, k: (..., C, Dk), eta, g, g_prev: (..., C)."""
    C = k.shape[-2]
    decay_strict = decay_matrix(g, g_prev, C, strict=True, like=k)
    L = (_rows(k, None, eta) @ k.mT) * decay_strict
    decay_read = decay_matrix(g, g, C, strict=False, like=k) if read == "after" else decay_strict
    return L, (q @ k.mT) * decay_read


def delta_rule_chunk(q, k, v, eta, alpha, initial_state, chunk_size, read, dtype):
    """Chunked delta rule. q, k: (B, T, H, Dk), v: (B, T, H, Dv), eta, alpha: (B, T, H), state (B, H, Dv, Dk).

    Returns o: (B, T, H, Dv) and S_T: (B, H, Dv, Dk), both in ``dtype``.

    Layout: every product is arranged as X @ Y or X^T @ Y on stored operands (never X @ Y^T, which CPU batched
    gemm runs ~2.5x slower at these sizes); hence the state is carried transposed, R = S^T: (B*H, Dk, Dv).
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    if initial_state is None:
        R = q.new_zeros(B * H, Dk, Dv, dtype=dtype)
    else:
        R = initial_state.to(dtype).reshape(B * H, Dv, Dk).mT.contiguous()
    if T == 0:
        return v.new_zeros(B, 0, H, Dv, dtype=dtype), R.mT.reshape(B, H, Dv, Dk).contiguous()
    C = min(chunk_size, T)
    q, k, v = (to_chunks(x.to(dtype), C) for x in (q, k, v))  # (BH, N, C, D), possibly strided views
    # (BH, N, C), contiguous so that the row scalings built from it write contiguous results.
    eta = to_chunks(eta.to(dtype), C).contiguous()
    g, g_prev = chunk_log_decay(alpha, C, dtype)  # (BH, N, C) each, or None
    BH, N = k.shape[:2]

    k_write = _rows(k, g_prev, eta)  # eta_t gamma_{t-1} k_t
    q_inter = _rows(q, g if read == "after" else g_prev)  # gamma_t q_t or gamma_{t-1} q_t
    if factored_decay_ok(g, dtype):
        # gamma_rows_t / gamma_i = exp(g_rows_t) exp(-g_i): the decays ride on the matmul operands.
        # Columns k_i / gamma_i, stored transposed: (BH, N, Dk, C).
        k_read_T = _rows(k, None if g is None else -g).mT.contiguous()
        L = k_write @ k_read_T
        P = (q_inter @ k_read_T).tril(0 if read == "after" else -1)
    else:
        L, P = _intra_chunk_masked(q.contiguous(), k.contiguous(), eta, g, g_prev, read)
        k_read_T = None

    # WY representation: (I + L) W1 = eta V and (I + L) W2 = eta gamma_prev K for every chunk at once; only the
    # strictly lower triangle of L is read. Two solves cost the same as one on [W1 W2] and skip a concatenation.
    W1 = torch.linalg.solve_triangular(L, _rows(v, None, eta), upper=False, unitriangular=True)
    W2 = torch.linalg.solve_triangular(L, k_write, upper=False, unitriangular=True)

    # K_tail^T, columns (gamma_C / gamma_i) k_i: (BH, N, Dk, C).
    if g is None:
        k_tail_T = k_read_T if k_read_T is not None else k.mT.contiguous()
        gamma = [None] * N
    else:
        k_tail_T = _rows(k, g[..., -1:] - g).mT
        gamma = torch.exp(g[..., -1:]).unsqueeze(-1).unbind(1)  # gamma_C per chunk: (BH, 1, 1)

    starts, updates = [], []
    # unbind, not W1[:, n]: indexing would make backward allocate a full-size gradient per chunk.
    for W1_n, W2_n, k_n, gamma_n in zip(W1.unbind(1), W2.unbind(1), k_tail_T.unbind(1), gamma):
        starts.append(R)
        U_n = torch.baddbmm(W1_n, W2_n, R, alpha=-1.0)  # W1 - W2 S_0^T: (BH, C, Dv)
        updates.append(U_n)
        # S^T <- gamma_C S_0^T + K_tail^T U
        R = torch.baddbmm(R if gamma_n is None else gamma_n * R, k_n, U_n)
    R0 = torch.stack(starts, dim=1).flatten(0, 1)  # (BH*N, Dk, Dv): S^T entering each chunk
    U = torch.stack(updates, dim=1).flatten(0, 1)  # (BH*N, C, Dv)

    P, q_inter = P.flatten(0, 1), q_inter.flatten(0, 1)
    o = torch.baddbmm(q_inter @ R0, P, U)  # (BH*N, C, Dv)
    S = R.mT.reshape(B, H, Dv, Dk).contiguous()
    return from_chunks(o.view(BH, N, C, Dv), B, H, T).contiguous(), S
