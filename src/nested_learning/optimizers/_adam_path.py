"""The element-wise Adam step that Muon and M3 apply to parameters they do not orthogonalise."""

from __future__ import annotations

import torch


def adamw_update(p: torch.Tensor, state: dict, lr: float, betas, eps: float) -> None:
    """Adam step with bias correction (weight decay is applied by the caller), state keys ``adam_step/exp_avg/exp_avg_sq``."""
    if "exp_avg" not in state:
        state["adam_step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    beta1, beta2 = betas
    state["adam_step"] += 1
    t = state["adam_step"]
    state["exp_avg"].lerp_(p.grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
    denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(eps)
    p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
