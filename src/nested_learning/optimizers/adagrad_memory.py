"""AdaGrad written as the solution of its associative-memory regression (Eq 106-111)."""

from __future__ import annotations

import torch

from ._base import ParameterwiseOptimizer
from ._validation import check_lr, check_nonnegative
from .memory_solutions import ridge_momentum


class AdaGradAsMemory(ParameterwiseOptimizer):
    """AdaGrad as the Eq 101/102 regression with a first memory that keeps only the current gradient (Eq 106-111);
    equal to ``torch.optim.Adagrad``.

    AdaGrad is the same two-memory solution as Adam with different forgetting: the first memory does not
    accumulate at all (beta1 = 0, M~_t = g_t) and the second never forgets (H_t = H_{t-1} + g_t^2, a plain sum
    started at ``initial_accumulator_value``). With target P = sqrt(H) and ridge lam = eps sqrt(H),

        m*_t = P * M~_t / (H_t + lam) = g_t / (sqrt(H_t) + eps),     W_{t+1} = W_t - lr_t m*_t,

    with lr_t = lr / (1 + (t - 1) lr_decay) as in torch.

    Args mirror ``torch.optim.Adagrad``: lr, lr_decay, weight_decay (coupled), initial_accumulator_value, eps,
    maximize. ``foreach`` is accepted for signature compatibility.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
    ) -> None:
        check_lr(lr)
        check_nonnegative("lr_decay", lr_decay)
        check_nonnegative("weight_decay", weight_decay)
        check_nonnegative("initial_accumulator_value", initial_accumulator_value)
        check_nonnegative("eps", eps)
        defaults = dict(
            lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value,
            eps=eps, maximize=maximize,
        )
        super().__init__(params, defaults)

    def update(self, p: torch.Tensor, group: dict) -> None:
        g = -p.grad if group["maximize"] else p.grad
        if group["weight_decay"] != 0:
            g = g.add(p, alpha=group["weight_decay"])
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["second"] = torch.full_like(p, group["initial_accumulator_value"])
        state["step"] += 1
        state["second"].addcmul_(g, g)
        target = state["second"].sqrt()  # P = sqrt(H), Eq 108
        m_star = ridge_momentum(g, state["second"], target, ridge=group["eps"] * target)
        lr_t = group["lr"] / (1 + (state["step"] - 1) * group["lr_decay"])
        p.sub_(lr_t * m_star)
