"""Adam written as the solution of its associative-memory regression (Eq 101-105)."""

from __future__ import annotations

import torch

from ._base import ParameterwiseOptimizer
from ._validation import check_betas, check_lr, check_nonnegative
from .memory_solutions import ridge_momentum


class AdamAsMemory(ParameterwiseOptimizer):
    """Adam as the optimal element-wise momentum of Eq 101, computed through Eq 102; equal to ``torch.optim.Adam``.

    Eq 101 asks for the momentum m that maps every past gradient g_i to a target P,

        L~_t(m) = sum_i w_i ||m * g_i - P||^2 + lam ||m||^2,

    whose minimiser (Eq 102) needs only two memories, updated at the same frequency (Eq 102's recursions with
    exponential forgetting, the weights w_i of Adam):

        M~_t = beta1 M~_{t-1} + (1 - beta1) g_t          (first memory, ``first``)
        H_t  = beta2 H_{t-1}  + (1 - beta2) g_t^2        (second memory, ``second``)
        m*   = P * M^ / (H^ + lam),  M^ = M~ / (1 - beta1^t),  H^ = H / (1 - beta2^t).

    Bias correction turns the weighted sums into weighted means (weights summing to one). Choosing the target
    P = sqrt(H^) (Eq 103-105) gives m* = M^ / sqrt(H^); choosing the ridge lam = eps sqrt(H^) gives exactly
    torch's eps placement, m* = M^ / (sqrt(H^) + eps). The two memories forget at different rates (beta1 vs
    beta2), so Adam solves the regression with statistics accumulated at two time scales; with beta1 = beta2 it
    is the exact weighted ridge regression. ``amsgrad`` replaces H^ by its running maximum.

    Args mirror ``torch.optim.Adam``: lr, betas, eps, weight_decay (coupled: added to the gradient, or decoupled
    as in AdamW with ``decoupled_weight_decay``), amsgrad, maximize. ``foreach`` is accepted for signature
    compatibility; the memory form always runs tensor by tensor.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        check_lr(lr)
        check_betas(betas)
        check_nonnegative("eps", eps)
        check_nonnegative("weight_decay", weight_decay)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)

    def update(self, p: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        g = -p.grad if group["maximize"] else p.grad
        if wd != 0:
            if group["decoupled_weight_decay"]:
                p.mul_(1 - lr * wd)
            else:
                g = g.add(p, alpha=wd)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["first"] = torch.zeros_like(p)
            state["second"] = torch.zeros_like(p)
            if group["amsgrad"]:
                state["second_max"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        state["first"].lerp_(g, 1 - beta1)
        state["second"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        second = state["second"]
        if group["amsgrad"]:
            torch.maximum(state["second_max"], second, out=state["second_max"])
            second = state["second_max"]
        first_hat = state["first"] / (1 - beta1**t)
        second_hat = second / (1 - beta2**t)
        target = second_hat.sqrt()  # P = sqrt(H^), Eq 103
        p.sub_(lr * ridge_momentum(first_hat, second_hat, target, ridge=eps * target))
