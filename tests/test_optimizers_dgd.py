"""DGD (Eq 56-57) through forward/backward hooks on nn.Linear."""

import pytest
import torch
from torch import nn

from nested_learning.ops import dgd_step
from nested_learning.optimizers import DGD, record_linear_inputs

LR = 0.3


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors here are tiny: a second thread only adds synchronisation, which dominates on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3).double()


def _loss(y: torch.Tensor) -> torch.Tensor:
    target = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    return (y - target).pow(2).sum(-1).mean() + y.pow(3).mean()


def _grad_y(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """dL/dy of every row, computed independently of the hooks."""
    y = layer(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(_loss(y), y)
    return g.reshape(-1, g.shape[-1])


def _dgd_step_via_hooks(layer, x, batch_mode="mean", extra=None):
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    with record_linear_inputs(layer) as recorder:
        opt = DGD(layer.parameters(), lr=LR, recorder=recorder, batch_mode=batch_mode)
        loss = _loss(layer(x))
        if extra is not None:
            loss = loss + extra(layer)
        loss.backward()
        grad_b = layer.bias.grad.clone()
        opt.step()
    return w0, b0, grad_b


def test_single_sample_matches_ops_and_the_argmin_of_eq56():
    layer = _layer()
    x = torch.randn(1, 4, dtype=torch.float64) * 2.5  # not unit norm: the closed form must not assume it
    g = _grad_y(layer, x)
    w0, b0, grad_b = _dgd_step_via_hooks(layer, x)
    expected = dgd_step(w0, x[0], g[0], LR)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-12)
    # Eq 56 solved as a linear system: W (I + eta x x^T) = W_t + eta u x^T with u = -dL/dy.
    xx = x[0][:, None] * x[0][None, :]
    rhs = w0 - LR * g[0][:, None] * x[0][None, :]
    argmin = torch.linalg.solve(torch.eye(4, dtype=torch.float64) + LR * xx, rhs.T).T
    torch.testing.assert_close(layer.weight.detach(), argmin, rtol=0, atol=1e-12)
    assert not torch.allclose(expected, w0 - LR * g[0][:, None] * x[0][None, :], atol=1e-3), "DGD must differ from GD"
    # The bias has no recorded input: a plain GD step.
    torch.testing.assert_close(layer.bias.detach(), b0 - LR * grad_b, rtol=0, atol=1e-12)


def test_batch_modes_follow_their_definitions():
    x = torch.randn(2, 3, 4, dtype=torch.float64)  # (batch, time, features): 6 rows
    rows = x.reshape(-1, 4)
    g = _grad_y(_layer(), x)
    n = rows.shape[0]

    layer = _layer()
    w0, _, _ = _dgd_step_via_hooks(layer, x, "mean")
    mean = torch.stack([dgd_step(w0, rows[i], n * g[i], LR) for i in range(n)]).mean(0)
    torch.testing.assert_close(layer.weight.detach(), mean, rtol=0, atol=1e-12)

    layer = _layer()
    w0, _, _ = _dgd_step_via_hooks(layer, x, "sequential")
    w = w0
    for i in range(n):
        w = dgd_step(w, rows[i], n * g[i], LR / n)
    torch.testing.assert_close(layer.weight.detach(), w, rtol=0, atol=1e-12)


def test_gradient_the_rows_do_not_explain_takes_a_gd_step():
    x = torch.randn(5, 4, dtype=torch.float64)
    g = _grad_y(_layer(), x)
    layer = _layer()
    w0, _, _ = _dgd_step_via_hooks(layer, x, extra=lambda m: 0.5 * m.weight.pow(2).sum())
    mean = torch.stack([dgd_step(w0, x[i], 5 * g[i], LR) for i in range(5)]).mean(0)
    torch.testing.assert_close(layer.weight.detach(), mean - LR * w0, rtol=0, atol=1e-12)


def test_accumulated_backwards_equal_one_full_batch():
    x = torch.randn(6, 4, dtype=torch.float64)
    full = _layer()
    _dgd_step_via_hooks(full, x)

    split = _layer()
    with record_linear_inputs(split) as recorder:
        opt = DGD(split.parameters(), lr=LR, recorder=recorder)
        for half in (x[:3], x[3:]):
            (_loss(split(half)) / 2).backward()
        opt.step()
    torch.testing.assert_close(split.weight, full.weight, rtol=0, atol=1e-12)


def test_recorder_ignores_no_grad_forwards_and_zero_grad_clears_it():
    x = torch.randn(3, 4, dtype=torch.float64)
    reference = _layer()
    _dgd_step_via_hooks(reference, x)

    layer = _layer()
    with record_linear_inputs(layer) as recorder:
        opt = DGD(layer.parameters(), lr=LR, recorder=recorder)
        with torch.no_grad():
            layer(torch.randn(7, 4, dtype=torch.float64))
        _loss(layer(torch.randn(3, 4, dtype=torch.float64))).backward()
        opt.zero_grad()
        _loss(layer(x)).backward()
        opt.step()
    torch.testing.assert_close(layer.weight, reference.weight, rtol=0, atol=1e-12)


def test_without_hooks_dgd_is_plain_gd():
    layer = _layer()
    x = torch.randn(3, 4, dtype=torch.float64)
    recorder = record_linear_inputs(layer)
    recorder.remove()
    opt = DGD(layer.parameters(), lr=LR, recorder=recorder)
    w0 = layer.weight.detach().clone()
    _loss(layer(x)).backward()
    grad = layer.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), w0 - LR * grad, rtol=0, atol=1e-12)


def test_dgd_on_least_squares_stops_at_half_the_solution():
    # With L = ||W x - y||^2 / 2 the surprise is u = y - W x, so Eq 56 regresses W x onto y - W x: its fixed
    # point has 2 W x = y. For unit-norm inputs eta' is the same for every row and the mean-mode fixed point is
    # exactly half the least-squares solution; GD on the same data reaches the solution itself.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    y = x @ torch.randn(5, 3, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(64, 3, generator=gen, dtype=torch.float64)
    least_squares = torch.linalg.lstsq(x, y).solution.T
    layer = nn.Linear(5, 3, bias=False).double()
    with record_linear_inputs(layer) as recorder:
        opt = DGD(layer.parameters(), lr=2.0, recorder=recorder)
        for _ in range(400):
            opt.zero_grad()
            (0.5 * (layer(x) - y).pow(2).sum(-1).mean()).backward()
            opt.step()
    torch.testing.assert_close(layer.weight.detach(), 0.5 * least_squares, rtol=0, atol=1e-8)


def test_dgd_reduces_a_network_loss():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.randn(128, 8)
    y = torch.sin(x[:, :1]) + x[:, 1:2]
    with record_linear_inputs(net) as recorder:
        opt = DGD(net.parameters(), lr=0.1, recorder=recorder)
        losses = []
        for _ in range(100):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
