"""The memory forms of classic optimizers equal the classic optimizers (fp64, 100 steps, 1e-6)."""

import copy

import pytest
import torch
from torch import nn

from nested_learning.optimizers import (
    AdaGradAsMemory,
    AdamAsMemory,
    DeepMomentumGD,
    DeltaRuleMomentum,
    MomentumAsMemory,
    PreconditionedMomentum,
    ftrl_step,
    gd_step,
    steepest_descent_step,
)

STEPS = 100
TOL = 1e-6


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors here are tiny: a second thread only adds synchronisation, which dominates on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randn(16, 3, generator=gen, dtype=torch.float64)) for _ in range(STEPS)]


def _trajectory(make_opt, model=None):
    model = model or _net()
    opt = make_opt(model.parameters())
    for x, y in _batches():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _assert_same(make_a, make_b):
    a, b = _trajectory(make_a), _trajectory(make_b)
    start = torch.cat([p.detach().flatten() for p in _net().parameters()])
    moved = (a - start).abs().max()
    assert moved > 1e-2, "the trajectory must actually move for the comparison to mean anything"
    assert (a - b).abs().max() < TOL


ADAM_CASES = [
    {},
    {"weight_decay": 0.1, "amsgrad": True, "betas": (0.8, 0.9), "eps": 1e-6},
    {"weight_decay": 0.05, "decoupled_weight_decay": True, "maximize": True, "lr": 1e-3},
]


@pytest.mark.parametrize("kwargs", ADAM_CASES)
def test_adam_as_memory_equals_adam(kwargs):
    kwargs = {"lr": 1e-2, **kwargs}
    _assert_same(lambda p: AdamAsMemory(p, **kwargs), lambda p: torch.optim.Adam(p, **kwargs))


ADAGRAD_CASES = [{}, {"lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1, "eps": 1e-6}]


@pytest.mark.parametrize("kwargs", ADAGRAD_CASES)
def test_adagrad_as_memory_equals_adagrad(kwargs):
    kwargs = {"lr": 5e-2, **kwargs}
    _assert_same(lambda p: AdaGradAsMemory(p, **kwargs), lambda p: torch.optim.Adagrad(p, **kwargs))


SGD_CASES = [
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"momentum": 0.8, "dampening": 0.5},
]


@pytest.mark.parametrize("kwargs", SGD_CASES)
def test_momentum_as_memory_equals_sgd(kwargs):
    kwargs = {"lr": 5e-2, **kwargs}
    _assert_same(lambda p: MomentumAsMemory(p, **kwargs), lambda p: torch.optim.SGD(p, **kwargs))


def test_identity_preconditioned_momentum_is_heavy_ball():
    _assert_same(
        lambda p: PreconditionedMomentum(p, lr=5e-2, momentum=0.9, preconditioner="identity", weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9, weight_decay=0.01),
    )


def test_delta_momentum_without_erase_is_preconditioned_momentum():
    _assert_same(
        lambda p: DeltaRuleMomentum(p, lr=1e-3, delta=0.0, preconditioner="rms", feature_map="poly2"),
        lambda p: PreconditionedMomentum(p, lr=1e-3, preconditioner="rms", feature_map="poly2"),
    )


def test_depth_one_dot_product_deep_momentum_is_heavy_ball():
    _assert_same(
        lambda p: DeepMomentumGD(p, lr=5e-2, memory_depth=1, momentum=0.9, objective="dot"),
        lambda p: torch.optim.SGD(p, lr=5e-2, momentum=0.9),
    )


def test_depth_one_l2_deep_momentum_is_exponential_average():
    model = _net()
    reference = copy.deepcopy(model)
    opt = DeepMomentumGD(model.parameters(), lr=5e-2, memory_depth=1, momentum=0.9, objective="l2")
    averages = [torch.zeros_like(p) for p in reference.parameters()]
    for x, y in _batches()[:20]:
        for net in (model, reference):
            net.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        with torch.no_grad():
            for p, avg in zip(reference.parameters(), averages):
                avg.mul_(0.9).add_(p.grad, alpha=0.1)
                p.sub_(5e-2 * avg)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p - q).abs().max() < TOL


def _gd_forms_trajectory(form: str, lrs):
    model = _net()
    first = [p.detach().clone() for p in model.parameters()]
    sums = [torch.zeros_like(p) for p in model.parameters()]
    for (x, y), lr in zip(_batches(), lrs):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for p, w1, s in zip(model.parameters(), first, sums):
                s.add_(p.grad)
                if form == "gd":
                    p.copy_(gd_step(p, p.grad, lr))
                elif form == "steepest":
                    p.copy_(steepest_descent_step(p, p.grad, lr))
                else:
                    p.copy_(ftrl_step(w1, s, lr))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_steepest_descent_and_ftrl_forms_equal_gd():
    lrs = [0.1] * STEPS
    gd = _gd_forms_trajectory("gd", lrs)
    assert (gd - _gd_forms_trajectory("steepest", lrs)).abs().max() < TOL
    assert (gd - _gd_forms_trajectory("ftrl", lrs)).abs().max() < TOL


def test_ftrl_needs_a_constant_learning_rate():
    # Eq 3 anchors at W_1 with one eta: a changing lr rescales the whole history, so it leaves GD's path.
    lrs = [0.1 if t < STEPS // 2 else 0.02 for t in range(STEPS)]
    gd = _gd_forms_trajectory("gd", lrs)
    assert (gd - _gd_forms_trajectory("steepest", lrs)).abs().max() < TOL
    assert (gd - _gd_forms_trajectory("ftrl", lrs)).abs().max() > 1e-2
