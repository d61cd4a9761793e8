"""``delta_rule_one_chunk`` (the single-chunk form self-modifying Titans runs per Eq 90 chunk) against the delta
rule's token loop: values, final state and gradients, with broadcast leading dimensions and a partial read."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.ops import delta_rule
from nested_learning.ops.delta_rule_one_chunk import delta_rule_one_chunk


def _tokens_first(t):
    return t.unsqueeze(0).transpose(1, 2)  # (M, n, ...) -> (1, n, M, ...)


def _loop(q, k, v, eta, alpha, R0):
    """The op's token loop on (M, n, D) tensors: o_t = S_{t-1} q_t, S = R^T."""
    f = _tokens_first
    o, S = delta_rule(f(q), f(k), f(v), f(eta), f(alpha), initial_state=R0.mT.unsqueeze(0), mode="recurrent",
                      read="before")
    return o[0].transpose(0, 1), S[0].mT


def _inputs(M=3, n=7, Dk=5, Dv=4, alpha_low=0.0):
    torch.manual_seed(0)
    q = torch.randn(M, n, Dk, dtype=torch.float64)
    k = F.normalize(torch.randn(M, n, Dk, dtype=torch.float64), dim=-1)
    v = torch.randn(M, n, Dv, dtype=torch.float64)
    eta = torch.rand(M, n, dtype=torch.float64)
    alpha = alpha_low + (1 - alpha_low) * torch.rand(M, n, dtype=torch.float64)
    R0 = torch.randn(M, Dk, Dv, dtype=torch.float64)
    return q, k, v, eta, alpha, R0


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_one_chunk_equals_the_token_loop(n):
    q, k, v, eta, alpha, R0 = _inputs(n=n)
    o, R = delta_rule_one_chunk(k, v, eta, alpha, R0, q)
    o_ref, R_ref = _loop(q, k, v, eta, alpha, R0)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(R, R_ref, rtol=0, atol=1e-12)


def test_one_chunk_gradients_equal_the_token_loop():
    inputs = [t.requires_grad_() for t in _inputs()]
    q, k, v, eta, alpha, R0 = inputs
    o, R = delta_rule_one_chunk(k, v, eta, alpha, R0, q)
    o_ref, R_ref = _loop(q, k, v, eta, alpha, R0)
    w_o, w_R = torch.randn_like(o), torch.randn_like(R)
    g = torch.autograd.grad((o * w_o).sum() + (R * w_R).sum(), inputs)
    g_ref = torch.autograd.grad((o_ref * w_o).sum() + (R_ref * w_R).sum(), inputs)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_full_resets_and_tiny_retention_stay_finite_and_exact():
    """alpha = 0 (a reset) and alpha ~ 1e-30: every decay factor is <= 1, nothing overflows."""
    q, k, v, eta, alpha, R0 = _inputs(n=16)
    alpha[:, 3] = 0.0
    alpha[:, 9] = 1e-30
    o, R = delta_rule_one_chunk(k, v, eta, alpha, R0, q)
    o_ref, R_ref = _loop(q, k, v, eta, alpha, R0)
    assert torch.isfinite(o).all() and torch.isfinite(R).all()
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(R, R_ref, rtol=0, atol=1e-10)


def test_broadcast_memories_and_a_partial_read():
    """Five memories with their own values and states share one key, step and retention (leading dim 5); the read
    of memory 2 alone equals that memory's own run, and every state equals its own run."""
    q, k, v, eta, alpha, R0 = _inputs()
    V = torch.randn(5, *v.shape, dtype=torch.float64)
    S0 = torch.randn(5, *R0.shape, dtype=torch.float64)
    o, R = delta_rule_one_chunk(k, V, eta, alpha, S0, q, read_from=2)
    for i in range(5):
        o_i, R_i = _loop(q, k, V[i], eta, alpha, S0[i])
        torch.testing.assert_close(R[i], R_i, rtol=0, atol=1e-12)
        if i == 2:
            torch.testing.assert_close(o, o_i, rtol=0, atol=1e-12)
    # per-memory keys and steps (the W1 layers of the MLP memories) with one shared retention
    K = F.normalize(torch.randn(3, *k.shape, dtype=torch.float64), dim=-1)
    E = torch.rand(3, *eta.shape, dtype=torch.float64)
    Q = torch.randn(q.shape, dtype=torch.float64)
    o, R = delta_rule_one_chunk(K, V[:3], E, alpha, S0[:3], Q, read_from=2)
    o_2, R_2 = _loop(Q, K[2], V[2], E[2], alpha, S0[2])
    torch.testing.assert_close(o, o_2, rtol=0, atol=1e-12)
    torch.testing.assert_close(R[2], R_2, rtol=0, atol=1e-12)


def test_no_query_returns_only_the_state():
    q, k, v, eta, alpha, R0 = _inputs()
    o, R = delta_rule_one_chunk(k, v, eta, alpha, R0)
    assert o is None
    torch.testing.assert_close(R, _loop(q, k, v, eta, alpha, R0)[1], rtol=0, atol=1e-12)
