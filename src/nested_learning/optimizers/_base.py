"""The step loop shared by the optimizers that update every parameter on its own."""

from __future__ import annotations

import torch


class ParameterwiseOptimizer(torch.optim.Optimizer):
    """``step(closure)`` evaluates the closure, then calls ``update(p, group)`` for every parameter with a
    gradient, in group order; subclasses implement ``update`` (gradients are read under ``torch.no_grad``)."""

    def update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group)
        return loss
