"""Linear attention / vanilla fast-weight programmer with decay (Eq 5, Eq 14-18).

The Hebbian rule is one gradient step with learning rate 1 on the dot-product objective -<M k, v> (Eq 17-18),
with a retention alpha_t (Eq 5, identity feature map; apply phi to q and k before calling):

    S_t = alpha_t S_{t-1} + v_t k_t^T,   o_t = S_t q_t (read="after")  or  o_t = S_{t-1} q_t (read="before").

Chunked form: with gamma_t = prod_{i <= t} alpha_i inside a chunk starting from S_0,
    o_t = gamma_t S_0 q_t + sum_{i <= t} (gamma_t / gamma_i)(q_t.k_i) v_i,   S_C = gamma_C S_0 + sum_i (gamma_C / gamma_i) v_i k_i^T
(for read="before": gamma_{t-1} and i < t). The decay ratios are handled as in ``delta_rule_chunk``.
"""

from __future__ import annotations

import torch

from ._common import (
    check_inputs,
    check_options,
    chunk_log_decay,
    compute_dtype,
    decay_matrix,
    factored_decay_ok,
    from_chunks,
    scale_rows,
    to_chunks,
)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    mode: str = "chunk",
    read: str = "after",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the decayed Hebbian fast-weight rule over a sequence (Eq 5, 14-18).

    Args:
        q, k: (B, T, H, Dk); v: (B, T, H, Dv); alpha: (B, T, H) retention in [0, 1] (0 resets the state) or None (no decay, Eq 15).
        initial_state: (B, H, Dv, Dk) or None (zeros).
        chunk_size, mode, read: as in ``delta_rule``.

    Returns:
        o: (B, T, H, Dv) in q's dtype; S_T: (B, H, Dv, Dk) in fp32 (fp64 for fp64 inputs).
    """
    check_options(mode, read, chunk_size)
    check_inputs(q, k, v, {"alpha": alpha}, initial_state)
    dtype = compute_dtype(q, k, v, alpha, initial_state)
    with torch.autocast(q.device.type, enabled=False):
        run = _recurrent if mode == "recurrent" else _chunk
        o, S = run(q, k, v, alpha, initial_state, chunk_size, read, dtype)
    return o.to(q.dtype), S


def _recurrent(q, k, v, alpha, initial_state, chunk_size, read, dtype):
    """Token loop of Eq 5 / Eq 15: S <- alpha S + v k^T."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    S = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(T):
        if read == "before":
            outputs.append(S @ q[:, t, :, :, None])
        write = v[:, t, :, :, None] @ k[:, t, :, None, :]
        S = (S if alpha is None else alpha[:, t, :, None, None].to(dtype) * S) + write
        if read == "after":
            outputs.append(S @ q[:, t, :, :, None])
    o = torch.stack(outputs, dim=1).squeeze(-1) if T else v.new_zeros(B, 0, H, Dv)
    return o, S


def _chunk(q, k, v, alpha, initial_state, chunk_size, read, dtype):
    """Chunked form: intra-chunk causal matmuls for all chunks at once, a loop over chunks for the state.

    As in ``delta_rule_chunk`` the state is carried transposed, R = S^T: (B*H, Dk, Dv), so that every product is
    X @ Y or X^T @ Y on stored operands.
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
    q, k = (to_chunks(x.to(dtype), C) for x in (q, k))  # (BH, N, C, D), possibly strided views
    v = to_chunks(v.to(dtype), C).contiguous()  # used by two matmuls: copy once
    g, g_prev = chunk_log_decay(alpha, C, dtype)
    BH, N = k.shape[:2]

    g_read = g if read == "after" else g_prev
    q_inter = scale_rows(q, g_read)
    if factored_decay_ok(g, dtype):
        k_read_T = scale_rows(k, None if g is None else -g).mT.contiguous()  # columns k_i / gamma_i
        P = (q_inter @ k_read_T).tril(0 if read == "after" else -1)
    else:
        P = (q @ k.mT) * decay_matrix(g, g_read, C, strict=read == "before", like=k)

    g_last = None if g is None else g[..., -1:]
    writes = scale_rows(k, None if g is None else g_last - g).mT @ v  # K_tail^T V: (BH, N, Dk, Dv)
    gammas = [None] * N if g is None else torch.exp(g_last).unsqueeze(-1).unbind(1)  # (BH, 1, 1) per chunk
    starts = []
    for write, gamma_n in zip(writes.unbind(1), gammas):  # unbind: one stacked gradient in backward
        starts.append(R)
        R = write + (R if gamma_n is None else gamma_n * R)
    R0 = torch.stack(starts, dim=1)  # (BH, N, Dk, Dv): S^T entering each chunk

    o = torch.baddbmm((q_inter @ R0).flatten(0, 1), P.flatten(0, 1), v.flatten(0, 1))
    S = R.mT.reshape(B, H, Dv, Dk).contiguous()
    return from_chunks(o.view(BH, N, C, Dv), B, H, T).contiguous(), S
