"""Muon for whole models: Newton-Schulz-orthogonalised momentum on hidden matrices, AdamW on the rest (Eq 52)."""

from __future__ import annotations

import math

import torch

from ..ops import newton_schulz
from ._adam_path import adamw_update
from ._base import ParameterwiseOptimizer
from ._validation import (
    check_betas,
    check_choice,
    check_lr,
    check_nonnegative,
    check_positive_int,
    check_unit_interval,
)
from .param_groups import split_matrix_groups

ADJUST_LR = ("original", "match_rms_adamw", "none")


def _lr_scale(shape: torch.Size, adjust_lr: str) -> float:
    rows, cols = shape
    if adjust_lr == "original":  # equal update RMS for wide and tall matrices
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":  # update RMS about 0.2, like AdamW's, so one lr serves both paths
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class Muon(ParameterwiseOptimizer):
    """Muon (Eq 52: momentum whose output goes through the non-linearity sigma = Newton-Schulz) plus AdamW.

    For a group with ``use_muon=True`` (2-D parameters only):

        B <- mu B + (1 - mu) g;   U = g + mu (B - g) (nesterov) or B;   O = NewtonSchulz_T(U)  (fp32)
        W <- (1 - lr wd) W - lr * scale(shape) * O

    Groups with ``use_muon=False`` take a decoupled-weight-decay Adam (AdamW) step with their own ``lr``. A group
    that does not say is split by dimension: 2-D tensors to Muon, the rest to AdamW with ``lr=adamw_lr``.
    For a whole model pass ``muon_param_groups(model)``, which also sends embeddings and the output head to
    AdamW. ``torch.optim.Muon`` exists in this torch but runs Newton-Schulz in bf16 (several times slower than
    fp32 on CPU) and rejects non-2-D tensors, so this class uses ``nested_learning.ops.newton_schulz`` in fp32;
    with the same hyper-parameters the two agree to bf16 precision.

    Args:
        lr: Muon learning rate. momentum, nesterov: of the Muon buffer. weight_decay: decoupled, both paths.
        ns_steps, ns_coefficients: Newton-Schulz steps T and ``"quintic"`` / ``"cubic"`` / (a, b, c).
        adjust_lr: ``"original"`` (sqrt(max(1, rows / cols))), ``"match_rms_adamw"`` (0.2 sqrt(max(rows, cols)),
            lets one lr serve both paths) or ``"none"``.
        adamw_lr, adamw_betas, adamw_eps: the AdamW path (adamw_lr only for groups split here).
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_coefficients="quintic",
        adjust_lr: str = "original",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ) -> None:
        check_lr(lr)
        check_lr(adamw_lr)
        check_unit_interval("momentum", momentum)
        check_nonnegative("weight_decay", weight_decay)
        check_positive_int("ns_steps", ns_steps, minimum=0)
        check_choice("adjust_lr", adjust_lr, ADJUST_LR)
        check_betas(adamw_betas)
        check_nonnegative("adamw_eps", adamw_eps)
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
            ns_coefficients=ns_coefficients, adjust_lr=adjust_lr, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
        )
        groups = split_matrix_groups(params, "use_muon", {"lr": adamw_lr})
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("groups with use_muon=True may only hold 2-D parameters")

    def update(self, p: torch.Tensor, group: dict) -> None:
        p.mul_(1 - group["lr"] * group["weight_decay"])
        if group["use_muon"]:
            self._muon_update(p, group)
        else:
            adamw_update(p, self.state[p], group["lr"], group["adamw_betas"], group["adamw_eps"])

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        buf, mu = state["momentum"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        ortho = newton_schulz(update, steps=group["ns_steps"], coefficients=group["ns_coefficients"])
        p.add_(ortho.to(p.dtype), alpha=-group["lr"] * _lr_scale(p.shape, group["adjust_lr"]))

