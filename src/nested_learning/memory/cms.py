"""Continuum Memory System (CMS), Eq 70-74: MLP levels that keep learning in context, level l every C_l tokens.

Level l is a residual MLP block (hidden width ``expansion * dim``, exact GELU)

    MLP_l(u) = u + W_down,l gelu(W_up,l u + b_up,l) + b_down,l          theta_l = (W_up, b_up, W_down, b_down)

whose weights are FAST weights: every stream carries its own copy theta_l in :class:`CMSState` (fp32, fp64 for an
fp64 module; one copy per batch element). A stream starts from the SLOW weights (the ``nn.Parameter``s): knowledge
transfer by initialisation (Eq 72-73), the outer optimizer meta-learns that initial state through the copies.

Update rule (Eq 71). Level l changes only at stream positions that are multiples of C_l (counted from the start of
the stream, not of a call): there it takes one gradient step on the chunk it has just finished,

    theta_l <- theta_l - eta_l / C_l * sum_{t in chunk} grad f(theta_l; x_t)          eta_l = max_lr * sigmoid(a_l)

(Eq 71's per-token rate is eta_t^(l) = eta_l / C_l, so eta_l is the step on the chunk's mean gradient and is
comparable across levels). The mean gradient is clipped to norm ``grad_clip`` (per batch element and level) before
the step: plain gradient steps on a chunk diverge once a level's activations grow (the step's curvature scales with
||h||^2; repetitive text drives the "next_input" regression there within a few hundred tokens), and a trust region
of length eta_l * grad_clip keeps every level bounded. ``grad_clip=None`` gives Eq 71 unclipped.

Because theta_l is constant over its chunk, the sum of per-token gradients equals the gradient of the summed chunk
loss: the gradients of segments of C_min = min(C) tokens are accumulated in ``CMSState.grads`` and applied at the
level's boundary. An update at the end of a chunk only affects later tokens.

Which local objective f is used is the caller's choice. This module owns the purely local one, ``"next_input"``:
level l regresses its output at t onto its input at t+1 (pairs inside the segment),

    f_l = 1/2 sum_t || MLP_l(u_t) - u_{t+1} ||^2          (u_t: the level's input; it does not depend on theta_l)

whose gradient is computed in closed form (:meth:`ContinuumMemorySystem.local_grads`). A language model can instead
supply the gradient of its next-token loss (Eq 8-9, see ``models/cms_lm.py``) and call :meth:`read` and :meth:`step`.

Variants (``variant=``):
    "sequential"   Eq 70       y = MLP_k(... MLP_1(u))
    "independent"  Eq 74       y = sum_l g_l(u) MLP_l(u),  g(u) = softmax(W_g u + b_g): an input-dependent gate whose
                               W_g starts at zero, so training starts from the uniform average of the levels
    "nested"       Eq 72-73    the chain of Eq 70, and the slower level supplies the initial state of the faster one
                               (MAML-style): each time level s+1 closes a chunk (after its own step), level s restarts
                               its inner optimisation from level s+1's current weights (slowest first, so a boundary
                               of the slowest level restarts the whole hierarchy from it). At the stream start every
                               level starts from its own slow weights.

Streaming. Used on its own (``y, state = cms(x, state)``), the module processes segments of C_min tokens aligned to
stream positions; a call may end inside a segment, whose inputs are kept in ``state.pending`` and re-run from the
state at the segment start by the next call, so any split gives the same outputs as one call.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._validation import check_int, check_layer_input
from .state import LayerState

VARIANTS = ("sequential", "independent", "nested")
MODES = ("first_order", "meta")


@dataclasses.dataclass
class CMSState(LayerState):
    """weights[l]: level l's fast weights, flat ``(B, n)`` with n = 2 H d + H + d, laid out as [W_up (H, d), b_up (H),
    W_down (d, H), b_down (d)] (:meth:`ContinuumMemorySystem.unpack`; one tensor per level keeps the per-segment
    bookkeeping to a few ops). grads[l]: same shape, the sum of level l's inner gradients since its last boundary.
    pending: (B, P, d) inputs of the unfinished segment (standalone use; empty when a language model drives the CMS).
    position: stream position of the state (of pending[:, 0]); a multiple of min(chunk_sizes)."""

    weights: list
    grads: list
    pending: torch.Tensor
    position: int


def segment_bounds(n: int, size: int, split: bool = True) -> list[tuple[int, int]]:
    """Offsets ``(a, b)`` of the segments of ``n`` tokens that start at an aligned position: pieces of ``size`` tokens
    (the last one possibly shorter). With ``split=False`` the complete segments are merged into one piece (nothing
    changes at their boundaries when no level learns)."""
    full = (n // size) * size
    if split:
        bounds = [(a, a + size) for a in range(0, full, size)]
    else:
        bounds = [(0, full)] if full else []
    if full < n:
        bounds.append((full, n))
    return bounds


def gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d gelu(x) / dx for the exact (erf) GELU: Phi(x) + x phi(x)."""
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * pdf


class ContinuumMemorySystem(nn.Module):
    """Eq 70-74 as a sequence layer: ``y, state = cms(x, state=None)``, ``x: (B, T, dim)`` -> ``y: (B, T, dim)``.

    Args:
        dim: model width. chunk_sizes: C_1..C_k, non-decreasing, each a multiple of C_1 (the level's update period).
        expansion: MLP hidden width = expansion * dim. variant: "sequential" | "independent" | "nested".
        inner_lr: initial eta_l of every level; 0 freezes the levels for good (eta = max_lr * sigmoid(-inf)).
        max_inner_lr: upper bound of eta_l. grad_clip: max norm of a level's mean chunk gradient (None: no clip).
        mode: "first_order" (inner gradients detached) or "meta" (the outer gradient flows through the inner
            updates, create_graph); meta only matters while grad mode is on.
    """

    def __init__(
        self,
        dim: int,
        chunk_sizes=(16, 64, 256),
        expansion: int = 4,
        variant: str = "sequential",
        inner_lr: float = 0.1,
        max_inner_lr: float = 1.0,
        mode: str = "first_order",
        grad_clip: float | None = 1.0,
    ):
        super().__init__()
        check_int("dim", dim)
        check_int("expansion", expansion)
        chunk_sizes = tuple(check_int(f"chunk_sizes[{i}]", c) for i, c in enumerate(chunk_sizes))
        if not chunk_sizes or min(chunk_sizes) < 1:
            raise ValueError(f"chunk_sizes must be positive integers, got {chunk_sizes}")
        if list(chunk_sizes) != sorted(chunk_sizes) or any(c % chunk_sizes[0] for c in chunk_sizes):
            raise ValueError(
                f"chunk_sizes must be non-decreasing multiples of the first one, got {chunk_sizes}"
            )
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= inner_lr <= max_inner_lr:
            raise ValueError(f"inner_lr must lie in [0, max_inner_lr={max_inner_lr}], got {inner_lr}")
        self.dim, self.hidden, self.chunk_sizes = dim, expansion * dim, chunk_sizes
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.variant, self.mode, self.max_inner_lr, self.grad_clip = variant, mode, max_inner_lr, grad_clip
        self.test_time_updates = True
        self.up = nn.ModuleList(nn.Linear(dim, self.hidden) for _ in chunk_sizes)
        self.down = nn.ModuleList(nn.Linear(self.hidden, dim) for _ in chunk_sizes)
        ratio = inner_lr / max_inner_lr if max_inner_lr > 0 else 0.0
        logit = math.log(ratio / (1 - ratio)) if 0 < ratio < 1 else (-math.inf if ratio == 0 else math.inf)
        self.lr_logit = nn.Parameter(torch.full((len(chunk_sizes),), logit))
        self.gate = nn.Linear(dim, len(chunk_sizes)) if variant == "independent" else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    @property
    def n_levels(self) -> int:
        return len(self.chunk_sizes)

    @property
    def segment_size(self) -> int:
        return self.chunk_sizes[0]

    def inner_lr(self) -> torch.Tensor:
        """eta_l of every level, shape (k,)."""
        return self.max_inner_lr * torch.sigmoid(self.lr_logit)

    def slow_weights(self, level: int) -> torch.Tensor:
        """Level ``level``'s slow weights, flat ``(n,)`` (graph-connected to the parameters)."""
        up, down = self.up[level], self.down[level]
        return torch.cat([up.weight.reshape(-1), up.bias, down.weight.reshape(-1), down.bias])

    def unpack(self, w: torch.Tensor):
        """Flat fast weights ``(B, n)`` -> views ``W_up (B, H, d), b_up (B, H), W_down (B, d, H), b_down (B, d)``."""
        B, H, d = w.shape[0], self.hidden, self.dim
        W_up, b_up, W_down, b_down = torch.split(w, [H * d, H, d * H, d], dim=1)
        return W_up.view(B, H, d), b_up, W_down.view(B, d, H), b_down

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> CMSState:
        """Fast weights = the slow weights (expanded views, graph-connected to them), zero accumulators."""
        weights = [
            self.slow_weights(lv).to(device=device, dtype=dtype).expand(batch, -1)
            for lv in range(self.n_levels)
        ]
        grads = [torch.zeros(batch, w.shape[1], device=device, dtype=dtype) for w in weights]
        return CMSState(weights, grads, torch.zeros(batch, 0, self.dim, device=device, dtype=dtype), 0)

    # ------------------------------------------------------------------ read (Eq 70 / 74)
    def _level(self, u: torch.Tensor, w: torch.Tensor):
        """MLP_l's residual branch with per-sequence weights; u: (B, S, d) -> pre, h: (B, S, H), delta: (B, S, d)."""
        W_up, b_up, W_down, b_down = self.unpack(w)
        pre = torch.baddbmm(b_up.unsqueeze(1), u, W_up.transpose(1, 2))
        h = F.gelu(pre)
        return pre, h, torch.baddbmm(b_down.unsqueeze(1), h, W_down.transpose(1, 2))

    def read(self, x: torch.Tensor, weights: list):
        """The CMS output with fast ``weights`` (constant over ``x``): ``x: (B, S, d)`` -> ``y: (B, S, d)`` in x's
        dtype, and per level the cache ``(input u, pre, h, delta)`` (delta: the residual branch's output). The
        gradients of a loss w.r.t. ``pre`` and ``delta`` are the output-side factors of the level's weight gradient
        (:meth:`weight_grads`); :meth:`local_grads` computes them in closed form."""
        u = x if x.dtype == weights[0].dtype else x.to(weights[0].dtype)
        cache = []
        if self.variant == "independent":
            gate = torch.softmax(self.gate(u), dim=-1)  # (B, S, k)
            y = u
            for lv in range(self.n_levels):
                pre, h, delta = self._level(u, weights[lv])
                y = y + gate[..., lv : lv + 1] * delta
                cache.append((u, pre, h, delta))
        else:  # sequential and nested read the chain of Eq 70
            y = u
            for lv in range(self.n_levels):
                pre, h, delta = self._level(y, weights[lv])
                cache.append((y, pre, h, delta))
                y = y + delta
        return (y if y.dtype == x.dtype else y.to(x.dtype)), cache

    # ------------------------------------------------------------------ the local objective and the step (Eq 71)
    @staticmethod
    def weight_grads(
        u: torch.Tensor, h: torch.Tensor, dpre: torch.Tensor, ddelta: torch.Tensor
    ) -> torch.Tensor:
        """A level's summed weight gradient, flat ``(B, n)``, from its per-token factors: every weight is a linear map
        applied token-wise, so dW_up = sum_t dpre_t u_t^T, db_up = sum_t dpre_t, dW_down = sum_t ddelta_t h_t^T,
        db_down = sum_t ddelta_t. u: (B, S, d), h, dpre: (B, S, H), ddelta: (B, S, d)."""
        B = u.shape[0]
        return torch.cat(
            [
                (dpre.transpose(1, 2) @ u).reshape(B, -1),
                dpre.sum(1),
                (ddelta.transpose(1, 2) @ h).reshape(B, -1),
                ddelta.sum(1),
            ],
            dim=1,
        )

    def local_grads(self, cache: list, weights: list, differentiable: bool = False) -> list[torch.Tensor]:
        """Closed-form gradient of the "next_input" objective 1/2 sum_t ||MLP_l(u_t) - u_{t+1}||^2 (pairs t, t+1 of
        the segment) w.r.t. each level's fast ``weights``, per batch element. Detached unless ``differentiable``."""
        out = []
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            for (u, pre, h, delta), w in zip(cache, weights):
                # err: (B, S, d); the segment's last token has no target yet
                err = F.pad(u[:, :-1] + delta[:, :-1] - u[:, 1:], (0, 0, 0, 1))
                dpre = torch.bmm(err, self.unpack(w)[2]) * gelu_grad(pre)  # back through W_down and the GELU
                out.append(self.weight_grads(u, h, dpre, err))
        return out

    def step(self, state: CMSState, grads: list | None, end: int) -> CMSState:
        """Accumulate one segment's ``grads`` (or none) and take Eq 71's step for every level whose chunk ends at
        stream position ``end``; the nested variant then restarts faster levels from slower ones."""
        lr = self.inner_lr()
        weights, accs = list(state.weights), list(state.grads)
        for lv, C in enumerate(self.chunk_sizes):
            if grads is not None:
                accs[lv] = accs[lv] + grads[lv].to(accs[lv].dtype)
            if end % C == 0:
                step = accs[lv] / C  # the chunk's mean gradient, per batch element
                if self.grad_clip is not None:  # a trust region: at most grad_clip long (see the module doc)
                    step = step * (self.grad_clip / step.norm(dim=1, keepdim=True).clamp_min(self.grad_clip))
                weights[lv] = weights[lv] - lr[lv].to(step.dtype) * step
                accs[lv] = torch.zeros_like(accs[lv])
        if self.variant == "nested":
            # slowest first, so a boundary of the slowest level restarts the whole hierarchy from it
            for s in range(self.n_levels - 2, -1, -1):
                if end % self.chunk_sizes[s + 1] == 0:
                    weights[s], accs[s] = weights[s + 1], torch.zeros_like(accs[s])
        return CMSState(weights, accs, state.pending, end)

    # ------------------------------------------------------------------ standalone sequence layer
    def forward(self, x: torch.Tensor, state: CMSState | None = None) -> tuple[torch.Tensor, CMSState]:
        """``x: (B, T, d)`` -> ``(y: (B, T, d), state)``, the levels learning with the "next_input" objective."""
        check_layer_input(x, self.dim)
        B, T, _ = x.shape
        if state is None:
            state = self.initial_state(
                B, x.device, torch.float64 if x.dtype == torch.float64 else torch.float32
            )
        P = state.pending.shape[1]
        xs = torch.cat([state.pending.to(x.dtype), x], dim=1)  # re-run the unfinished segment from its start
        learn = self.test_time_updates
        differentiable = torch.is_grad_enabled() and self.mode == "meta"
        outs, snap, start = [], state, 0
        for a, b in segment_bounds(xs.shape[1], self.segment_size, split=learn):
            y, cache = self.read(xs[:, a:b], snap.weights)
            outs.append(y)
            if b % self.segment_size == 0:  # the piece ends on a boundary: the state there is the new snapshot
                grads = self.local_grads(cache, snap.weights, differentiable) if learn else None
                end = state.position + b
                snap = self.step(snap, grads, end) if learn else dataclasses.replace(snap, position=end)
                start = b
        y = torch.cat(outs, dim=1)[:, P:] if outs else x[:, :0]
        return y, dataclasses.replace(snap, pending=xs[:, start:])
