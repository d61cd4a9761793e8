"""``delta_rule_one_chunk`` (the delta rule, Eq 88 / 93, over one chunk) split into a forward that keeps its
intermediates and the chain rule written out for it, for callers that hand-write the backward of a larger step
around it (self-modifying Titans' fused chunk step).

Same arithmetic and notation as ``delta_rule_one_chunk`` (R = S^T, g = cumsum(log alpha), g' = g - log alpha,
gamma' = exp(g'), decay[t, i] = exp(g'_t - g_i) on i < t):

    L = (K K^T) * decay * eta_t,  T = (I + L)^{-1},  U = T (eta V) - (T (eta gamma' K)) R_0
    R_n = exp(g_n) R_0 + (exp(g_n - g) K)^T U,       O = gamma' (Q R_0) + ((Q K^T) * decay) U.

Leading dimensions broadcast as in ``delta_rule_one_chunk``; every gradient is summed back to its input's shape.
``one_chunk_backward`` equals autograd through ``delta_rule_one_chunk`` (tests, fp64, with broadcasting and a
partial read).
"""

from __future__ import annotations

import torch

from ._common import ALPHA_FLOOR
from .delta_rule_chunk import unit_lower_inverse_values
from .delta_rule_one_chunk import _upper


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    return t if t.shape == shape else t.sum_to_size(shape)


def one_chunk_forward(k, v, eta, alpha, R0, q=None, read_from=None):
    """``delta_rule_one_chunk(k, v, eta, alpha, R0, q, read_from)`` without autograd. Returns o (or None), R_n and
    what ``one_chunk_backward`` needs."""
    n = k.shape[-2]
    log_alpha = torch.log(alpha.clamp_min(ALPHA_FLOOR[alpha.dtype]))
    g = torch.cumsum(log_alpha, dim=-1)
    g_prev = g - log_alpha
    decay = torch.exp((g_prev.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(_upper(n, k.device), float("-inf")))
    KK = k @ k.mT
    L = KK * decay * eta.unsqueeze(-1)
    T_inv = unit_lower_inverse_values(L)
    gamma_prev = torch.exp(g_prev)
    write_scale = eta * gamma_prev
    k_write = write_scale.unsqueeze(-1) * k
    ev = eta.unsqueeze(-1) * v
    W2 = T_inv @ k_write
    U = T_inv @ ev - W2 @ R0
    g_last = g[..., -1:]
    tail = torch.exp(g_last - g)  # (..., n)
    k_tail = tail.unsqueeze(-1) * k
    end = torch.exp(g_last).unsqueeze(-1)  # (..., 1, 1)
    R = end * R0 + k_tail.mT @ U
    saved = dict(k=k, v=v, eta=eta, alpha=alpha, R0=R0, q=q, read_from=read_from, decay=decay, KK=KK, T_inv=T_inv,
                 gamma_prev=gamma_prev, write_scale=write_scale, k_write=k_write, ev=ev, W2=W2, U=U, tail=tail,
                 k_tail=k_tail, end=end)
    if q is None:
        return None, R, saved
    lead = U.dim() - 2
    picked = {}
    for name, t, d in (("R0", R0, 2), ("U", U, 2), ("k", k, 2), ("gamma_prev", gamma_prev, 1), ("decay", decay, 2)):
        picked[name] = read_from is not None and t.dim() == lead + d
        saved[name + "_r"] = t[read_from] if picked[name] else t
    qR0 = q @ saved["R0_r"]
    QK = q @ saved["k_r"].mT
    P = QK * saved["decay_r"]
    o = saved["gamma_prev_r"].unsqueeze(-1) * qR0 + P @ saved["U_r"]
    saved.update(picked=picked, qR0=qR0, QK=QK, P=P)
    return o, R, saved


def _add_picked(full: torch.Tensor, part: torch.Tensor, picked: bool, index) -> torch.Tensor:
    """full + part (full already in its input's shape), where the read used only ``[index]`` of full's first
    dimension when ``picked``."""
    if not picked:
        return full + _sum_to(part, full.shape)
    full = full.clone()
    full[index] += _sum_to(part, full[index].shape)
    return full


def one_chunk_backward(s: dict, gR: torch.Tensor | None, go: torch.Tensor | None, want_R0: bool = True):
    """Gradients (k, v, eta, alpha, R0, q) of ``<gR, R_n> + <go, o>`` from ``one_chunk_forward``'s saved values;
    q's is None without a read. Every term is summed to its tensor's shape before it is added (a broadcast term
    must not be counted once per copy). ``gR=None``: R_n's gradient is zero (its terms are skipped);
    ``want_R0=False``: R0's gradient is not computed (None)."""
    k, v, eta, alpha, R0, U = s["k"], s["v"], s["eta"], s["alpha"], s["R0"], s["U"]
    decay, T_inv, gamma_prev, tail, end = s["decay"], s["T_inv"], s["gamma_prev"], s["tail"], s["end"]

    # R_n = end R0 + k_tail^T U
    if gR is None:
        g_R0 = torch.zeros_like(R0) if want_R0 else None
        g_end = g_k_tail = None
        g_U = torch.zeros_like(U)
    else:
        g_R0 = _sum_to(end * gR, R0.shape) if want_R0 else None
        g_end = _sum_to((gR * R0).sum((-2, -1), keepdim=True), end.shape)
        g_k_tail = _sum_to(U @ gR.mT, k.shape)
        g_U = _sum_to(s["k_tail"] @ gR, U.shape)
    g_decay = torch.zeros_like(decay)
    g_gamma_prev = torch.zeros_like(gamma_prev)
    g_k = torch.zeros_like(k)
    g_q = None
    if go is not None:  # o = gamma'_r (q R0_r) + (QK * decay_r) U_r
        q, picked, idx = s["q"], s["picked"], s["read_from"]
        g_qR0 = s["gamma_prev_r"].unsqueeze(-1) * go
        g_q = g_qR0 @ s["R0_r"].mT
        if want_R0:
            g_R0 = _add_picked(g_R0, q.mT @ g_qR0, picked["R0"], idx)
        g_gamma_prev = _add_picked(g_gamma_prev, (go * s["qR0"]).sum(-1), picked["gamma_prev"], idx)
        g_P = go @ s["U_r"].mT
        g_U = _add_picked(g_U, s["P"].mT @ go, picked["U"], idx)
        g_QK = g_P * s["decay_r"]
        g_decay = _add_picked(g_decay, g_P * s["QK"], picked["decay"], idx)
        g_q = _sum_to(g_q + g_QK @ s["k_r"], q.shape)
        g_k = _add_picked(g_k, g_QK.mT @ q, picked["k"], idx)

    # U = T_inv (eta v) - W2 R0,  W2 = T_inv k_write
    W2, ev, k_write = s["W2"], s["ev"], s["k_write"]
    if want_R0:
        g_R0 = g_R0 - _sum_to(W2.mT @ g_U, R0.shape)
    g_W2 = _sum_to(-(g_U @ R0.mT), W2.shape)
    g_T = _sum_to(g_U @ ev.mT, T_inv.shape) + _sum_to(g_W2 @ k_write.mT, T_inv.shape)
    g_ev = _sum_to(T_inv.mT @ g_U, ev.shape)
    g_k_write = _sum_to(T_inv.mT @ g_W2, k_write.shape)
    g_L = (T_inv.mT @ g_T @ T_inv.mT).tril_(-1).neg_()  # T = (I + L)^{-1}

    # L = KK * decay * eta_t
    KK = s["KK"]
    g_L_eta = g_L * eta.unsqueeze(-1)
    g_KK = _sum_to(g_L_eta * decay, KK.shape)
    g_decay = g_decay + _sum_to(g_L_eta * KK, decay.shape)
    g_eta = _sum_to((g_L * KK * decay).sum(-1), eta.shape)
    g_k = g_k + _sum_to((g_KK + g_KK.mT) @ k, k.shape)
    # k_write = (eta gamma') k, ev = eta v, k_tail = tail k
    t = (g_k_write * k).sum(-1)
    g_k = g_k + _sum_to(s["write_scale"].unsqueeze(-1) * g_k_write, k.shape)
    if g_k_tail is not None:
        g_k = g_k + _sum_to(tail.unsqueeze(-1) * g_k_tail, k.shape)
    g_eta = g_eta + _sum_to(t * gamma_prev, eta.shape) + _sum_to((g_ev * v).sum(-1), eta.shape)
    g_gamma_prev = g_gamma_prev + _sum_to(t * eta, gamma_prev.shape)
    g_v = _sum_to(eta.unsqueeze(-1) * g_ev, v.shape)
    g_tail = None if g_k_tail is None else _sum_to((g_k_tail * k).sum(-1), tail.shape)

    # log decays: tail = exp(g_n - g), end = exp(g_n), gamma' = exp(g'), decay = exp(g'_t - g_i), g' = g - log alpha
    # (tail, end, gamma' and decay all have the shape of g)
    gd = g_decay * decay
    g_gp = g_gamma_prev * gamma_prev + gd.sum(-1)
    if gR is None:
        g_g = g_gp - gd.sum(-2)
    else:  # and R_n's decays
        g_x = g_tail * tail  # d/d(g_n - g)
        g_gn = g_x.sum(-1, keepdim=True) + (g_end * end).squeeze(-1)
        g_g = g_gp - g_x - gd.sum(-2)
        g_g = torch.cat([g_g[..., :-1], g_g[..., -1:] + g_gn], dim=-1)
    g_log_alpha = g_g.flip(-1).cumsum(-1).flip(-1) - g_gp  # g = cumsum(log alpha)
    floor = ALPHA_FLOOR[alpha.dtype]
    g_alpha = _sum_to(g_log_alpha / alpha.clamp_min(floor) * (alpha >= floor).to(alpha.dtype), alpha.shape)
    return g_k, g_v, g_eta, g_alpha, g_R0, g_q
