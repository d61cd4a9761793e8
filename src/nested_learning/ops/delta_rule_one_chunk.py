"""The delta rule (Eq 88 / 93, L2 branch) over ONE chunk, on the transposed state, in a few batched products.

Self-modifying Titans (Eq 90) cannot batch its chunks: each chunk's keys, values and rates come from the memories
after the previous chunk. So it runs the rule one chunk at a time, and the general chunked op (``delta_rule_chunk``:
input checks with a host sync, the chunk layout, the recurrence over chunks) costs far more than the arithmetic of
a 16-token chunk. This form does only that arithmetic, with broadcasting leading dimensions so that several
memories that share keys or rates run in one call. It equals ``delta_rule(..., read="before")`` and its token loop
(tests); inputs are not validated here (the callers produce them: unit keys, sigmoid gates).

With R = S^T (Dk, Dv), gamma_t = prod_{i <= t} alpha_i, g = log gamma and g'_t = g_{t-1} (see ``delta_rule_chunk``):
    (I + L) U = diag(eta) V - diag(eta gamma') K R_0,   L[t, i] = eta_t (gamma'_t / gamma_i) k_t.k_i   (i < t)
    R_n = gamma_n R_0 + K_tail^T U,                      K_tail[i] = (gamma_n / gamma_i) k_i
    o_t = S_{t-1} q_t:  O = diag(gamma') Q R_0 + (Q K^T * D) U,   D[t, i] = gamma'_t / gamma_i on i < t.
Every decay factor here is at most 1 (the masked exponent is replaced by -inf before exp), so no alpha in (0, 1]
can overflow it, and no range test is needed.
"""

from __future__ import annotations

import functools

import torch

from ._common import ALPHA_FLOOR
from .cpu import cpp_wrapper_default
from .delta_rule_chunk import unit_lower_inverse, unit_lower_inverse_by_squaring, unit_lower_inverse_reference

# Under torch.compile, chunks up to this size invert their (I + L) by products (``unit_lower_inverse_by_squaring``)
# where compiled graphs take inductor's C++ wrapper (``cpu.cpp_wrapper_default``): HOPE's 16-token chunks then need no
# LAPACK call, which that wrapper reaches through a fallback that logs a warning when the graph compiles. Otherwise,
# and for larger chunks, the solve: with the Python wrapper the products ran 0.98x (HOPE tiny's compiled training
# step on an Intel Xeon, alternating in one process), with the C++ one 1.00x.
SQUARING_MAX = 16 if cpp_wrapper_default() else 0


def _upper(n: int, device: torch.device) -> torch.Tensor:
    """The (n, n) mask of the diagonal and above; built in the graph under torch.compile, else cached."""
    if torch.compiler.is_compiling():
        return _upper_mask(n, device)
    return _cached_upper(n, device)


def _upper_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(0)


_cached_upper = functools.lru_cache(maxsize=32)(_upper_mask)


def delta_rule_one_chunk(
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    R0: torch.Tensor,
    q: torch.Tensor | None = None,
    read_from=None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """S_t = S_{t-1} (alpha_t I - eta_t k_t k_t^T) + eta_t v_t k_t^T over n tokens, on R = S^T.

    Args:
        k: (..., n, Dk) keys; v: (..., n, Dv) values; eta, alpha: (..., n); R0: (..., Dk, Dv) the state entering
            the chunk, transposed. Leading dimensions broadcast against each other (e.g. five memories' values
            ``(5, M, n, Dv)`` with one key ``(M, n, Dk)``).
        q: (..., n, Dk) queries, or None for no read.
        read_from: an index into the FIRST leading dimension (e.g. which of five stacked memories is queried): the
            read uses those memories only, and inputs without that dimension broadcast; None reads them all.

    Returns:
        o: (..., n, Dv) with o_t = S_{t-1} q_t (read before the write, Eq 83), or None; R_n: the state after the
        chunk, transposed, with the broadcast leading shape.
    """
    n = k.shape[-2]
    log_alpha = torch.log(alpha.clamp_min(ALPHA_FLOOR[alpha.dtype]))
    g = torch.cumsum(log_alpha, dim=-1)
    g_prev = g - log_alpha
    compiling = torch.compiler.is_compiling()  # traced: a plain mask and solve (no cache, no thread switch)
    upper = torch.ones(n, n, dtype=torch.bool, device=k.device).triu(0) if compiling else _upper(n, k.device)
    decay = torch.exp(
        (g_prev.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(upper, float("-inf"))
    )  # gamma'_t / gamma_i on i < t, 0 elsewhere
    L = (k @ k.mT) * decay * eta.unsqueeze(-1)
    if compiling:  # small chunks by products (no LAPACK call in the graph), larger ones by the solve
        T_inv = unit_lower_inverse_by_squaring(L) if n <= SQUARING_MAX else unit_lower_inverse_reference(L)
    else:
        T_inv = unit_lower_inverse(L)
    gamma_prev = torch.exp(g_prev)
    k_write = (eta * gamma_prev).unsqueeze(-1) * k
    U = T_inv @ (eta.unsqueeze(-1) * v) - (T_inv @ k_write) @ R0
    g_last = g[..., -1:]
    R = torch.exp(g_last).unsqueeze(-1) * R0 + (torch.exp(g_last - g).unsqueeze(-1) * k).mT @ U
    if q is None:
        return None, R
    if read_from is not None:
        lead = U.dim() - 2  # tensors with every leading dimension carry the first one; others broadcast over it
        R0, U, k = (t[read_from] if t.dim() == lead + 2 else t for t in (R0, U, k))
        gamma_prev, decay = (t[read_from] if t.dim() == lead + d else t for t, d in ((gamma_prev, 1), (decay, 2)))
    o = gamma_prev.unsqueeze(-1) * (q @ R0) + ((q @ k.mT) * decay) @ U
    return o, R
