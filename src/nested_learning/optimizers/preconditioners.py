"""Diagonal preconditioners P for the momentum family (Eq 37: m <- alpha m - eta P grad).

Eq 37 lets the momentum map each gradient to a value P g instead of g itself. The sources leave P open
(Hessian information, for instance); the ones offered here are diagonal, so they cost O(d) and keep the
momentum element-wise:

- ``"identity"``: P = I (plain momentum).
- ``"rms"``: P = diag(1 / (sqrt(v^) + eps)) with v an exponential average of g^2 (rate beta2) and v^ its
  bias-corrected value: the RMSProp/Adam scaling, the default of ``PreconditionedMomentum``.
- ``"adagrad"``: P = diag(1 / (sqrt(sum g^2) + eps)), the AdaGrad scaling (never forgets).
"""

from __future__ import annotations

import torch

PRECONDITIONERS = ("identity", "rms", "adagrad")


def precondition(name: str, state: dict, grad: torch.Tensor, beta2: float, eps: float) -> torch.Tensor:
    """Return P grad, updating the preconditioner's memory ``state["precond"]`` (and ``state["precond_step"]``)."""
    if name == "identity":
        return grad
    if "precond" not in state:
        state["precond"] = torch.zeros_like(grad)
        state["precond_step"] = 0
    state["precond_step"] += 1
    v = state["precond"]
    if name == "rms":
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        scale = (v / (1 - beta2 ** state["precond_step"])).sqrt_().add_(eps)
    else:
        v.addcmul_(grad, grad)
        scale = v.sqrt().add_(eps)
    return grad / scale
