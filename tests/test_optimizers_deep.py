"""Deep optimizers: delta-rule momentum (Eq 48-49), feature maps (Eq 51), preconditioned (Eq 37), deep momentum (Eq 50)."""

import copy

import pytest
import torch
from torch import nn

from nested_learning.optimizers import DeepMomentumGD, DeltaRuleMomentum, PreconditionedMomentum
from nested_learning.optimizers.deep_momentum import _mlp, row_mlp, row_shape
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


def _deep_vs_heavy_ball(memory_lr, memory):
    torch.manual_seed(0)
    deep = nn.Parameter(torch.zeros(4, 5, dtype=torch.float64))
    heavy = nn.Parameter(torch.zeros(4, 5, dtype=torch.float64))
    opt = DeepMomentumGD([deep], lr=0.1, memory_depth=3, memory_lr=memory_lr, memory=memory)
    ref = torch.optim.SGD([heavy], lr=0.1, momentum=0.9)
    for _ in range(6):
        g = torch.randn(4, 5, dtype=torch.float64)
        _step(opt, deep, g)
        _step(ref, heavy, g)
    mlp = opt.state[deep]["mlp"]
    readout = mlp[-1] if memory == "rows" else mlp[-2]  # the element-wise MLP interleaves biases
    return (deep - heavy).abs().max(), readout.abs().max()


@pytest.mark.parametrize("memory", ["rows", "elementwise"])
def test_deep_momentum_is_heavy_ball_until_its_memory_learns(memory):
    # The read-out layer starts at zero, so a memory that never learns is exactly heavy-ball momentum ...
    gap, readout = _deep_vs_heavy_ball(memory_lr=0.0, memory=memory)
    assert gap < 1e-12 and readout == 0
    # ... and one that learns departs from it through a trained read-out.
    gap, readout = _deep_vs_heavy_ball(memory_lr=0.5, memory=memory)
    assert gap > 1e-3 and readout > 0


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("objective", ["dot", "l2"])
@pytest.mark.parametrize("shape", [(5, 7), (7,), (3, 2, 2)])
def test_row_memory_step_is_an_autograd_step_on_its_objective(objective, depth, shape):
    torch.manual_seed(2)
    alpha, lr, memory_lr, decay = 0.9, 0.1, 0.3, 0.95
    param = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    opt = DeepMomentumGD([param], lr=lr, memory_depth=depth, momentum=alpha, hidden=4, memory_lr=memory_lr,
                         memory_decay=decay, objective=objective)
    for _ in range(3):  # leave the zero read-out so every layer has a gradient
        _step(opt, param, torch.randn(shape, dtype=torch.float64))
    state = opt.state[param]
    rows, width = row_shape(param)
    u = torch.randn(shape, dtype=torch.float64)
    s = u.pow(2).mean().sqrt()
    b = state["momentum"].clone().requires_grad_(True)
    weights = [w.clone().requires_grad_(True) for w in state["mlp"]]
    # Eq 50 read-out: f(u) = B + s h(u / s), h acting on the rows of u.
    f = b + s * row_mlp((u / s).reshape(rows, width), weights).reshape(shape)
    inner = -(f * u).sum() if objective == "dot" else 0.5 * (f - u).pow(2).sum()
    grads = torch.autograd.grad(inner, [b, *weights])
    with torch.no_grad():
        if objective == "dot":
            b_next = alpha * b - grads[0]  # retention alpha, step 1: b <- alpha b + u
        else:
            b_next = b - (1 - alpha) * grads[0]
        w_next = [decay * w - memory_lr / (rows * s**2) * g for w, g in zip(weights, grads[1:])]
        p_next = param - lr * (b_next + s * row_mlp((u / s).reshape(rows, width), w_next).reshape(shape))
    _step(opt, param, u)
    torch.testing.assert_close(state["momentum"], b_next, rtol=1e-12, atol=1e-14)
    for got, want in zip(state["mlp"], w_next):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(param.detach(), p_next, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("memory", ["rows", "elementwise"])
def test_row_memory_mixes_the_coordinates_of_a_row(memory):
    # Swap two coordinates of one row of the gradient (the tensor's RMS is unchanged) and read the memory
    # without training it on that step: an element-wise memory changes only the swapped coordinates, the row
    # memory changes the rest of that row too, and no other row in either case.
    torch.manual_seed(3)
    param = nn.Parameter(torch.zeros(4, 6, dtype=torch.float64))
    opt = DeepMomentumGD([param], lr=1.0, memory_depth=2, hidden=8, memory_lr=0.5, memory=memory)
    for _ in range(5):
        _step(opt, param, torch.randn(4, 6, dtype=torch.float64))
    opt.param_groups[0]["memory_lr"] = 0.0
    u = torch.randn(4, 6, dtype=torch.float64)
    swapped = u.clone()
    swapped[1, [0, 3]] = u[1, [3, 0]]
    updates = []
    for grad in (u, swapped):
        other = copy.deepcopy(opt)
        p = other.param_groups[0]["params"][0]
        before = p.detach().clone()
        _step(other, p, grad)
        updates.append(p.detach() - before)
    change = (updates[0] - updates[1]).abs()
    others = [c for c in range(6) if c not in (0, 3)]
    assert change[[0, 2, 3]].max() == 0
    assert change[1, [0, 3]].min() > 1e-3
    if memory == "rows":
        assert change[1, others].min() > 1e-6
    else:
        assert change[1, others].max() == 0


def test_row_memory_weights_travel_in_the_state_dict():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = DeepMomentumGD(model.parameters(), lr=1e-2, hidden=3)
    model(torch.randn(8, 6)).pow(2).sum().backward()
    opt.step()
    state = opt.state_dict()["state"]
    assert [tuple(w.shape) for w in state[0]["mlp"]] == [(3, 6), (6, 3)]  # weight (5, 6): rows of width 6
    assert [tuple(w.shape) for w in state[1]["mlp"]] == [(3, 5), (5, 3)]  # bias (5,): one row
    fresh = DeepMomentumGD(model.parameters(), lr=1e-2, hidden=3)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in model.parameters():
        for a, b in zip(opt.state[p]["mlp"], fresh.state[p]["mlp"]):
            assert torch.equal(a, b) and a is not b


@pytest.mark.parametrize("objective", ["dot", "l2"])
def test_deep_memory_step_lowers_its_internal_objective(objective):
    torch.manual_seed(1)
    param = nn.Parameter(torch.zeros(40, dtype=torch.float64))
    opt = DeepMomentumGD([param], lr=0.0, memory_depth=2, memory_lr=0.05, memory_decay=1.0, objective=objective,
                         memory="elementwise")
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
