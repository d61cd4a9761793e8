"""SGD with momentum written as a two-level associative memory (Eq 10-13)."""

from __future__ import annotations

import torch

from ._base import ParameterwiseOptimizer
from ._validation import check_lr, check_nonnegative, check_unit_interval
from .memory_solutions import dot_product_momentum


class MomentumAsMemory(ParameterwiseOptimizer):
    """Momentum as the argmin of the dot-product objective (Eq 10-13); equal to ``torch.optim.SGD``.

    Level 2 (the memory) compresses the gradient stream into m; level 1 (the weights) reads it:

        m_{t+1} = argmin_m -<m, (1 - dampening) g_t> + ||m - mu m_t||^2 / 2     (Eq 12-13, retention mu)
        W_{t+1} = W_t - lr * read(m_{t+1})                                        (Eq 10)

    ``read`` is m itself, or g_t + mu m_{t+1} with ``nesterov`` (the memory's prediction one retention step
    ahead plus the current gradient). The learning rate is kept outside the memory, as torch does, so that a
    scheduler changing lr does not rescale what the memory has already stored. On the first step the memory
    is initialised to g_1 itself (torch's convention, dampening not applied). ``weight_decay`` adds
    weight_decay * W to the gradient before it reaches the memory (coupled, as in SGD).

    Args mirror ``torch.optim.SGD``: lr, momentum, dampening, weight_decay, nesterov, maximize.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        check_lr(lr)
        check_nonnegative("momentum", momentum)
        check_unit_interval("dampening", dampening, closed=True)
        check_nonnegative("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def update(self, p: torch.Tensor, group: dict) -> None:
        mu = group["momentum"]
        g = -p.grad if group["maximize"] else p.grad
        if group["weight_decay"] != 0:
            g = g.add(p, alpha=group["weight_decay"])
        update = g
        if mu != 0:
            state = self.state[p]
            if "momentum" not in state:
                state["momentum"] = g.detach().clone()
            else:
                dot_product_momentum(state["momentum"], g, alpha=mu, eta=1 - group["dampening"])
            m = state["momentum"]
            update = g.add(m, alpha=mu) if group["nesterov"] else m
        p.add_(update, alpha=-group["lr"])
