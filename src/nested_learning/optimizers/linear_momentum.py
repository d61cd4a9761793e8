"""Shared step of the linear momentum memories (Eq 33-37, 48-49, 51).

Every member keeps one buffer b per parameter (the momentum, stored as a positive multiple of the descent
direction) and differs only in how the old buffer is retained before the new value is written:

    k = phi(g),  v = P phi(g)                      (key: feature map Eq 51; value: preconditioner Eq 37)
    b <- retain(b, k) + v                          (one step of the memory's internal objective)
    W <- W - lr b

The learning rate sits outside the buffer (b = -m / eta in the paper's sign, W + m = W - eta b) so that an
lr scheduler does not rescale what the memory already holds; for a constant lr this is the paper's recursion.
"""

from __future__ import annotations

import torch

from ._base import ParameterwiseOptimizer
from ._validation import check_choice, check_lr, check_nonnegative, check_unit_interval
from .feature_maps import FEATURE_MAPS, resolve_feature_map
from .preconditioners import PRECONDITIONERS, precondition


class LinearMomentumMemory(ParameterwiseOptimizer):
    """Base class: subclasses implement ``_retain(buffer, key, group)`` (in place)."""

    def __init__(self, params, defaults: dict) -> None:
        check_lr(defaults["lr"])
        check_unit_interval("momentum", defaults["momentum"])
        check_unit_interval("beta2", defaults["beta2"])
        check_nonnegative("eps", defaults["eps"])
        check_nonnegative("weight_decay", defaults["weight_decay"])
        check_choice("preconditioner", defaults["preconditioner"], PRECONDITIONERS)
        if not callable(defaults["feature_map"]):
            check_choice("feature_map", defaults["feature_map"], FEATURE_MAPS)
        super().__init__(params, defaults)

    def _retain(self, buffer: torch.Tensor, key: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def update(self, p: torch.Tensor, group: dict) -> None:
        phi = resolve_feature_map(group["feature_map"])
        g = p.grad
        if group["weight_decay"] != 0:
            g = g.add(p, alpha=group["weight_decay"])
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        key = phi(g)
        value = precondition(group["preconditioner"], state, key, group["beta2"], group["eps"])
        buffer = state["momentum"]
        self._retain(buffer, key, group)
        buffer.add_(value)
        p.add_(buffer, alpha=-group["lr"])
