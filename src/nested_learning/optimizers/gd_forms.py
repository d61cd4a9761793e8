"""Three readings of one gradient-descent step (Eq 1, Eq 2, Eq 3).

The paper starts from the observation that plain GD already solves an optimisation problem of its own. The two
argmin forms below are evaluated from their objectives as written (the objective is built and differentiated with
autograd), not from the closed form, so that comparing them with Eq 1 checks the reading rather than restating it.
"""

from __future__ import annotations

import torch


def gd_step(w: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """Eq 1: W_{t+1} = W_t - eta_t grad L(W_t; x_t)."""
    return w - lr * grad


def _argmin_linear_proximal(linear: torch.Tensor, center: torch.Tensor, lr: float) -> torch.Tensor:
    """argmin_W <linear, W> + ||W - center||^2 / (2 lr).

    The objective is quadratic with Hessian I / lr, so one Newton step from any start point lands on its
    minimiser; the gradient of that step comes from autograd on the objective itself. Starting at zero (rather
    than at ``center``) keeps the Newton step from collapsing to the closed form by construction.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0 for the proximal form, got {lr}")
    start = torch.zeros_like(center, requires_grad=True)
    with torch.enable_grad():
        objective = (linear * start).sum() + (start - center).pow(2).sum() / (2 * lr)
        (slope,) = torch.autograd.grad(objective, start)
    return (start - lr * slope).detach()


def steepest_descent_step(w: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """Eq 2: W_{t+1} = argmin_W <grad L(W_t; x_t), W> + ||W - W_t||^2 / (2 eta_t)."""
    return _argmin_linear_proximal(grad, w, lr)


def ftrl_step(w_first: torch.Tensor, grad_sum: torch.Tensor, lr: float) -> torch.Tensor:
    """Eq 3: W_{t+1} = argmin_W sum_{s<=t} <grad L(W_s; x_s), W> + ||W - W_1||^2 / (2 eta).

    Only the first iterate W_1 and the running gradient sum are used: the current W_t never enters, which is
    why this equals Eq 1 only for a constant learning rate.
    """
    return _argmin_linear_proximal(grad_sum, w_first, lr)
