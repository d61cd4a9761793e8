"""The problem every level solves (Eq 19-20, 56) and a generic numerical solver for it.

Eq 20 (NSAM): a level's new parameters minimise its linearised internal objective plus a proximal term,

    theta_{t+1} = argmin_Phi <Phi - theta_t, grad L(theta_t)> + ||Phi - a_t||^2 / (2 eta)          (linearize=True)

and the L2 form of Eq 56 keeps the objective itself (an implicit, or proximal-point, step):

    theta_{t+1} = argmin_Phi L(Phi) + ||Phi - a_t||^2 / (2 eta)                                    (linearize=False)

``a_t`` is the anchor: theta_t itself in Eq 19-20, or a retained alpha * theta_t for the memories with forgetting
(Eq 5, 88; momentum's mu m_t, Eq 12-13). :func:`proximal_step` solves either problem by Newton's method on the
flattened parameters, with the Hessian from autograd and no knowledge of any closed form; the tests check every
memory's closed-form update against it. :func:`linearized_step` is the closed form of the first problem,
``a_t - eta grad L(theta_t)``, with the gradient from autograd: the rule the decompositions run levels with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, hessian

Objective = Callable[[torch.Tensor], torch.Tensor]


def matrix_read(M: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """M(k) = M k for a matrix memory M: (dv, dk) and keys k: (N, dk) -> (N, dv)."""
    return k @ M.transpose(-1, -2)


def dot_objective(keys: torch.Tensor, values: torch.Tensor, read=matrix_read) -> Objective:
    """L~(M) = -sum_i <M(k_i), v_i> (Eq 17, 92): the Hebbian objective of linear attention and of momentum."""
    return lambda M: -(read(M, keys) * values).sum()


def l2_objective(keys: torch.Tensor, values: torch.Tensor, read=matrix_read) -> Objective:
    """L~(M) = 1/2 sum_i ||M(k_i) - v_i||^2 (Eq 56, 65, 93): the delta-rule objective."""
    return lambda M: 0.5 * (read(M, keys) - values).pow(2).sum()


def linearized_step(objective: Objective, theta: torch.Tensor, lr, anchor: torch.Tensor | None = None):
    """The minimiser of Eq 20's linearised problem, ``anchor - lr * grad L(theta)`` (anchor defaults to theta):
    one gradient step on the level's own objective, the gradient taken by autograd."""
    theta = theta.detach()
    g = grad(objective)(theta)
    return (theta if anchor is None else anchor) - lr * g


def proximal_step(
    objective: Objective,
    theta: torch.Tensor,
    lr,
    *,
    anchor: torch.Tensor | None = None,
    linearize: bool = True,
    tol: float = 1e-12,
    max_iter: int = 50,
) -> torch.Tensor:
    """Numerically minimise Eq 20 (``linearize=True``) or Eq 56's form (``linearize=False``) over Phi.

    ``lr`` is a scalar or a tensor of theta's shape (element-wise rates). Solved by :func:`newton_minimize` on the
    flattened Phi. Meant for small problems (the Hessian is dense): tests and checks, not training."""
    theta = theta.detach()
    anchor = theta if anchor is None else anchor.detach()
    shape = theta.shape
    lr = torch.as_tensor(lr, dtype=theta.dtype).expand(shape).reshape(-1)
    if linearize:
        g0 = grad(objective)(theta).reshape(-1)

        def inner(phi):
            return (phi - theta.reshape(-1)) @ g0
    else:

        def inner(phi):
            return objective(phi.reshape(shape))

    def total(phi):
        return inner(phi) + ((phi - anchor.reshape(-1)).pow(2) / (2 * lr)).sum()

    return newton_minimize(total, anchor.reshape(-1).clone(), tol, max_iter).reshape(shape)


def newton_minimize(total: Objective, x: torch.Tensor, tol: float = 1e-12, max_iter: int = 50) -> torch.Tensor:
    """Minimise a smooth function of a flat ``x`` by Newton's method (autograd Hessian, backtracking line search);
    stops when the gradient's norm is below ``tol`` times its initial size plus ``tol``."""
    g = grad(total)(x)
    scale = g.norm() + 1.0
    for _ in range(max_iter):
        if g.norm() <= tol * scale:
            break
        step = torch.linalg.solve(hessian(total)(x), g)
        value, t = total(x), 1.0
        while total(x - t * step) > value and t > 1e-8:
            t *= 0.5
        x = x - t * step
        g = grad(total)(x)
    return x
