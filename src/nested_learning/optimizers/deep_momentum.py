"""Deep momentum gradient descent (DMGD, Eq 50): the momentum is an MLP memory trained online."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from ._validation import check_choice, check_lr, check_nonnegative, check_positive_int, check_unit_interval

OBJECTIVES = ("dot", "l2")


def _init_mlp(depth: int, hidden: int, seed: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Weights of the element-wise MLP R -> R with ``depth - 1`` tanh hidden layers; last layer zero."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1] + [hidden] * (depth - 1) + [1]
    tensors = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        # A zero read-out makes the memory start as plain momentum and move away only as it learns.
        weight = torch.zeros(fan_out, fan_in) if last else torch.randn(fan_out, fan_in, generator=gen) / math.sqrt(fan_in)
        tensors += [weight.to(dtype=dtype, device=device), torch.zeros(fan_out, dtype=dtype, device=device)]
    return tensors


def _mlp(x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """x: (N, 1) -> (N, 1)."""
    n_layers = len(tensors) // 2
    for i in range(n_layers):
        x = x @ tensors[2 * i].T + tensors[2 * i + 1]
        if i < n_layers - 1:
            x = torch.tanh(x)
    return x


class DeepMomentumGD(Optimizer):
    """Momentum as an MLP memory, trained by one inner gradient step per outer step (Eq 50).

    Eq 50: W_{i+1} = W_i + m_{i+1}(u_i), m_{i+1} = alpha m_i - eta grad L^(2)(m_i; u_i), u_i = grad L(W_i).
    Per parameter tensor (d elements, gradient u, s = RMS(u)) the memory reads

        f_theta(u) = b + s * h_psi(u / s)                 (element-wise; W <- W - lr f_theta(u))

    with b a per-coordinate vector (the linear memory; depth 1 is f = b) and h_psi a small MLP R -> R shared by
    the tensor's coordinates, with ``memory_depth - 1`` tanh hidden layers of width ``hidden``: the residual
    memory shape of Eq 89, where the residual path is the classical momentum. Its input is the gradient in RMS
    units, so h learns a scale-free non-linear map of the gradient; its read-out starts at zero.

    Internal objective L^(2), one step per outer step on (b, psi), then the memory is read at u:
      - ``"dot"`` (default): L^(2) = -<f_theta(u), u>, the momentum objective of Eq 12-13 / 34. b takes
        retention alpha = ``momentum`` and step 1, so b <- alpha b + u: depth 1 is exactly heavy-ball momentum
        (torch.optim.SGD(momentum=alpha)), and a deeper memory strictly extends it. The deep part learns a
        bounded (tanh, retained) non-linear function of the gradient aligned with it.
      - ``"l2"``: L^(2) = ||f_theta(u) - u||^2 / 2. b takes retention 1 and step 1 - alpha, so depth 1 is the
        exponential average b <- alpha b + (1 - alpha) u (Adam's first moment, Eq 101's solution with P = g);
        h learns the part of the gradient the average misses.
    "dot" is the default because it keeps the reduction to classical momentum and, with the gradient as both
    key and target, the L2 regression tends to pull a deep memory towards returning the current gradient.

    The shared MLP takes ``memory_lr`` steps on the objective divided by d s^2 (so its step is independent of the
    tensor's size and gradient scale) with retention ``memory_decay``. Cost: O(d * hidden) per step and
    transient memory of the same size; the MLP runs in fp32 (fp64 for fp64 parameters).

    Args:
        lr, momentum (alpha in [0, 1)), memory_depth (>= 1), hidden (>= 1), memory_lr (>= 0),
        memory_decay (retention of psi in [0, 1]), objective (``"dot"`` or ``"l2"``), weight_decay (coupled),
        seed (initialisation of psi; per-tensor seeds are seed + index).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        memory_depth: int = 2,
        momentum: float = 0.9,
        hidden: int = 8,
        memory_lr: float = 1e-3,
        memory_decay: float = 0.99,
        objective: str = "dot",
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        check_lr(lr)
        check_positive_int("memory_depth", memory_depth)
        check_positive_int("hidden", hidden)
        check_unit_interval("momentum", momentum)
        check_nonnegative("memory_lr", memory_lr)
        check_unit_interval("memory_decay", memory_decay, closed=True)
        check_choice("objective", objective, OBJECTIVES)
        check_nonnegative("weight_decay", weight_decay)
        defaults = dict(
            lr=lr, memory_depth=memory_depth, momentum=momentum, hidden=hidden, memory_lr=memory_lr,
            memory_decay=memory_decay, objective=objective, weight_decay=weight_decay, seed=seed,
        )
        super().__init__(params, defaults)

    def _state(self, p: torch.Tensor, group: dict, index: int) -> dict:
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p)
            if group["memory_depth"] > 1:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                state["mlp"] = _init_mlp(group["memory_depth"], group["hidden"], group["seed"] + index, dtype, p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            alpha = group["momentum"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                u = p.grad
                if group["weight_decay"] != 0:
                    u = u.add(p, alpha=group["weight_decay"])
                state = self._state(p, group, index - 1)
                b = state["momentum"]
                if group["memory_depth"] == 1:
                    self._update_linear(b, -u if group["objective"] == "dot" else b - u, alpha, group)
                    p.add_(b, alpha=-group["lr"])
                    continue
                self._deep_step(p, u, b, state["mlp"], group)
        return loss

    @staticmethod
    def _update_linear(b, grad_b, alpha, group) -> None:
        if group["objective"] == "dot":
            b.mul_(alpha).sub_(grad_b)  # retention alpha, step 1
        else:
            b.sub_(grad_b, alpha=1 - alpha)  # retention 1, step 1 - alpha

    def _deep_step(self, p, u, b, mlp, group) -> None:
        dtype = mlp[0].dtype
        u32 = u.to(dtype)
        scale = u32.pow(2).mean().sqrt()
        x = (u32 / scale if scale > 0 else torch.zeros_like(u32)).reshape(-1, 1)
        with torch.enable_grad():
            b_leaf = b.to(dtype).detach().requires_grad_(True)
            psi = [t.detach().requires_grad_(True) for t in mlp]
            f = b_leaf + scale * _mlp(x, psi).view_as(b_leaf)
            if group["objective"] == "dot":
                inner = -(f * u32).sum()
            else:
                inner = 0.5 * (f - u32).pow(2).sum()
            grads = torch.autograd.grad(inner, [b_leaf, *psi])
        self._update_linear(b, grads[0].to(b.dtype), group["momentum"], group)
        if scale > 0:
            step = group["memory_lr"] / (u.numel() * scale**2)
            for t, g in zip(mlp, grads[1:]):
                t.mul_(group["memory_decay"]).sub_(g, alpha=float(step))
        read = b.to(dtype) + scale * _mlp(x, mlp).view_as(b)
        p.sub_(group["lr"] * read.to(p.dtype))
