"""A group of chunks of the chunked delta rule (Eq 65/88/93; ``delta_rule_chunk._chunk_group``, factored decays) as
one autograd node with its chain rule written out.

Autograd through ``_chunk_group`` records about thirty nodes per group, each with its own pass over the group's
tensors; here the backward is one function over the group (its tensors stay in cache, see ``chunks_per_group``) and
identities of the WY form spare products. With U_j = W1 - W2 R_j (the chunk's corrections, never formed in the
forward) and dR_{j+1} the gradient of the state leaving chunk j:
    o = q_inter R_j + P U_j                   ->  dP = dO U_j^T,  dR_j += (q_inter - P W2)^T dO
    R_{j+1} = A R_j + Bc,  A = gamma_C I - K_tail^T W2,  Bc = K_tail^T W1
                                              ->  dK_tail = U_j dR_{j+1}^T,  dgamma_C = <dR_{j+1}, R_j>
    dW1 = P^T dO + K_tail dR_{j+1},           dW2 = -dW1 R_j^T
(the last because W2 enters the outputs and the next state only through U_j and A R_j, i.e. as -W2 R_j), and for
the UT transform T = (I + L)^{-1}, with W1 = T (eta v), W2 = T K_write:
    dL = -T^T dT T^T = -(T^T dW1) W1^T - (T^T dW2) W2^T   (strictly lower)
i.e. the gradients of eta v and K_write times W1^T and W2^T: two products where dT and T^T dT T^T took four.
The rest is the usual chain rule: L = K_write K_read^T, P = Q_inter K_read^T (masked), and the row scalings
K_write = (eta gamma') k, K_read = k / gamma, K_tail = (gamma_C / gamma) k, Q_inter = gamma q (read="after") or
gamma' q ("before"), eta v, with gamma = exp(g), gamma' = exp(g').

Reference: ``_chunk_group`` differentiated by autograd, which this equals (tests: fp64, every input's gradient,
both reads, with and without decay, groups of one and several chunks). Under ``create_graph`` the backward is
autograd through the reference, so higher derivatives stay exact.
"""

from __future__ import annotations

import torch

from ._common import scale_rows as _rows
from .delta_rule_chunk import _chunk_group, chunk_group_parts, chunk_scan_state_grads
from .reference_vjp import reference_vjp

# chunk_group_parts' intermediates the backward reads (T_inv as X)
_SAVED = ("k_write", "q_inter", "k_read", "ev", "k_tail", "P", "T_inv", "W1", "W2", "A", "R_all", "q_state")


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row <a_t, b_t>: (..., C, D) x (..., C, D) -> (..., C)."""
    return (a * b).sum(-1)


def _scales(eta, g, g_prev, read):
    """The row scales of the group (None where the scale is 1, i.e. without decay): (a, c, t, r, gamma_prev,
    gamma_C) = (eta gamma', 1 / gamma, gamma_C / gamma, the read's gamma or gamma', gamma', gamma_C)."""
    if g is None:
        return eta, None, None, None, None, None
    gamma_prev = torch.exp(g_prev)
    c = torch.exp(-g)
    g_last = g[..., -1:]
    r = torch.exp(g) if read == "after" else gamma_prev
    return eta * gamma_prev, c, torch.exp(g_last - g), r, gamma_prev, torch.exp(g_last)


class _ChunkGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eta, g, g_prev, R, read):
        p = chunk_group_parts(q, k, v, eta, g, g_prev, R, read, factored=True)
        ctx.read = read
        ctx.save_for_backward(q, k, v, eta, g, g_prev, R, *(p[name] for name in _SAVED))
        return p["o"], p["R_all"][q.shape[0]].clone()

    @staticmethod
    def backward(ctx, go, gR):
        q, k, v, eta, g, g_prev, R, k_write, q_inter, k_read, ev, k_tail, P, X, W1, W2, A, R_all, q_state = (
            ctx.saved_tensors
        )
        if torch.is_grad_enabled():  # create_graph: autograd through the reference keeps higher derivatives exact
            def reference(*x):
                return _chunk_group(*x, ctx.read, True)

            return (*reference_vjp(reference, (q, k, v, eta, g, g_prev, R), (go, gR)), None)
        a, c, t, r, gamma_prev, gamma_C = _scales(eta, g, g_prev, ctx.read)
        n = q.shape[0]
        Rj = R_all[:n]  # the state entering each chunk: (n, BH, Dk, Dv)
        # o's gradient arrives as a view of the whole sequence's (token-major): one copy instead of one per product
        go = go.contiguous()

        # reads o = q_inter R_j + P U_j, and the recurrence over the group's chunks
        dq_inter = go @ Rj.mT
        state_grads = torch.empty_like(R_all)  # gradient of each R_j directly, then R_n's
        torch.matmul(q_state.mT, go, out=state_grads[:n])
        state_grads[n] = gR
        dR = chunk_scan_state_grads(A, state_grads)
        dR_next = dR[1:]
        U = torch.baddbmm(W1.flatten(0, 1), W2.flatten(0, 1), Rj.flatten(0, 1), alpha=-1.0).view_as(W1)
        dP = (go @ U.mT).tril_(0 if ctx.read == "after" else -1)
        dk_tail = U @ dR_next.mT
        dW1 = torch.baddbmm((k_tail @ dR_next).flatten(0, 1), P.flatten(0, 1).mT, go.flatten(0, 1)).view_as(W1)
        dW2 = (dW1 @ Rj.mT).neg_()

        # W1 = T (eta v), W2 = T K_write, T = (I + L)^{-1}: with dT = dW1 (eta v)^T + dW2 K_write^T,
        # dL = -T^T dT T^T = -(T^T dW1) W1^T - (T^T dW2) W2^T, the gradients of eta v and K_write times W^T
        d_ev = X.mT @ dW1
        dk_write = X.mT @ dW2
        dL = torch.baddbmm((d_ev @ W1.mT).flatten(0, 1), dk_write.flatten(0, 1), W2.flatten(0, 1).mT)
        dL = dL.view_as(X).tril_(-1).neg_()

        # L = K_write K_read^T (strictly lower part), P = masked Q_inter K_read^T
        dk_write = torch.baddbmm(dk_write.flatten(0, 1), dL.flatten(0, 1), k_read.flatten(0, 1)).view_as(k)
        dk_read = torch.baddbmm((dL.mT @ k_write).flatten(0, 1), dP.flatten(0, 1).mT, q_inter.flatten(0, 1))
        dk_read = dk_read.view_as(k)
        dq_inter = torch.baddbmm(dq_inter.flatten(0, 1), dP.flatten(0, 1), k_read.flatten(0, 1)).view_as(q)

        # row scalings
        dv = _rows(d_ev, None, eta)
        da = _row_dot(dk_write, k)
        d_eta = _row_dot(d_ev, v)
        if g is None:
            dq = dq_inter
            dk = (a.unsqueeze(-1) * dk_write).add_(dk_read).add_(dk_tail)
            return dq, dk, dv, d_eta.add_(da), None, None, dR[0], None
        dq = _rows(dq_inter, None, r)
        dk = (a.unsqueeze(-1) * dk_write).addcmul_(c.unsqueeze(-1), dk_read).addcmul_(t.unsqueeze(-1), dk_tail)
        d_eta = d_eta.addcmul_(da, gamma_prev)
        dr = _row_dot(dq_inter, q) * r
        dt = _row_dot(dk_tail, k) * t
        # a = eta gamma', c = exp(-g), t = exp(g_C - g), gamma_C = exp(g_C), r = exp(g) or exp(g')
        dg_prev = da * a
        dg = (_row_dot(dk_read, k) * c).add_(dt).neg_()
        if ctx.read == "after":
            dg += dr
        else:
            dg_prev += dr
        d_gamma_C = (dR_next * Rj).sum((-2, -1)).unsqueeze(-1) * gamma_C  # trace(dA_j) gamma_C
        dg[..., -1:] += dt.sum(-1, keepdim=True) + d_gamma_C
        return dq, dk, dv, d_eta, dg, dg_prev, dR[0], None


def chunk_group_hand_grad(q, k, v, eta, g, g_prev, R, read):
    """``_chunk_group(q, k, v, eta, g, g_prev, R, read, factored=True)`` (same outputs) as one autograd node with the
    backward of this module."""
    return _ChunkGroup.apply(q, k, v, eta, g, g_prev, R, read)
