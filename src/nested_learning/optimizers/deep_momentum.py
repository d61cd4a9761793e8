"""Deep momentum gradient descent (DMGD, Eq 50): the momentum is an MLP memory trained online."""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from ._validation import check_choice, check_lr, check_nonnegative, check_positive_int, check_unit_interval

OBJECTIVES = ("dot", "l2")
MEMORIES = ("rows", "elementwise")


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
    """Element-wise memory: x (N, 1) -> (N, 1), weights and biases interleaved in ``tensors``."""
    n_layers = len(tensors) // 2
    for i in range(n_layers):
        x = x @ tensors[2 * i].T + tensors[2 * i + 1]
        if i < n_layers - 1:
            x = torch.tanh(x)
    return x


def row_shape(p: torch.Tensor) -> tuple[int, int]:
    """(rows, width) the row memory sees: dim 0 indexes rows, the other dims are flattened into a row;
    a vector (or scalar) is one row."""
    if p.dim() <= 1:
        return 1, max(p.numel(), 1)
    return p.shape[0], p.numel() // p.shape[0]


def _init_row_mlp(width: int, depth: int, hidden: int, seed: int, dtype: torch.dtype, device) -> list[torch.Tensor]:
    """Weights W_0 (hidden, width), ..., W_{depth-2} (width, hidden) of the row MLP R^width -> R^width; the
    read-out W_{depth-2} is zero."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [width] + [hidden] * (depth - 1) + [width]
    tensors = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        # A zero read-out makes the memory start as plain momentum and move away only as it learns.
        weight = torch.zeros(fan_out, fan_in) if last else torch.randn(fan_out, fan_in, generator=gen) / math.sqrt(fan_in)
        tensors.append(weight.to(dtype=dtype, device=device))
    return tensors


def row_mlp(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Row memory's deep part: x (rows, width) -> (rows, width), tanh between layers, no biases (Eq 89's
    ``W_1 sigma(W_2 x)`` for depth 2)."""
    for i, w in enumerate(weights):
        x = x @ w.T
        if i < len(weights) - 1:
            x = torch.tanh(x)
    return x


def row_mlp_grads(x: torch.Tensor, weights: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of <row_mlp(x, weights), grad_out> with respect to each weight (backpropagation by hand:
    one forward and one backward pass, no autograd graph)."""
    acts = [x]
    for w in weights[:-1]:
        acts.append(torch.tanh(acts[-1] @ w.T))
    grads = [None] * len(weights)
    g = grad_out
    for i in range(len(weights) - 1, -1, -1):
        grads[i] = g.T @ acts[i]
        if i > 0:
            g = (g @ weights[i]) * (1 - acts[i].pow(2))  # through tanh: 1 - tanh^2
    return grads


class DeepMomentumGD(Optimizer):
    """Momentum as an MLP memory, trained by one inner gradient step per outer step (Eq 50).

    Eq 50: W_{i+1} = W_i + m_{i+1}(u_i), m_{i+1} = alpha m_i - eta grad L^(2)(m_i; u_i), u_i = grad L(W_i).
    Per parameter tensor (gradient u, s = RMS(u) over the tensor) the memory reads

        f_theta(u) = B + s * h_psi(u / s)                   (W <- W - lr f_theta(u))

    with B a tensor of the parameter's shape (the linear memory; ``memory_depth=1`` is f = B) and h_psi the
    deep memory, whose read-out starts at zero. This is Eq 89's residual shape, x + W_1 sigma(W_2 x), with the
    residual path the linear memory of the gradients (B already holds the current gradient after its update).
    The input is the gradient in RMS units, so h learns a scale-free map.

    ``memory`` chooses h:
      - ``"rows"`` (default): an MLP R^c -> R^c over the rows of the gradient, h(X) = W_L ... tanh(W_1 X^T),
        no biases. For a (r, c) matrix the r rows u_j are the memory's keys; for more dims, rows are dim 0 and
        the rest is flattened; a vector is one row. Shapes (depth 2): W_1 (hidden, c), W_2 (c, hidden). Each
        output coordinate depends on the whole row, so the memory mixes coordinates: with the dot objective,
        W_2 accumulates (with retention) the Hebbian sum of u_j tanh(W_1 u_j)^T over past rows, so h(u)
        returns past gradient rows weighted by their learned similarity to u, a non-linear momentum.
        Cost per step: about 3 r c hidden multiply-adds per layer pair and O(r hidden) transient memory.
      - ``"elementwise"``: a scalar MLP R -> R (with biases) shared by all coordinates of the tensor; it can
        reshape each coordinate's gradient but never mixes coordinates. Cost O(r c hidden).

    Internal objective L^(2), one step per outer step on (B, psi) at their current values, then the updated
    memory is read at u (m_{i+1}(u_i)):
      - ``"dot"`` (default): L^(2) = -<f_theta(u), u>, Eq 12-13's momentum objective with the matrix m replaced
        by the memory's read-out. B takes retention alpha = ``momentum`` and step 1, so B <- alpha B + u:
        depth 1 (or a deep part that never learns) is exactly heavy-ball momentum (torch.optim.SGD(momentum)).
      - ``"l2"``: L^(2) = ||f_theta(u) - u||^2 / 2. B takes retention 1 and step 1 - alpha, so depth 1 is the
        exponential average B <- alpha B + (1 - alpha) u (Adam's first moment, Eq 101's solution with P = g).
    "dot" is the default because it keeps the reduction to classical momentum and, with the gradient as both
    key and target, the L2 regression tends to pull a deep memory towards returning the current gradient.

    psi takes a step of ``memory_lr`` on L^(2) / (r s^2), the objective averaged over the memory's keys (rows;
    every coordinate for ``"elementwise"``) in RMS units, so the step is independent of the tensor's size and
    gradient scale, with retention ``memory_decay`` (Eq 50's alpha for psi). The MLP runs in fp32 (fp64 for
    fp64 parameters).

    Args:
        lr, momentum (alpha in [0, 1)), memory (``"rows"`` or ``"elementwise"``), memory_depth (>= 1),
        hidden (>= 1), memory_lr (>= 0), memory_decay (retention of psi in [0, 1]), objective (``"dot"`` or
        ``"l2"``), weight_decay (coupled), seed (initialisation of psi; per-tensor seeds are seed + index).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        memory_depth: int = 2,
        momentum: float = 0.9,
        hidden: int = 8,
        memory_lr: float = 1e-2,
        memory_decay: float = 0.99,
        objective: str = "dot",
        weight_decay: float = 0.0,
        seed: int = 0,
        memory: str = "rows",
    ) -> None:
        check_lr(lr)
        check_positive_int("memory_depth", memory_depth)
        check_positive_int("hidden", hidden)
        check_unit_interval("momentum", momentum)
        check_nonnegative("memory_lr", memory_lr)
        check_unit_interval("memory_decay", memory_decay, closed=True)
        check_choice("objective", objective, OBJECTIVES)
        check_choice("memory", memory, MEMORIES)
        check_nonnegative("weight_decay", weight_decay)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        defaults = dict(
            lr=lr, memory_depth=memory_depth, momentum=momentum, hidden=hidden, memory_lr=memory_lr,
            memory_decay=memory_decay, objective=objective, weight_decay=weight_decay, seed=seed, memory=memory,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts saved before the row memory existed
            group.setdefault("memory", "elementwise")

    def _state(self, p: torch.Tensor, group: dict, index: int) -> dict:
        state = self.state[p]
        if not state:
            state["momentum"] = torch.zeros_like(p)
            if group["memory_depth"] > 1:
                dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
                seed = group["seed"] + index
                if group["memory"] == "rows":
                    width = row_shape(p)[1]
                    state["mlp"] = _init_row_mlp(width, group["memory_depth"], group["hidden"], seed, dtype, p.device)
                else:
                    state["mlp"] = _init_mlp(group["memory_depth"], group["hidden"], seed, dtype, p.device)
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
                if group["memory"] == "rows":
                    self._rows_step(p, u, b, state["mlp"], group)
                else:
                    self._elementwise_step(p, u, b, state["mlp"], group)
        return loss

    @staticmethod
    def _update_linear(b, grad_b, alpha, group) -> None:
        if group["objective"] == "dot":
            b.mul_(alpha).sub_(grad_b)  # retention alpha, step 1
        else:
            b.sub_(grad_b, alpha=1 - alpha)  # retention 1, step 1 - alpha

    def _rows_step(self, p, u, b, weights, group) -> None:
        dtype = weights[0].dtype
        rows, width = row_shape(p)
        u32 = u.to(dtype).reshape(rows, width)
        scale = u32.pow(2).mean().sqrt()
        if scale == 0:  # no gradient: B still decays, psi is left as it is
            self._update_linear(b, torch.zeros_like(b) if group["objective"] == "dot" else b - u, group["momentum"], group)
        else:
            x = u32 / scale
            b32 = b.to(dtype).reshape(rows, width)
            # dL/df: -u for "dot", f - u for "l2"; the deep part enters f as s h(x), hence the factor s.
            if group["objective"] == "dot":
                grad_f = -u32
            else:
                grad_f = b32 + scale * row_mlp(x, weights) - u32
            grads = row_mlp_grads(x, weights, scale * grad_f)
            self._update_linear(b, grad_f.reshape(b.shape).to(b.dtype), group["momentum"], group)
            step = float(group["memory_lr"] / (rows * scale**2))
            for w, g in zip(weights, grads):
                w.mul_(group["memory_decay"]).sub_(g, alpha=step)
        x = u32 / scale if scale > 0 else u32
        read = b.to(dtype).reshape(rows, width) + scale * row_mlp(x, weights)
        p.sub_(group["lr"] * read.reshape(p.shape).to(p.dtype))

    def _elementwise_step(self, p, u, b, mlp, group) -> None:
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
