"""The chain rule of ``delta_rule_one_chunk`` written out (``one_chunk_backward``) against autograd through it."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.ops.delta_rule_one_chunk import delta_rule_one_chunk
from nested_learning.ops.delta_rule_one_chunk_grad import one_chunk_backward, one_chunk_forward

M, N = 3, 6


def _case(name, seed=0):
    """Shapes as self-modifying Titans uses them: one rule, five memories sharing a unit key and gates (the W2
    layers), three with their own keys and steps read at box 2 (the W1 layers), two gate memories without a read."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def u(*shape, scale=1.0):
        return torch.rand(*shape, generator=g, dtype=torch.float64) * scale

    alpha = 0.05 + 0.95 * u(M, N)
    cases = {
        "single": (F.normalize(r(M, N, 5), dim=-1), r(M, N, 4), u(M, N), alpha, r(M, 5, 4), r(M, N, 5), None),
        "no read": (F.normalize(r(M, N, 5), dim=-1), r(M, N, 4), u(M, N), alpha, r(M, 5, 4), None, None),
        "shared key": (F.normalize(r(M, N, 5), dim=-1), r(5, M, N, 7), u(M, N), alpha, r(5, M, 5, 7), r(M, N, 5), 2),
        "own keys": (r(3, M, N, 7), r(3, M, N, 5), u(3, M, N, scale=0.3), alpha, r(3, M, 7, 5), r(M, N, 7), 2),
        "gates": (r(2, M, N, 7), r(2, M, N, 1), u(2, M, N, scale=0.3), alpha, r(2, M, 7, 1), None, None),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["single", "no read", "shared key", "own keys", "gates"])
def test_backward_equals_autograd(name):
    k, v, eta, alpha, R0, q, read_from = _case(name)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (k, v, eta, alpha, R0, q)]
    o, R = delta_rule_one_chunk(*leaves[:5], leaves[5], read_from)
    gR = torch.randn_like(R)
    go = None if o is None else torch.randn_like(o)
    loss = (R * gR).sum() + (0 if o is None else (o * go).sum())
    live = [t for t in leaves if t is not None]
    expected = torch.autograd.grad(loss, live)
    o2, R2, saved = one_chunk_forward(k, v, eta, alpha, R0, q, read_from)
    torch.testing.assert_close(R2, R, rtol=0, atol=1e-13)
    if o is not None:
        torch.testing.assert_close(o2, o, rtol=0, atol=1e-13)
    got = [t for t in one_chunk_backward(saved, gR, go) if t is not None]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_retention_below_the_floor_passes_no_gradient_to_alpha():
    """alpha is clamped to a floor before its log (as in ``delta_rule_one_chunk``): below it, no gradient."""
    k, v, eta, alpha, R0, q, _ = _case("single")
    alpha = alpha.clone()
    alpha[:, 2] = 0.0
    _, R, saved = one_chunk_forward(k, v, eta, alpha, R0, q)
    g_alpha = one_chunk_backward(saved, torch.randn_like(R), None)[3]
    assert (g_alpha[:, 2] == 0).all() and (g_alpha[:, 3] != 0).all()


@pytest.mark.parametrize("name", ["single", "shared key", "own keys", "gates"])
def test_no_state_gradient_and_no_initial_state_gradient_skip_only_their_terms(name):
    """gR=None is a zero gradient of the new state; want_R0=False leaves out R0's gradient and nothing else."""
    k, v, eta, alpha, R0, q, read_from = _case(name)
    o, R, saved = one_chunk_forward(k, v, eta, alpha, R0, q, read_from)
    go = None if o is None else torch.randn_like(o)
    full = one_chunk_backward(saved, torch.zeros_like(R), go)
    for want_R0 in (True, False):
        got = one_chunk_backward(saved, None, go, want_R0=want_R0)
        assert (got[4] is None) == (not want_R0)
        for i, (a, b) in enumerate(zip(got, full)):
            if a is not None and b is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-14, msg=str(i))
    gR = torch.randn_like(R)
    with_gR = one_chunk_backward(saved, gR, go)
    without_R0 = one_chunk_backward(saved, gR, go, want_R0=False)
    assert without_R0[4] is None
    for i in (0, 1, 2, 3, 5):
        if with_gR[i] is not None:
            torch.testing.assert_close(without_R0[i], with_gR[i], rtol=0, atol=0, msg=str(i))
