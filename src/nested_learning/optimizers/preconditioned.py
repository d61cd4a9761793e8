"""Preconditioned momentum (Eq 33-37)."""

from __future__ import annotations

import torch

from .linear_momentum import LinearMomentumMemory


class PreconditionedMomentum(LinearMomentumMemory):
    """Momentum that maps each gradient to the value P g (Eq 37): m <- alpha m - eta P grad, W <- W + m.

    As an associative memory (Eq 34 with value P g): m_{i+1} = argmin_m <m, P g_i> + ||m - alpha m_i||^2 / (2 eta),
    a dot-product objective whose value is the preconditioned gradient instead of the gradient.

    Args:
        lr: eta. momentum: alpha, the retention of the memory, in [0, 1).
        preconditioner: ``"rms"`` (default; P = 1 / (sqrt(v^) + eps), v the beta2-average of g^2),
            ``"adagrad"`` (P = 1 / (sqrt(sum g^2) + eps)) or ``"identity"`` (heavy-ball momentum, equal to
            ``torch.optim.SGD(momentum=alpha)``). See ``preconditioners``.
        beta2, eps: of the preconditioner. weight_decay: coupled (added to the gradient).
        feature_map: Eq 51's phi, ``"identity"`` (default), ``"poly2"`` or a callable; see ``feature_maps``.

    With the ``"rms"`` preconditioner the buffer sums preconditioned gradients (scale about 1 / (1 - alpha)), so
    lr is about (1 - alpha) times an Adam learning rate.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        preconditioner: str = "rms",
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        feature_map="identity",
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, preconditioner=preconditioner, beta2=beta2, eps=eps,
            weight_decay=weight_decay, feature_map=feature_map,
        )
        super().__init__(params, defaults)

    def _retain(self, buffer: torch.Tensor, key: torch.Tensor, group: dict) -> None:
        buffer.mul_(group["momentum"])
