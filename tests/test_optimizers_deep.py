"""Deep optimizers: delta-rule momentum (Eq 48-49), feature maps (Eq 51), preconditioned (Eq 37), deep momentum (Eq 50)."""

import pytest
import torch
from torch import nn

from nested_learning.optimizers import DeepMomentumGD, DeltaRuleMomentum, PreconditionedMomentum
from nested_learning.optimizers.deep_momentum import _mlp
from nested_learning.optimizers.feature_maps import resolve_feature_map


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors here are tiny: a second thread only adds synchronisation, which dominates on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _step(opt, param, grad):
    param.grad = grad.clone()
    opt.step()


def test_delta_rule_replaces_the_memory_along_the_current_key():
    param = nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    opt = DeltaRuleMomentum([param], lr=0.1, momentum=0.9)  # delta = momentum: full replacement
    _step(opt, param, torch.randn(6, 5, dtype=torch.float64))
    old = opt.state[param]["momentum"].clone()
    g = torch.randn(6, 5, dtype=torch.float64)
    _step(opt, param, g)
    new = opt.state[param]["momentum"]
    k = g / g.norm()
    # Along k the new memory holds exactly the new value; orthogonal to k it keeps alpha times the old one.
    torch.testing.assert_close((new * k).sum(), (g * k).sum(), rtol=0, atol=1e-12)
    orth = lambda t: t - (t * k).sum() * k  # noqa: E731
    torch.testing.assert_close(orth(new), 0.9 * orth(old) + orth(g), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 7), (7, 3)])
def test_matrix_form_is_eq_49(shape):
    param = nn.Parameter(torch.zeros(*shape, dtype=torch.float64))
    opt = DeltaRuleMomentum([param], lr=0.1, momentum=0.8, delta=0.5, form="matrix")
    _step(opt, param, torch.randn(*shape, dtype=torch.float64))
    b = opt.state[param]["momentum"].clone()
    g = torch.randn(*shape, dtype=torch.float64)
    _step(opt, param, g)
    k = g / g.norm()
    expected = b @ (0.8 * torch.eye(shape[1], dtype=torch.float64) - 0.5 * k.T @ k) + g
    torch.testing.assert_close(opt.state[param]["momentum"], expected, rtol=0, atol=1e-12)


def test_poly2_feature_map_keeps_a_descent_direction():
    phi = resolve_feature_map("poly2")
    g = torch.randn(50, dtype=torch.float64)
    out = phi(g)
    assert (out * g).sum() > (g * g).sum()  # amplifies, never turns against the gradient
    assert torch.equal(torch.sign(out), torch.sign(g))
    torch.testing.assert_close(phi(3.0 * g), 3.0 * out, rtol=1e-12, atol=0)
    big = g.abs().argmax()
    assert out[big] / g[big] > out.abs().div(g.abs()).median()  # large coordinates grow most


def test_rms_preconditioner_first_step_is_sign_like():
    param = nn.Parameter(torch.zeros(10, dtype=torch.float64))
    g = torch.randn(10, dtype=torch.float64)
    _step(PreconditionedMomentum([param], lr=0.1, eps=0.0), param, g)
    torch.testing.assert_close(param.detach(), -0.1 * torch.sign(g), rtol=0, atol=1e-12)


def _deep_vs_heavy_ball(memory_lr):
    torch.manual_seed(0)
    deep = nn.Parameter(torch.zeros(4, 5, dtype=torch.float64))
    heavy = nn.Parameter(torch.zeros(4, 5, dtype=torch.float64))
    opt = DeepMomentumGD([deep], lr=0.1, memory_depth=3, memory_lr=memory_lr)
    ref = torch.optim.SGD([heavy], lr=0.1, momentum=0.9)
    for _ in range(6):
        g = torch.randn(4, 5, dtype=torch.float64)
        _step(opt, deep, g)
        _step(ref, heavy, g)
    return (deep - heavy).abs().max(), opt.state[deep]["mlp"][-2].abs().max()


def test_deep_momentum_is_heavy_ball_until_its_memory_learns():
    # The read-out layer starts at zero, so a memory that never learns is exactly heavy-ball momentum ...
    gap, readout = _deep_vs_heavy_ball(memory_lr=0.0)
    assert gap < 1e-12 and readout == 0
    # ... and one that learns departs from it through a trained read-out.
    gap, readout = _deep_vs_heavy_ball(memory_lr=0.5)
    assert gap > 1e-3 and readout > 0


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_deep_memory_step_lowers_its_internal_objective(objective):
    torch.manual_seed(1)
    param = nn.Parameter(torch.zeros(40, dtype=torch.float64))
    opt = DeepMomentumGD([param], lr=0.0, memory_depth=2, memory_lr=0.05, memory_decay=1.0, objective=objective)
    for _ in range(3):  # leave the zero initialisation so every layer has a gradient
        _step(opt, param, torch.randn(40, dtype=torch.float64))
    u = torch.randn(40, dtype=torch.float64)
    state = opt.state[param]
    s = u.pow(2).mean().sqrt()

    def inner(mlp, b):
        f = b + s * _mlp((u / s).reshape(-1, 1), mlp).view(-1)
        return -(f * u).sum() if objective == "dot" else 0.5 * (f - u).pow(2).sum()

    b_before = state["momentum"].clone()
    before = inner([t.clone() for t in state["mlp"]], b_before)
    _step(opt, param, u)
    # Compare with the linear memory held fixed, so the change is the deep part's own step.
    after = inner(state["mlp"], b_before)
    assert after < before
