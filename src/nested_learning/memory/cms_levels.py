"""The forms a CMS level can take (Eq 70-71): what its residual branch computes from its flat fast weights, and
the weight gradient of a loss from the gradients at the branch's intermediate tensors.

A level is ``MLP_l(u) = u + delta_l(u)``; every weight of ``delta_l`` is a linear map applied token by token, so
its gradient is a sum over tokens of outer products of an input and the loss's gradient at that map's output. The
caller (the CMS's own "next_input" objective, or a language model's next-token loss through ``autograd.grad``)
supplies the gradients at the tensors listed in ``LevelCache.factors``; :meth:`LevelForm.weight_grads` turns them
into the flat ``(B, n)`` gradient.

    "gelu"    delta(u) = W_down gelu(W_up u + b_up) + b_down            (the from-scratch HOPE levels)
    "swiglu"  delta(u) = W_down (silu(W_gate u) * (W_up u))             (a Llama-family MLP, so a pretrained MLP
                                                                         is a CMS level as it is: Sec 7.3)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

LEVEL_FORMS = ("gelu", "swiglu")
_HALF = (torch.float16, torch.bfloat16)


class LevelCache(NamedTuple):
    """One level's read of a segment. u: (B, S, d) its input; factors: the intermediate tensors whose loss
    gradients give the weight gradient (the branch output ``delta`` last); saved: what else the gradient needs."""

    u: torch.Tensor
    factors: tuple
    saved: tuple

    @property
    def delta(self) -> torch.Tensor:
        return self.factors[-1]


def gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu(x) / dx for the exact (erf) GELU: Phi(x) + x phi(x)."""
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * pdf


def silu_grad(x: torch.Tensor) -> torch.Tensor:
    """d silu(x) / dx = s(x) (1 + x (1 - s(x))), s the logistic sigmoid."""
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


class LevelForm:
    """A level's branch as a function of flat per-sequence weights ``w: (B, n)``."""

    name: str

    def __init__(self, dim: int, hidden: int):
        self.dim, self.hidden = dim, hidden

    def sizes(self) -> list[int]:
        raise NotImplementedError

    @property
    def n(self) -> int:
        return sum(self.sizes())

    def read(self, u: torch.Tensor, w: torch.Tensor) -> LevelCache:
        raise NotImplementedError

    def weight_grads(self, cache: LevelCache, factor_grads) -> torch.Tensor:
        raise NotImplementedError

    def next_input_factor_grads(self, cache: LevelCache, w: torch.Tensor, err: torch.Tensor) -> tuple:
        """The factor gradients of 1/2 sum_t ||delta_t - target_t||^2 given ``err = delta - target`` (B, S, d)."""
        raise NotImplementedError

    def branch(self, u: torch.Tensor, w: torch.Tensor, keep: bool = True) -> tuple[torch.Tensor, tuple]:
        """``delta(u)`` and what :meth:`branch_backward` reads (activations and views of w; nothing when not
        ``keep``), computed without autograd bookkeeping of its own."""
        raise NotImplementedError

    def branch_backward(self, u, saved: tuple, g: torch.Tensor, gw: torch.Tensor | None) -> torch.Tensor:
        """The gradient of ``<g, delta(u)>`` w.r.t. u; with ``gw`` (an empty ``(B, n)`` tensor) the gradient
        w.r.t. the flat weights is written into it (the outer products of :meth:`weight_grads`)."""
        raise NotImplementedError


class GeluLevel(LevelForm):
    """Layout [W_up (H, d), b_up (H), W_down (d, H), b_down (d)]; factors (pre, delta)."""

    name = "gelu"

    def sizes(self):
        H, d = self.hidden, self.dim
        return [H * d, H, d * H, d]

    def unpack(self, w):
        B, H, d = w.shape[0], self.hidden, self.dim
        W_up, b_up, W_down, b_down = torch.split(w, self.sizes(), dim=1)
        return W_up.view(B, H, d), b_up, W_down.view(B, d, H), b_down

    def _forward(self, u, w):
        W_up, b_up, W_down, b_down = self.unpack(w)
        pre = torch.baddbmm(b_up.unsqueeze(1), u, W_up.transpose(1, 2))
        h = F.gelu(pre)
        return torch.baddbmm(b_down.unsqueeze(1), h, W_down.transpose(1, 2)), pre, h, W_up, W_down

    def read(self, u, w):
        delta, pre, h, _, _ = self._forward(u, w)
        return LevelCache(u, (pre, delta), (h,))

    def weight_grads(self, cache, factor_grads):
        dpre, ddelta = factor_grads
        (h,), u, B = cache.saved, cache.u, cache.u.shape[0]
        return torch.cat(
            [(dpre.transpose(1, 2) @ u).reshape(B, -1), dpre.sum(1), (ddelta.transpose(1, 2) @ h).reshape(B, -1),
             ddelta.sum(1)],
            dim=1,
        )

    def next_input_factor_grads(self, cache, w, err):
        pre = cache.factors[0]
        return torch.bmm(err, self.unpack(w)[2]) * gelu_grad(pre), err  # back through W_down and the GELU

    def branch(self, u, w, keep=True):
        delta, pre, h, W_up, W_down = self._forward(u, w)
        if not keep:
            return delta, ()
        if pre.dtype in _HALF:  # gelu_backward multiplies in fp32 and rounds once: kept as autograd would run it
            return delta, (pre, h, W_up, W_down)
        # gelu'(pre) kept instead of pre: a training segment goes back through each level twice (its inner gradient
        # and the outer backward), each time a product with it instead of an erf and an exp per element
        slope = torch.ops.aten.gelu_backward(torch.ones_like(pre), pre)
        return delta, (slope, h, W_up, W_down)

    def branch_backward(self, u, saved, g, gw):
        slope_or_pre, h, W_up, W_down = saved
        dh = torch.bmm(g, W_down)
        if slope_or_pre.dtype in _HALF:
            dpre = torch.ops.aten.gelu_backward(dh, slope_or_pre)
        else:
            dpre = dh.mul_(slope_or_pre)
        if gw is not None:
            dW_up, db_up, dW_down, db_down = self.unpack(gw)
            torch.bmm(dpre.transpose(1, 2), u, out=dW_up)
            torch.sum(dpre, 1, out=db_up)
            torch.bmm(g.transpose(1, 2), h, out=dW_down)
            torch.sum(g, 1, out=db_down)
        return torch.bmm(dpre, W_up)


class SwiGLULevel(LevelForm):
    """Layout [W_gate (H, d), W_up (H, d), W_down (d, H)], no biases (as in Llama); factors (gate, up, delta)."""

    name = "swiglu"

    def sizes(self):
        H, d = self.hidden, self.dim
        return [H * d, H * d, d * H]

    def unpack(self, w):
        B, H, d = w.shape[0], self.hidden, self.dim
        W_gate, W_up, W_down = torch.split(w, self.sizes(), dim=1)
        return W_gate.view(B, H, d), W_up.view(B, H, d), W_down.view(B, d, H)

    def read(self, u, w):
        W_gate, W_up, W_down = self.unpack(w)
        g = torch.bmm(u, W_gate.transpose(1, 2))
        a = torch.bmm(u, W_up.transpose(1, 2))
        h = F.silu(g) * a
        return LevelCache(u, (g, a, torch.bmm(h, W_down.transpose(1, 2))), (h,))

    def weight_grads(self, cache, factor_grads):
        dg, da, ddelta = factor_grads
        (h,), u, B = cache.saved, cache.u, cache.u.shape[0]
        return torch.cat(
            [(dg.transpose(1, 2) @ u).reshape(B, -1), (da.transpose(1, 2) @ u).reshape(B, -1),
             (ddelta.transpose(1, 2) @ h).reshape(B, -1)],
            dim=1,
        )

    def next_input_factor_grads(self, cache, w, err):
        g, a, _ = cache.factors
        dh = torch.bmm(err, self.unpack(w)[2])
        return dh * a * silu_grad(g), dh * F.silu(g), err

    def _gate_up(self, w):
        """[W_gate; W_up] as one (B, 2H, d) view (they are adjacent in the layout): one product for both."""
        B, H, d = w.shape[0], self.hidden, self.dim
        return w[:, : 2 * H * d].view(B, 2 * H, d)

    def branch(self, u, w, keep=True):
        H, W_gate_up, W_down = self.hidden, self._gate_up(w), self.unpack(w)[2]
        ga = torch.bmm(u, W_gate_up.transpose(1, 2))
        h = F.silu(ga[..., :H]) * ga[..., H:]
        return torch.bmm(h, W_down.transpose(1, 2)), ((ga, h, W_gate_up, W_down) if keep else ())

    def branch_backward(self, u, saved, gd, gw):
        ga, h, W_gate_up, W_down = saved
        H = self.hidden
        g, a = ga[..., :H], ga[..., H:]
        dh = torch.bmm(gd, W_down)
        dga = torch.cat([torch.ops.aten.silu_backward(dh * a, g), dh * F.silu(g)], dim=-1)
        if gw is not None:
            torch.bmm(dga.transpose(1, 2), u, out=self._gate_up(gw))
            torch.bmm(gd.transpose(1, 2), h, out=self.unpack(gw)[2])
        return torch.bmm(dga, W_gate_up)


def make_level_form(name: str, dim: int, hidden: int) -> LevelForm:
    forms = {"gelu": GeluLevel, "swiglu": SwiGLULevel}
    if name not in forms:
        raise ValueError(f"level_form must be one of {LEVEL_FORMS}, got {name!r}")
    return forms[name](dim, hidden)
