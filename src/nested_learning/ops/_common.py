"""Input checks, dtype policy and chunk layout shared by the matrix-memory ops (delta rule, linear attention).

Layout: tokens arrive as (B, T, H, D); the chunked forms work on (B*H, N, C, D) with N = ceil(T / C) chunks,
the last one padded with tokens that leave the state unchanged (k = v = q = 0, eta = 0, log alpha = 0).
"""

from __future__ import annotations

import math

import torch

from ._validation import check_finite

MODES = ("chunk", "recurrent")
READS = ("after", "before")

# Largest in-chunk log decay |log gamma_t| for which decay ratios gamma_t / gamma_i are factored as
# exp(g_t) * exp(-g_i) into row and column scales: exp(40) ~ 2e17 keeps every factor a normal fp32 number with
# ample headroom; fp64 allows far more. Beyond it the masked differences exp(g_t - g_i) are used.
FACTORED_LOG_RANGE = {torch.float32: 40.0, torch.float64: 300.0}


# Smallest retention the chunked forms use (see chunk_log_decay).
ALPHA_FLOOR = {torch.float32: math.exp(-30.0), torch.float64: math.exp(-300.0)}


def check_options(mode: str, read: str, chunk_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__} {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")


def check_inputs(q, k, v, gates: dict, initial_state) -> tuple[int, int, int, int, int]:
    """Check q, k: (B, T, H, Dk), v: (B, T, H, Dv), each gate (B, T, H) or None, state (B, H, Dv, Dk) or None.

    Returns (B, T, H, Dk, Dv).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4)
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must be (B, T, H, Dv) with (B, T, H) = {tuple(k.shape[:3])}, got {tuple(v.shape)}"
        )
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    for name, g in gates.items():
        if g is None:
            continue
        _check_tensor(name, g, 3)
        if g.shape != (B, T, H):
            raise ValueError(f"{name} must have shape (B, T, H) = {(B, T, H)}, got {tuple(g.shape)}")
    # One host sync for all checks (a GPU would otherwise stop once per tensor); the details only on failure.
    # A sum is finite iff every entry is, unless finite entries overflow it, which only sends the inputs to the
    # exact checks below; one reduction per tensor is ~15x cheaper than isfinite(x).all() (a bool pass, then a
    # reduction), and a min is NaN or negative whenever a gate is.
    tensors = [(n, x.detach()) for n, x in (("q", q), ("k", k), ("v", v), *gates.items(),
                                            ("initial_state", initial_state)) if x is not None and x.numel()]
    flags = [torch.isfinite(x.sum()) for _, x in tensors]
    flags += [g.detach().min() >= 0 for g in gates.values() if g is not None and g.numel()]
    if flags and not bool(torch.stack(flags).all()):
        for name, x in tensors:
            check_finite(name, x)
        for name, g in gates.items():
            if g is not None and float(g.detach().min()) < 0:
                raise ValueError(f"{name} must be >= 0, got {float(g.detach().min())}")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4)
        if initial_state.shape != (B, H, Dv, Dk):
            raise ValueError(
                f"initial_state must have shape (B, H, Dv, Dk) = {(B, H, Dv, Dk)}, got {tuple(initial_state.shape)}"
            )
    devices = {x.device for x in (q, k, v, initial_state, *gates.values()) if x is not None}
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return B, T, H, Dk, Dv


def compute_dtype(*tensors) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: the state is never accumulated in bf16/fp16."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def to_chunks(x: torch.Tensor, C: int, chunk_major: bool = False) -> torch.Tensor:
    """(B, T, H, *D) -> (B*H, N, C, *D), or (N, B*H, C, *D) with ``chunk_major``, zero-padding T up to a multiple of C.

    Without padding this is a strided view where the layout allows (always for the default layout, for B = 1 in the
    chunk-major one): the first row scaling (``scale_rows``) writes the contiguous chunk layout, so q, k, v are not
    copied once for the layout and again for the scaling.
    """
    B, T, H = x.shape[:3]
    N = math.ceil(T / C)
    pad = N * C - T
    if pad:
        x = torch.cat([x, x.new_zeros(B, pad, *x.shape[2:])], dim=1)
    if chunk_major:
        x = x.reshape(B, N, C, H, *x.shape[3:]).movedim(3, 2).movedim(1, 0)  # (N, B, H, C, *D)
        return x.reshape(N, B * H, C, *x.shape[4:])
    x = x.movedim(2, 1)  # (B, H, T, *D)
    return x.reshape(B * H, N, C, *x.shape[3:])


def from_chunks(x: torch.Tensor, B: int, H: int, T: int) -> torch.Tensor:
    """(B*H, N, C, D) -> (B, T, H, D), dropping the padding."""
    D = x.shape[-1]
    return x.reshape(B, H, -1, D)[:, :, :T].movedim(1, 2)


def chunk_log_decay(alpha: torch.Tensor | None, C: int, dtype: torch.dtype, chunk_major: bool = False):
    """Within-chunk log cumulative decays, restarted at every chunk.

    alpha: (B, T, H) -> (g, g_prev), each (B*H, N, C) (or (N, B*H, C) with ``chunk_major``):
    g_t = sum_{i <= t} log alpha_i (inclusive) and g_prev_t = g_{t-1} (exclusive, 0 at a chunk's first token); (None, None) when alpha is None (no decay).
    Padded tokens get log alpha = 0, so they neither decay the state nor shift g.
    """
    if alpha is None:
        return None, None
    # alpha = 0 (a full reset; sigmoid underflows to it) would give log 0 = -inf and -inf - -inf = NaN in the decay
    # ratios. Clamped to ALPHA_FLOOR it keeps a fraction ~1e-13 (fp32) of the state, below the precision of the
    # result, and the log-decay differences stay exact to the dtype's rounding (|log ALPHA_FLOOR| is small).
    log_alpha = to_chunks(
        torch.log(alpha.to(dtype).clamp_min(ALPHA_FLOOR[dtype])), C, chunk_major
    ).contiguous()
    g = torch.cumsum(log_alpha, dim=-1)
    return g, g - log_alpha


def decay_matrix(
    g: torch.Tensor | None, g_rows: torch.Tensor | None, C: int, strict: bool, like: torch.Tensor
):
    """Causal decay matrix D[t, i] = exp(g_rows_t - g_i) on i <= t (i < t if strict), zero elsewhere.

    g, g_rows: (..., C) or None (no decay: D is the 0/1 causal mask). Entries off the mask are zeroed before exp
    (they could overflow, and an inf there would turn gradients into NaN) and after it.
    """
    mask = torch.ones(C, C, dtype=torch.bool, device=like.device).tril(-1 if strict else 0)
    if g is None:
        return mask.to(like.dtype)
    diff = (g_rows.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~mask, 0.0)
    return torch.exp(diff).masked_fill(~mask, 0.0)


def factored_decay_ok(g: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether every in-chunk log decay |g_t| fits FACTORED_LOG_RANGE (always true without decay).

    One scalar read of a (B*H, N, C) tensor: a host sync on GPU, negligible next to the chunk work.
    """
    return g is None or float(g.detach().abs().max()) <= FACTORED_LOG_RANGE[dtype]


def scale_rows(
    x: torch.Tensor, log_scale: torch.Tensor | None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Contiguous x (..., C, D) times scale * exp(log_scale) row-wise (scale, log_scale: (..., C), either None).

    The per-row factors are combined first so that x is read and written once. The factor goes first in the
    product: the result then takes the factor's (contiguous) layout even when x is a strided view.
    """
    if log_scale is not None:
        scale = torch.exp(log_scale) if scale is None else scale * torch.exp(log_scale)
    return x.contiguous() if scale is None else (scale.unsqueeze(-1) * x).contiguous()
