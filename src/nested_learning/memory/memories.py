"""Memory architectures usable as fast weights: a matrix (``LinearMemory``) and the residual MLP of Eq 89.

A memory here is a *function of its weights*: the module owns only the slow initial values (``nn.Parameter``s, one set
per head), and every sequence carries its own fast copy. The fast weights are a list of matrices, each of shape
``(N, d_out, d_in)`` where ``N = batch * n_heads`` (batch-major: row ``b * n_heads + h``).

- ``init_weights(batch)`` expands the initial values to ``N`` fast copies (knowledge transfer by initialisation,
  Eq 72-73: a fresh sequence starts from the meta-learned values and gradients reach them through the copies).
- ``memory(weights, x)`` (``forward``) evaluates ``M(x)`` for ``x: (N, L, d_in)``. (It is not called ``apply``:
  that name belongs to ``nn.Module.apply(fn)``, which models use to initialise their submodules.)
- ``forward_with(linear, x)`` is the one place an architecture is written: every weight matrix is used only through
  ``linear(i, a)`` (``a @ W_i^T`` for the plain forward). Because every weight is a linear map applied token-wise, the
  gradient of a per-token loss ``l_t`` w.r.t. ``W_i`` is the outer product ``delta_{i,t} a_{i,t}^T`` of the layer's
  output gradient and its input. :meth:`FastWeightMemory.grad_factors` returns these factors for a whole chunk with one
  backward pass, which is what lets chunk-parallel forms (TTT's dual form) read with per-token weights without ever
  materialising one weight copy per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Linear = Callable[[int, torch.Tensor], torch.Tensor]


class FastWeightMemory(nn.Module):
    """Base class: a memory whose fast weights are ``len(shapes)`` matrices; subclasses write ``forward_with``, using
    each weight matrix exactly once per call (so that its per-token gradient is one outer product)."""

    def __init__(self, shapes: list[tuple[int, int]], n_heads: int = 1):
        super().__init__()
        self.n_heads = n_heads
        self.shapes = [tuple(s) for s in shapes]
        self.initial = nn.ParameterList([nn.Parameter(torch.empty(n_heads, *s)) for s in self.shapes])

    def forward_with(self, linear: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_weights(self, batch: int) -> list[torch.Tensor]:
        """Fast copies of the initial values: a list of ``(batch * n_heads, d_out, d_in)`` tensors."""
        return [
            p.unsqueeze(0).expand(batch, *p.shape).reshape(batch * self.n_heads, *p.shape[1:])
            for p in self.initial
        ]

    def forward(self, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``M(x)`` with per-sequence weights; ``x: (N, L, d_in)`` -> ``(N, L, d_out)``."""
        return self.forward_with(lambda i, a: a @ weights[i].to(a.dtype).transpose(-1, -2), x)

    def grad_factors(
        self, weights: list[torch.Tensor], x: torch.Tensor, out_grad: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-token gradient factors of ``sum_t l_t(M(x_t))`` at fixed ``weights``.

        ``out_grad(out)`` returns ``dl_t/dM(x_t)`` for ``out: (N, L, d_out)``. Returns ``(deltas, inputs)`` with
        ``deltas[i]: (N, L, d_out_i)`` and ``inputs[i]: (N, L, d_in_i)`` such that ``dl_t/dW_i = deltas[i][:, t] outer
        inputs[i][:, t]``. Differentiable (second order) when grad mode is on, so the slow weights are trained through
        the inner updates.
        """
        differentiable = torch.is_grad_enabled()
        inputs: dict[int, torch.Tensor] = {}
        probes: dict[int, torch.Tensor] = {}

        def linear(i: int, a: torch.Tensor) -> torch.Tensor:
            inputs[i] = a
            # a zero added to the layer output: its gradient is exactly delta_{i,t}, even when nothing else needs grad
            probes[i] = a.new_zeros(*a.shape[:-1], weights[i].shape[-2]).requires_grad_()
            return a @ weights[i].to(a.dtype).transpose(-1, -2) + probes[i]

        with torch.enable_grad():
            out = self.forward_with(linear, x)
            if len(probes) != len(weights):
                raise ValueError("forward_with must use every weight matrix exactly once")
            order = range(len(weights))
            deltas = torch.autograd.grad(
                out, [probes[i] for i in order], grad_outputs=out_grad(out), create_graph=differentiable
            )
        a_list = [inputs[i] for i in order]
        if not differentiable:
            a_list, deltas = [a.detach() for a in a_list], [d.detach() for d in deltas]
        return list(deltas), a_list


class LinearMemory(FastWeightMemory):
    """A matrix memory ``M(x) = W x`` with ``W: (d_out, d_in)`` (Eq 5/14-18, 92-93).

    ``init`` chooses the initial values: ``"normal"`` (std ``init_std / sqrt(d_in)``), ``"zeros"`` or ``"identity"``.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int | None = None,
        n_heads: int = 1,
        init: str = "normal",
        init_std: float = 1.0,
    ):
        d_out = d_in if d_out is None else d_out
        super().__init__([(d_out, d_in)], n_heads)
        self.d_in, self.d_out = d_in, d_out
        with torch.no_grad():
            w = self.initial[0]
            if init == "normal":
                w.normal_(0.0, init_std / math.sqrt(d_in))
            elif init == "zeros":
                w.zero_()
            elif init == "identity":
                w.copy_(torch.eye(d_out, d_in).expand_as(w))
            else:
                raise ValueError(f"unknown init {init!r}")

    def forward_with(self, linear: Linear, x: torch.Tensor) -> torch.Tensor:
        return linear(0, x)

    def grad_factors(self, weights, x, out_grad):
        """Closed form of the base method: dl/dW = out_grad(W x) x^T."""
        return [out_grad(x @ weights[0].to(x.dtype).mT)], [x]


_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}
# sigma'(z) * g as differentiable aten ops (each has a registered derivative, so the slow weights get second-order
# gradients through them)
_ACTIVATION_VJPS = {
    "gelu": lambda g, z: torch.ops.aten.gelu_backward(g, z),
    # aten's silu_backward has no derivative of its own, so the second-order path needs the written-out form
    "silu": lambda g, z: g * torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z))),
    "relu": lambda g, z: g * (z > 0).to(g.dtype),
    "tanh": lambda g, z: g * (1 - torch.tanh(z) ** 2),
}


class MLPMemory(FastWeightMemory):
    """Eq 89: ``M(x) = x + W1 sigma(W2 x)`` with ``W2: (hidden, dim)``, ``W1: (dim, hidden)``.

    Weight order in the fast-weight list: ``[W2, W1]`` (order of application). ``W2`` starts ``N(0, 1/dim)``, ``W1``
    ``N(0, init_std^2/hidden)``: a small residual branch, so ``M`` starts near the identity but both layers receive
    gradient from the first token on (a zero ``W1`` would block the gradient of ``W2``).
    """

    def __init__(
        self,
        dim: int,
        hidden: int | None = None,
        n_heads: int = 1,
        activation: str = "gelu",
        init_std: float = 0.5,
    ):
        hidden = 2 * dim if hidden is None else hidden
        super().__init__([(hidden, dim), (dim, hidden)], n_heads)
        self.dim, self.hidden = dim, hidden
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.sigma, self.sigma_vjp = _ACTIVATIONS[activation], _ACTIVATION_VJPS[activation]
        with torch.no_grad():
            self.initial[0].normal_(0.0, 1.0 / math.sqrt(dim))
            self.initial[1].normal_(0.0, init_std / math.sqrt(hidden))

    def forward_with(self, linear: Linear, x: torch.Tensor) -> torch.Tensor:
        return x + linear(1, self.sigma(linear(0, x)))

    def grad_factors(self, weights, x, out_grad):
        """Closed form of the base method (one explicit backward, no autograd call inside the forward):
        delta_W1 = e, delta_W2 = sigma'(z) * (W1^T e) with z = W2 x and e = out_grad(M(x))."""
        W2, W1 = (w.to(x.dtype) for w in weights)
        z = x @ W2.mT
        h = self.sigma(z)
        e = out_grad(x + h @ W1.mT)
        return [self.sigma_vjp(e @ W1, z), e], [x, h]
