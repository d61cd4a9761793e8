"""Multi-scale Momentum Muon (M3, Algorithm 1): a fast and a slow orthogonalised momentum over one variance."""

from __future__ import annotations

import torch

from ..ops import newton_schulz
from ._adam_path import adamw_update
from ._base import ParameterwiseOptimizer
from ._validation import check_betas, check_choice, check_lr, check_nonnegative, check_positive_int
from .param_groups import split_matrix_groups

MOMENTUM_MODES = ("ema", "accumulate")
EPS_MODES = ("outside", "inside")


class M3(ParameterwiseOptimizer):
    """Algorithm 1 (M3): the continuum memory system applied to the optimiser's own context, the gradients.

    For a 2-D parameter (group flag ``orthogonalize=True``), step t with gradient g_t:

        M1 <- beta1 M1 + g_t           (fast memory, every step)
        V  <- beta2 V + (1 - beta2) g_t^2,   V^ = V / (1 - beta2^t)
        O1 = NewtonSchulz_T(M1)
        W  <- (1 - lr wd) W - lr (O1 + alpha O2) / sqrt(V^ + eps)
        every f steps (t = f, 2f, ...):  M2 <- beta3 M2 + sum of the last f gradients;  O2 = NewtonSchulz_T(M2)

    so O2 is fixed for a whole chunk of f steps and uses only the previous chunk's gradients, as in Algorithm 1
    (the slow level of the continuum; O2 = 0 during the first chunk). Newton-Schulz runs in fp32.

    The sources disagree on three details; each is an option, the defaults and why:
      - ``momentum_mode="ema"`` (default): the memories decay (beta M + g, and an exponential V with Adam's bias
        correction). ``"accumulate"`` is the LaTeX of Algorithm 1 (M <- M + beta g, V <- V + beta2 g^2):
        nothing is forgotten, so the "fast" memory would hold the same whole history as the slow one and V
        would grow without bound (an AdaGrad-like decay of the step). Decay is what separates the two time
        scales, and it makes the fast memory Muon's momentum buffer (Newton-Schulz ignores the buffer's scale).
      - ``eps_mode="inside"`` (default): sqrt(V^ + eps), the LaTeX of Algorithm 1; ``"outside"`` is the
        pseudocode's sqrt(V^) + eps (Adam's placement). The numerator is a dense orthogonal matrix, non-zero
        even where the gradient has always been zero (an input feature that is constant, a dead unit), and
        there the update is lr O / (divisor at V = 0): lr O / sqrt(eps) inside, lr O / eps outside. With
        eps = 1e-8 that is 1e4 against 1e8 times lr; on sklearn digits (constant pixels) the outside form
        reached a worse validation loss at each lr tried with both (docs/results/optimizers.md).
      - ``ns_coefficients="quintic"`` (default, Muon's, converges in 5 steps); ``"cubic"`` is the
        O (3I - O^T O) / 2 iteration of the description; an (a, b, c) tuple is accepted.

    Note the update is an orthogonal matrix (entries about 1 / sqrt(max(rows, cols))) divided by the gradient's
    RMS, so its size scales inversely with the gradient; lr is therefore much smaller than Muon's.

    Groups with ``orthogonalize=False`` take an Adam step (betas beta1, beta2, same eps, their own lr); a group
    that does not say is split: 2-D tensors to M3, the rest to Adam with ``lr=adam_lr`` (default: lr). For a
    whole model use ``muon_param_groups(model, flag="orthogonalize")``.

    Args:
        lr, betas (beta1, beta2, beta3), alpha (>= 0, weight of the slow memory), eps, frequency f (>= 1),
        ns_steps T, ns_coefficients, momentum_mode, eps_mode, weight_decay (decoupled), adam_lr.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float, float] = (0.95, 0.999, 0.9),
        alpha: float = 0.1,
        eps: float = 1e-8,
        frequency: int = 10,
        ns_steps: int = 5,
        ns_coefficients="quintic",
        momentum_mode: str = "ema",
        eps_mode: str = "inside",
        weight_decay: float = 0.0,
        adam_lr: float | None = None,
    ) -> None:
        check_lr(lr)
        check_betas(betas, count=3)
        check_nonnegative("alpha", alpha)
        check_nonnegative("eps", eps)
        check_positive_int("frequency", frequency)
        check_positive_int("ns_steps", ns_steps, minimum=0)
        check_choice("momentum_mode", momentum_mode, MOMENTUM_MODES)
        check_choice("eps_mode", eps_mode, EPS_MODES)
        check_nonnegative("weight_decay", weight_decay)
        adam_lr = lr if adam_lr is None else adam_lr
        check_lr(adam_lr)
        defaults = dict(
            lr=lr, betas=tuple(betas), alpha=alpha, eps=eps, frequency=frequency, ns_steps=ns_steps,
            ns_coefficients=ns_coefficients, momentum_mode=momentum_mode, eps_mode=eps_mode, weight_decay=weight_decay,
        )
        groups = split_matrix_groups(params, "orthogonalize", {"lr": adam_lr})
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["orthogonalize"] and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("groups with orthogonalize=True may only hold 2-D parameters")

    def update(self, p: torch.Tensor, group: dict) -> None:
        p.mul_(1 - group["lr"] * group["weight_decay"])
        if group["orthogonalize"]:
            self._m3_update(p, group)
        else:
            adamw_update(p, self.state[p], group["lr"], group["betas"][:2], group["eps"])

    def _orthogonalize(self, m: torch.Tensor, group: dict) -> torch.Tensor:
        return newton_schulz(m, steps=group["ns_steps"], coefficients=group["ns_coefficients"])

    def _m3_update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            for name in ("fast", "slow", "slow_ortho", "variance", "grad_sum"):
                state[name] = torch.zeros_like(p)
        beta1, beta2, beta3 = group["betas"]
        ema = group["momentum_mode"] == "ema"
        g = p.grad
        state["step"] += 1
        t = state["step"]
        state["grad_sum"].add_(g)
        if ema:
            state["fast"].mul_(beta1).add_(g)
            state["variance"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            variance = state["variance"] / (1 - beta2**t)
        else:
            state["fast"].add_(g, alpha=beta1)
            state["variance"].addcmul_(g, g, value=beta2)
            variance = state["variance"]
        if group["eps_mode"] == "outside":
            denom = variance.sqrt().add_(group["eps"])
        else:
            denom = (variance + group["eps"]).sqrt_()
        direction = self._orthogonalize(state["fast"], group).add_(state["slow_ortho"], alpha=group["alpha"])
        p.addcdiv_(direction, denom, value=-group["lr"])
        if t % group["frequency"] == 0:
            if ema:
                state["slow"].mul_(beta3).add_(state["grad_sum"])
            else:
                state["slow"].add_(state["grad_sum"], alpha=beta3)
            state["slow_ortho"].copy_(self._orthogonalize(state["slow"], group))
            state["grad_sum"].zero_()
