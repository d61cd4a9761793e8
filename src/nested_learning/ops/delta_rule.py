"""Delta rule / DGD on a matrix memory: the token-by-token reference and the public entry point.

Eq 56-57 applied to a matrix memory S with keys as inputs and values as targets (Eq 88 and the L2 branch of
Eq 93, with the gradient taken at S_{t-1}); with alpha = 1 it is DeltaNet (Eq 65):

    S_t = S_{t-1} (alpha_t I - eta_t k_t k_t^T) + eta_t v_t k_t^T
        = alpha_t S_{t-1} + eta_t (v_t - S_{t-1} k_t) k_t^T

Here eta is the step of the closed form (eta' of Eq 57): the exact minimiser of Eq 56 with raw step lr uses
eta = lr / (1 + lr ||k||^2), see ``dgd_step``.

Read-out: o_t = S_t q_t (read="after") or o_t = S_{t-1} q_t (read="before", Eq 83's y_t = M_{t-1}(q_t)).

Stable range: L2-normalised keys, eta_t in (0, 1], alpha_t in (0, 1]. Then the transition alpha_t I - eta_t k k^T
has eigenvalues alpha_t (multiplicity Dk - 1) and alpha_t - eta_t, both in (-1, 1], so the state stays bounded.
alpha = 0 (a full reset) works in both forms: the chunked form takes log max(alpha, ALPHA_FLOOR), see
``_common.chunk_log_decay``. Negative gates and non-finite inputs raise ``ValueError``.

CUDA: when fla-core (flash-linear-attention, with triton) is importable and the inputs are on a GPU, the chunked
form runs fla's chunked gated delta rule (``fla.ops.gated_delta_rule.chunk_gated_delta_rule``). Its recurrence, on
a state h: (Dk, Dv), is
    h_t = e^{g_t} h_{t-1} + k_t beta_t (v'_t - e^{g_t} h_{t-1}^T k_t)^T,   o_t = scale h_t^T q_t,
so with h = S^T it is S_t = e^{g_t} S_{t-1} + beta_t (v'_t - e^{g_t} S_{t-1} k_t) k_t^T, ours for
    g = log alpha,  beta = eta / alpha,  v' = alpha v,  scale = 1
(``to_fla_gated_delta_rule``; tested on CPU against fla's own torch reference). It is used for read="after", fp32 or
lower precision inputs and alpha >= FLA_MIN_ALPHA (beta = eta / alpha must stay moderate); everything else, and any
machine without fla, runs the chunked form of this package. ``backend="native"`` always does.

CPU threads: under passive OpenMP waiting with several threads (and at least 4 chunks), the chunked form runs its
independent memories -- the heads, or with one head the batch's sequences -- side by side on threads of their own
(``delta_rule_side_by_side``), forward and backward; the results equal the unsplit form's to rounding.
"""

from __future__ import annotations

import functools

import torch

from ._common import check_inputs, check_options, compute_dtype
from .delta_rule_chunk import delta_rule_chunk
from .delta_rule_side_by_side import delta_rule_side_by_side, side_by_side_split


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
    output_final_state: bool = True,
    mode: str = "chunk",
    read: str = "after",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the (gated) delta rule over a sequence (Eq 56-57, 65, 88, 93).

    Args:
        q, k: (B, T, H, Dk) queries and keys (keys should be L2-normalised).
        v: (B, T, H, Dv) values (the regression targets).
        eta: (B, T, H) step sizes, alpha: (B, T, H) retention (None means 1).
        initial_state: (B, H, Dv, Dk) or None (zeros).
        chunk_size: tokens per chunk in ``mode="chunk"``; any T is allowed.
        output_final_state: return S_T (else None).
        mode: ``"chunk"`` (chunk-parallel WY form) or ``"recurrent"`` (token loop, the reference).
        read: ``"after"``: o_t = S_t q_t; ``"before"``: o_t = S_{t-1} q_t.
        backend: ``"auto"`` (fla's kernel on CUDA where it applies, see the module docstring) or ``"native"``.

    Returns:
        o: (B, T, H, Dv) in q's dtype; S_T: (B, H, Dv, Dk) in fp32 (fp64 for fp64 inputs) or None.
    """
    check_options(mode, read, chunk_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_inputs(q, k, v, {"eta": eta, "alpha": alpha}, initial_state)
    dtype = compute_dtype(q, k, v, eta, alpha, initial_state)
    if backend == "auto" and mode == "chunk" and _fla_applies(q, read, dtype, alpha):
        o, S = _delta_rule_fla(fla_chunk_kernel(), q, k, v, eta, alpha, initial_state)
        return o.to(q.dtype), (S if output_final_state else None)
    # The state recursion must stay in fp32 even inside an autocast region.
    with torch.autocast(q.device.type, enabled=False):
        if mode == "recurrent":
            o, S = _delta_rule_recurrent(q, k, v, eta, alpha, initial_state, read, dtype)
        else:
            parts, axis = side_by_side_split(q, chunk_size)
            if parts > 1:  # passive OpenMP waiting: the independent memories on threads of their own
                run = functools.partial(_chunk_with, chunk_size=chunk_size, read=read, dtype=dtype)
                o, S = delta_rule_side_by_side(run, parts, axis, q, k, v, eta, alpha, initial_state)
            else:
                o, S = delta_rule_chunk(q, k, v, eta, alpha, initial_state, chunk_size, read, dtype)
    return o.to(q.dtype), (S if output_final_state else None)


def _chunk_with(q, k, v, eta, alpha, initial_state, *, chunk_size, read, dtype):
    return delta_rule_chunk(q, k, v, eta, alpha, initial_state, chunk_size, read, dtype)


def _delta_rule_recurrent(q, k, v, eta, alpha, initial_state, read, dtype):
    """Token loop of Eq 88/93 (L2 branch): S <- alpha S + eta (v - S k) k^T, the rank-one form of
    S (alpha I - eta k k^T) + eta v k^T. Shapes as in ``delta_rule``."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    q, k, v, eta = (x.to(dtype) for x in (q, k, v, eta))
    alpha = None if alpha is None else alpha.to(dtype)
    S = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for t in range(T):
        if read == "before":
            outputs.append(S @ q[:, t, :, :, None])
        k_t = k[:, t, :, :, None]  # (B, H, Dk, 1)
        error = v[:, t, :, :, None] - S @ k_t  # v_t - S_{t-1} k_t: (B, H, Dv, 1)
        decayed = S if alpha is None else alpha[:, t, :, None, None] * S
        S = decayed + eta[:, t, :, None, None] * error @ k_t.mT
        if read == "after":
            outputs.append(S @ q[:, t, :, :, None])
    o = torch.stack(outputs, dim=1).squeeze(-1) if T else v.new_zeros(B, 0, H, Dv)
    return o, S


BACKENDS = ("auto", "native")
# Smallest retention handed to fla: its kernel takes beta = eta / alpha, which must stay moderate.
FLA_MIN_ALPHA = 1e-3


@functools.lru_cache(maxsize=1)
def fla_chunk_kernel():
    """fla's ``chunk_gated_delta_rule``, or None when fla-core (or triton) is not importable. Imported lazily, once."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # not installed, no triton, or a broken install: the native chunked form is used
        return None
    return chunk_gated_delta_rule


def _fla_applies(q, read, dtype, alpha) -> bool:
    if not q.is_cuda or read != "after" or dtype == torch.float64 or fla_chunk_kernel() is None:
        return False
    return alpha is None or alpha.numel() == 0 or float(alpha.detach().min()) >= FLA_MIN_ALPHA


def to_fla_gated_delta_rule(q, k, v, eta, alpha, initial_state) -> dict:
    """Arguments of fla's gated delta rule that compute this module's rule (see the module docstring):
    g = log alpha, beta = eta / alpha, v' = alpha v, scale = 1, initial state h_0 = S_0^T: (B, H, Dk, Dv)."""
    if alpha is None:
        g, beta = torch.zeros_like(eta), eta
    else:
        g, beta, v = torch.log(alpha), eta / alpha, alpha.unsqueeze(-1).to(v.dtype) * v
    h0 = None if initial_state is None else initial_state.float().mT.contiguous()
    return dict(q=q, k=k, v=v, g=g, beta=beta, scale=1.0, initial_state=h0, output_final_state=True)


def _delta_rule_fla(kernel, q, k, v, eta, alpha, initial_state):
    """o: (B, T, H, Dv) and S_T = h_T^T: (B, H, Dv, Dk) in fp32 from an fla-style gated delta rule ``kernel``."""
    o, h = kernel(**to_fla_gated_delta_rule(q, k, v, eta, alpha, initial_state))
    return o, h.float().mT.contiguous()
