"""Chunk-parallel form of the delta rule (Eq 65/88/93) via the WY (UT) representation.

Inside a chunk of C tokens starting from state S_0, write the update as
    S_t = alpha_t S_{t-1} + u_t k_t^T,   u_t = eta_t (v_t - S_{t-1} k_t)
so that, with gamma_t = prod_{i <= t} alpha_i (inside the chunk),
    S_t = gamma_t S_0 + sum_{i <= t} (gamma_t / gamma_i) u_i k_i^T.
Substituting S_{t-1} into u_t gives a unit-lower-triangular system for the rows of U (C, Dv):
    (I + L) U = diag(eta) V - diag(eta gamma_prev) K S_0^T,   L[t, i] = eta_t (gamma_{t-1} / gamma_i) k_t.k_i  (i < t)
With the chunk's UT transform T = (I + L)^{-1} (one inverse per chunk, independent of S_0), U = W1 - W2 S_0^T with
W1 = T diag(eta) V and W2 = T diag(eta gamma_prev) K, and the chunk's end state is
    S_C = gamma_C S_0 + U^T K_tail,   K_tail[i] = (gamma_C / gamma_i) k_i,
i.e. in the transposed state R = S^T that every product here works on, an affine map per chunk
    R_C = A R_0 + Bc,   A = gamma_C I - K_tail^T W2  (Dk, Dk),   Bc = K_tail^T W1  (Dk, Dv).
Everything except that recurrence over chunks is batched over all chunks at once: the inverses, the C x C
products, A and Bc. The recurrence is one (Dk, Dk) @ (Dk, Dv) product per chunk (``chunk_scan``, with a
hand-written backward of one product per chunk as well). Outputs, again batched:
    read="after":  o_t = gamma_t S_0 q_t + sum_{i <= t} (gamma_t / gamma_i) (q_t.k_i) u_i
    read="before": o_t = gamma_{t-1} S_0 q_t + sum_{i < t} (gamma_{t-1} / gamma_i) (q_t.k_i) u_i
i.e. O = Q_inter R_0 + P U = (Q_inter - P W2) R_0 + P W1 with P the masked, decayed Q K^T.

Decay ratios gamma_t / gamma_i come from log-cumsums g = log gamma. When every chunk's log-decay range |g_C| is
small enough that exp(+-g) stays far from overflow, they are factored as exp(g_t) exp(-g_i) into the row and
column scales of the matmuls (no C x C exp); otherwise the masked differences exp(g_t - g_i) are formed directly,
which is exact for any alpha in (0, 1].

Layout: chunk-major, (N, B*H, C, D), so that the per-chunk recurrence reads and writes contiguous (B*H, D, D)
slices. Products read transposed operands as views (on this CPU build batched X @ Y^T runs as fast as X @ Y at
these sizes), so no operand is copied only to be transposed.
"""

from __future__ import annotations

import torch

from ._common import chunk_log_decay, decay_matrix, factored_decay_ok, from_chunks, to_chunks
from ._common import scale_rows as _rows
from .threads import one_thread_if_threads_sleep as _one_thread


def unit_lower_inverse_reference(L: torch.Tensor) -> torch.Tensor:
    """(I + tril(L, -1))^{-1} by one triangular solve per matrix, L: (..., C, C) (only the strict lower part is
    read). Autograd differentiates through the solve."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)


# Below this size a unit lower triangular block is inverted by row substitution (batched over every block).
_SUBSTITUTION_SIZE = 8


def _substitution_inverse(L: torch.Tensor) -> torch.Tensor:
    """(I + tril(L, -1))^{-1} for L: (M, n, n), n small: row r of X is e_r - L[r, :r] X[:r], one batched
    (1 x r) @ (r x r) product per row."""
    n = L.shape[-1]
    X = torch.zeros_like(L)
    X.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    for r in range(1, n):
        X[:, r : r + 1, :r] = -(L[:, r : r + 1, :r] @ X[:, :r, :r])
    return X


def unit_lower_inverse_blocked(L: torch.Tensor) -> torch.Tensor:
    """(I + tril(L, -1))^{-1} for L: (..., C, C) by recursive 2 x 2 blocking, no autograd.

    With I + L = [[T11, 0], [L21, T22]], the inverse is [[X11, 0], [-X22 L21 X11, X22]]; both diagonal halves
    recurse together as one batch of twice the size, down to blocks of ``_SUBSTITUTION_SIZE`` solved by row
    substitution. A batched LAPACK solve handles one small matrix per call (about 16 us for 64 x 64 here); these are
    a few batched products over all matrices at once: for 512 blocks of 64 (the chunked delta rule at T = 8192, four
    heads) 4.5 ms against the solve's 8 ms at one thread, and 3.7 ms at two threads, where the solve took 25 ms.
    Equals ``unit_lower_inverse_reference`` up to rounding (same substitution, reordered).
    """
    lead, n = L.shape[:-2], L.shape[-1]
    L = L.reshape(-1, n, n)
    if n <= _SUBSTITUTION_SIZE:
        return _substitution_inverse(L).reshape(*lead, n, n)
    h = n // 2
    if n % 2 == 0:
        X11, X22 = unit_lower_inverse_blocked(torch.cat([L[:, :h, :h], L[:, h:, h:]])).chunk(2)
    else:
        X11, X22 = unit_lower_inverse_blocked(L[:, :h, :h]), unit_lower_inverse_blocked(L[:, h:, h:])
    X = torch.zeros_like(L)
    X[:, :h, :h] = X11
    X[:, h:, h:] = X22
    # Into a fresh product, then copied: a matmul writing into the strided block runs one matrix at a time.
    X[:, h:, :h] = -((X22 @ L[:, h:, :h]) @ X11)
    return X.reshape(*lead, n, n)


def _uses_blocked_inverse(L: torch.Tensor) -> bool:
    """Many matrices of 32 rows or more: the blocked form wins; a few small ones: the per-matrix solve."""
    n = L.shape[-1]
    return n >= 32 and L.numel() >= 32 * n * n


def unit_lower_inverse_values(L: torch.Tensor) -> torch.Tensor:
    """The values of ``unit_lower_inverse`` without autograd: the blocked form for many blocks, else the solve."""
    if _uses_blocked_inverse(L):
        return unit_lower_inverse_blocked(L)
    with _one_thread(L.device):
        return unit_lower_inverse_reference(L)


class _UnitLowerInverse(torch.autograd.Function):
    """X = (I + tril(L, -1))^{-1}; backward dL = tril(-X^T dX X^T, -1) (differentiable: double backward works)."""

    @staticmethod
    def forward(ctx, L):
        X = unit_lower_inverse_values(L)
        ctx.save_for_backward(X)
        return X

    @staticmethod
    def backward(ctx, grad):
        (X,) = ctx.saved_tensors
        return ((X.mT @ grad) @ X.mT).tril_(-1).neg_()


def unit_lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """(I + tril(L, -1))^{-1} for L: (..., C, C) (only the strict lower part is read) with an analytic backward
    (two matmuls instead of a second triangular solve). Equals ``unit_lower_inverse_reference``."""
    return _UnitLowerInverse.apply(L)


def chunk_scan_reference(A: torch.Tensor, Bc: torch.Tensor, R0: torch.Tensor) -> torch.Tensor:
    """R_{n+1} = A_n R_n + Bc_n by autograd-tracked matmuls. A: (N, M, Dk, Dk), Bc: (N, M, Dk, Dv), R0: (M, Dk, Dv).

    Returns every state, (N + 1, M, Dk, Dv): R_0 (the input) to R_N.
    """
    states = [R0]
    for A_n, B_n in zip(A.unbind(0), Bc.unbind(0)):
        states.append(torch.baddbmm(B_n, A_n, states[-1]))
    return torch.stack(states)


class _ChunkScan(torch.autograd.Function):
    """``chunk_scan_reference`` with preallocated outputs and a hand-written backward:
    dR_n = G_n + A_n^T dR_{n+1} (from dR_N = G_N), dBc_n = dR_{n+1}, dA_n = dR_{n+1} R_n^T."""

    @staticmethod
    def forward(ctx, A, Bc, R0):
        N = A.shape[0]
        out = R0.new_empty(N + 1, *R0.shape)
        out[0] = R0
        with _one_thread(R0.device):
            for n in range(N):
                torch.baddbmm(Bc[n], A[n], out[n], out=out[n + 1])
        ctx.save_for_backward(A, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        A, out = ctx.saved_tensors
        N = A.shape[0]
        if torch.is_grad_enabled():  # create_graph: the same recursion on tracked ops, for double backward
            grads = [grad[N]]
            with _one_thread(out.device):
                for n in range(N - 1, -1, -1):
                    grads.append(torch.baddbmm(grad[n], A[n].mT, grads[-1]))
            dR = torch.stack(grads[::-1])
        else:
            dR = torch.empty_like(out)
            dR[N] = grad[N]
            with _one_thread(out.device):
                for n in range(N - 1, -1, -1):
                    torch.baddbmm(grad[n], A[n].mT, dR[n + 1], out=dR[n])
        dA = dR[1:] @ out[:-1].mT
        return dA, dR[1:], dR[0]


def chunk_scan(A: torch.Tensor, Bc: torch.Tensor, R0: torch.Tensor) -> torch.Tensor:
    """Affine recurrence over chunks R_{n+1} = A_n R_n + Bc_n; shapes as in ``chunk_scan_reference``, which it
    equals (values and gradients)."""
    return _ChunkScan.apply(A, Bc, R0)


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

    Returns o: (B, T, H, Dv) and S_T: (B, H, Dv, Dk), both in ``dtype``. Internally (N, B*H, C, D) chunks and the
    transposed state R = S^T: (B*H, Dk, Dv).
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
    q, k, v = (to_chunks(x.to(dtype), C, chunk_major=True) for x in (q, k, v))  # (N, BH, C, D)
    # (N, BH, C), contiguous so that the row scalings built from it write contiguous results.
    eta = to_chunks(eta.to(dtype), C, chunk_major=True).contiguous()
    g, g_prev = chunk_log_decay(alpha, C, dtype, chunk_major=True)  # (N, BH, C) each, or None
    N = k.shape[0]

    k_write = _rows(k, g_prev, eta)  # eta_t gamma_{t-1} k_t
    q_inter = _rows(q, g if read == "after" else g_prev)  # gamma_t q_t or gamma_{t-1} q_t
    if factored_decay_ok(g, dtype):
        # gamma_rows_t / gamma_i = exp(g_rows_t) exp(-g_i): the decays ride on the matmul operands.
        # Columns k_i / gamma_i: (N, BH, C, Dk), read transposed.
        k_read = _rows(k, None if g is None else -g)
        L = k_write @ k_read.mT
        P = (q_inter @ k_read.mT).tril_(0 if read == "after" else -1)
    else:
        L, P = _intra_chunk_masked(q.contiguous(), k.contiguous(), eta, g, g_prev, read)

    # UT transform once per chunk, all chunks at once; only the strictly lower triangle of L is read.
    T_inv = unit_lower_inverse(L)  # (N, BH, C, C)
    W1 = T_inv @ _rows(v, None, eta)  # (N, BH, C, Dv)
    W2 = T_inv @ k_write  # (N, BH, C, Dk)

    # K_tail^T, columns (gamma_C / gamma_i) k_i: (N, BH, Dk, C), and the chunk maps R -> A R + Bc.
    k_tail_T = k.mT if g is None else _rows(k, g[..., -1:] - g).mT
    A = (k_tail_T @ W2).neg_()
    A.diagonal(dim1=-2, dim2=-1).add_(1.0 if g is None else torch.exp(g[..., -1:]))  # + gamma_C I
    R_all = chunk_scan(A, k_tail_T @ W1, R)  # (N + 1, BH, Dk, Dv): S^T entering each chunk, then S_T^T

    # o = q_inter R_0 + P U with U = W1 - W2 R_0, regrouped as (q_inter - P W2) R_0 + P W1: U is never formed
    # and only the last product waits for the recurrence.
    W1, W2, P, q_inter = (x.flatten(0, 1) for x in (W1, W2, P, q_inter))
    q_state = torch.baddbmm(q_inter, P, W2, alpha=-1.0)  # (N*BH, C, Dk)
    o = torch.baddbmm(P @ W1, q_state, R_all[:N].flatten(0, 1))  # (N*BH, C, Dv)
    S = R_all[N].mT.reshape(B, H, Dv, Dk).contiguous()
    return from_chunks(o.view(N, B * H, C, Dv), B, H, T, chunk_major=True).contiguous(), S
