"""Continuum Memory System (CMS), Eq 70-74: MLP levels that keep learning in context, level l every C_l tokens.

Level l is a residual MLP block (hidden width ``expansion * dim``, or ``hidden``), by default with the exact GELU

    MLP_l(u) = u + W_down,l gelu(W_up,l u + b_up,l) + b_down,l          theta_l = (W_up, b_up, W_down, b_down)

or, with ``level_form="swiglu"``, a Llama-family MLP, u + W_down (silu(W_gate u) * (W_up u)), so that a pretrained
model's MLP is a level as it is (Sec 7.3; ``memory/cms_levels.py`` holds both forms and their weight gradients),

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
    "nested"       Eq 72-73    the chain of Eq 70, and the initial state of the faster level is meta-learned from the
                               slower one: each time level s+1 closes a chunk (after its own step), level s restarts its
                               inner optimisation from
                                   theta_s <- theta_s^0 + lambda_s (theta_{s+1} - theta_{s+1}^0)
                               its own slow (meta-learned) weights plus a learned fraction lambda_s = sigmoid(a_s) of
                               what level s+1 has learned in context (``nested_init="learned"``, default; lambda_s
                               starts at 1/2 and trains with the outer loss). ``nested_init="copy"`` restarts from
                               level s+1's weights themselves. Restarts run slowest first. At the stream start every
                               level starts from its own slow weights.

Knowledge transfer between levels (``transfer=``, one name or one per level: "init", "backprop", "direct",
"generate", Eq 24-30): ``memory/cms_transfer.py``. The default "init" is the behaviour described above.

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
from ..ops.threads import BackwardOnOneThread, one_thread_if_threads_sleep
from .cms_chain_read import ChainRead, ChainSink, chain_read
from .cms_levels import LEVEL_FORMS, LevelCache, gelu_grad, make_level_form
from .cms_transfer import TRANSFERS, LevelTransfer, parse_transfer
from .state import LayerState

__all__ = ["LEVEL_FORMS", "TRANSFERS", "CMSState", "ContinuumMemorySystem", "LevelCache", "gelu_grad", "segment_bounds"]

VARIANTS = ("sequential", "independent", "nested")
NESTED_INITS = ("learned", "copy")
MODES = ("first_order", "meta")


@dataclasses.dataclass
class CMSState(LayerState):
    """weights[l]: level l's fast weights, flat ``(B, n)``; for the GELU form n = 2 H d + H + d, laid out as
    [W_up (H, d), b_up (H), W_down (d, H), b_down (d)], for the SwiGLU form [W_gate, W_up (H, d), W_down (d, H)]
    (:meth:`ContinuumMemorySystem.unpack`; one tensor per level keeps the per-segment bookkeeping to a few ops). grads[l]: same shape, the sum of level l's inner gradients since its last boundary.
    pending: (B, P, d) inputs of the unfinished segment (standalone use; empty when a language model drives the CMS).
    position: stream position of the state (of pending[:, 0]); a multiple of min(chunk_sizes)."""

    weights: list
    grads: list
    pending: torch.Tensor
    position: int


_ZEROS: dict = {}  # (dtype, device) -> a zero scalar that every zero accumulator of that kind broadcasts


def zero_accumulator(like: torch.Tensor) -> torch.Tensor:
    """A level's gradient accumulator when it holds nothing (a fresh state, or after its step): zeros of ``like``'s
    shape, dtype and device, broadcast from one shared element, so a step writes no zeros over a level's weights and
    the next segment's gradient replaces it instead of being added to it (:func:`is_zero_accumulator`). Nothing
    writes an accumulator in place."""
    key = (like.dtype, like.device)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return _ZEROS[key].expand(like.shape)


def is_zero_accumulator(acc: torch.Tensor) -> bool:
    """Whether ``acc`` is a :func:`zero_accumulator` (its detached copies too: they share its element)."""
    zero = _ZEROS.get((acc.dtype, acc.device))
    return (
        zero is not None
        and all(s == 0 for s in acc.stride())
        and acc.untyped_storage().data_ptr() == zero.untyped_storage().data_ptr()
    )


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


class ContinuumMemorySystem(nn.Module):
    """Eq 70-74 as a sequence layer: ``y, state = cms(x, state=None)``, ``x: (B, T, dim)`` -> ``y: (B, T, dim)``.

    Args:
        dim: model width. chunk_sizes: C_1..C_k, non-decreasing, each a multiple of C_1 (the level's update period).
        expansion: MLP hidden width = expansion * dim. variant: "sequential" | "independent" | "nested".
        inner_lr: initial eta_l of every level; 0 freezes the levels for good (eta = max_lr * sigmoid(-inf)).
        max_inner_lr: upper bound of eta_l. grad_clip: max norm of a level's mean chunk gradient (None: no clip).
        mode: "first_order" (inner gradients detached) or "meta" (the outer gradient flows through the inner
            updates, create_graph); meta only matters while grad mode is on.
        level_form: "gelu" (W_up, b_up, W_down, b_down) or "swiglu" (gate_proj, up, down without biases).
        hidden: the levels' hidden width when it is not a multiple of dim (a pretrained MLP's); overrides expansion.
        transfer: knowledge transfer into each level from the next slower one, a name or one per level
            (``memory/cms_transfer.py``); "init" (default) everywhere is the CMS without a transfer of its own.
        nested_init: how the nested variant restarts a faster level: "learned" (its slow weights plus a learned
            fraction of the slower level's in-context change) or "copy" (the slower level's weights).
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
        level_form: str = "gelu",
        hidden: int | None = None,
        transfer="init",
        nested_init: str = "learned",
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
        self.dim, self.hidden, self.chunk_sizes = dim, int(hidden) if hidden else expansion * dim, chunk_sizes
        if self.hidden < 1:
            raise ValueError(f"the levels' hidden width must be positive, got {self.hidden}")
        self.form = make_level_form(level_form, dim, self.hidden)
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.variant, self.mode, self.max_inner_lr, self.grad_clip = variant, mode, max_inner_lr, grad_clip
        self.test_time_updates = True
        bias = level_form == "gelu"
        if level_form == "swiglu":
            self.gate_proj = nn.ModuleList(nn.Linear(dim, self.hidden, bias=False) for _ in chunk_sizes)
        self.up = nn.ModuleList(nn.Linear(dim, self.hidden, bias=bias) for _ in chunk_sizes)
        self.down = nn.ModuleList(nn.Linear(self.hidden, dim, bias=bias) for _ in chunk_sizes)
        ratio = inner_lr / max_inner_lr if max_inner_lr > 0 else 0.0
        logit = math.log(ratio / (1 - ratio)) if 0 < ratio < 1 else (-math.inf if ratio == 0 else math.inf)
        self.lr_logit = nn.Parameter(torch.full((len(chunk_sizes),), logit))
        self.gate = nn.Linear(dim, len(chunk_sizes)) if variant == "independent" else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        if nested_init not in NESTED_INITS:
            raise ValueError(f"nested_init must be one of {NESTED_INITS}, got {nested_init!r}")
        self.nested_init = nested_init
        # lambda_s = sigmoid(a_s), one per pair of adjacent levels; starts at 1/2
        self.nested_logit = (
            nn.Parameter(torch.zeros(len(chunk_sizes) - 1))
            if variant == "nested" and nested_init == "learned" and len(chunk_sizes) > 1 else None
        )
        self.transfers = parse_transfer(transfer, len(chunk_sizes))
        if variant == "nested" and "generate" in self.transfers:
            raise ValueError("the nested variant already restarts every level from the slower one; use 'init'")
        self.transfer = LevelTransfer(self.transfers, self.form.sizes())

    @property
    def n_levels(self) -> int:
        return len(self.chunk_sizes)

    @property
    def segment_size(self) -> int:
        return self.chunk_sizes[0]

    def keeps_graph(self, level: int) -> bool:
        """Whether level ``level``'s inner gradients keep their graph (meta mode, or "backprop" transfer)."""
        return self.mode == "meta" or self.transfer.keeps_graph(level)

    def inner_lr(self) -> torch.Tensor:
        """eta_l of every level, shape (k,)."""
        return self.max_inner_lr * torch.sigmoid(self.lr_logit)

    def slow_weights(self, level: int) -> torch.Tensor:
        """Level ``level``'s slow weights, flat ``(n,)`` (graph-connected to the parameters)."""
        up, down = self.up[level], self.down[level]
        if self.form.name == "swiglu":
            return torch.cat([self.gate_proj[level].weight.reshape(-1), up.weight.reshape(-1), down.weight.reshape(-1)])
        return torch.cat([up.weight.reshape(-1), up.bias, down.weight.reshape(-1), down.bias])

    def unpack(self, w: torch.Tensor):
        """Flat fast weights ``(B, n)`` -> views: ``W_up (B, H, d), b_up (B, H), W_down (B, d, H), b_down (B, d)``
        (GELU form) or ``W_gate, W_up (B, H, d), W_down (B, d, H)`` (SwiGLU form)."""
        return self.form.unpack(w)

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> CMSState:
        """Fast weights = the slow weights (expanded views, graph-connected to them), zero accumulators."""
        weights = [
            self.slow_weights(lv).to(device=device, dtype=dtype).expand(batch, -1)
            for lv in range(self.n_levels)
        ]
        grads = [zero_accumulator(w) for w in weights]
        return CMSState(weights, grads, torch.zeros(batch, 0, self.dim, device=device, dtype=dtype), 0)

    # ------------------------------------------------------------------ read (Eq 70 / 74)
    def read(self, x: torch.Tensor, weights: list, fused: bool = False):
        """The CMS output with fast ``weights`` (constant over ``x``): ``x: (B, S, d)`` -> ``y: (B, S, d)`` in x's
        dtype, and per level its :class:`LevelCache` (input u, the branch's intermediate tensors ending with its
        output delta). The gradients of a loss w.r.t. ``cache.factors`` are the output-side factors of the level's
        weight gradient (:meth:`weight_grads`); :meth:`local_grads` computes them in closed form.

        ``fused=True`` (the chain of Eq 70: the sequential and nested variants; ignored for the independent one):
        the chain as one autograd node with a hand-written backward (``memory/cms_chain_read.py``); the cache is then
        one :class:`ChainRead` (the read's input and the sink its backward puts the levels' weight gradients in
        while asked to) instead of a list of level caches. Not for :meth:`local_grads`, which reads intermediates."""
        weights = self.transfer.read_weights(weights)
        u = x if x.dtype == weights[0].dtype else x.to(weights[0].dtype)
        if fused and self.variant != "independent":
            sink = ChainSink()
            y = chain_read(self.form, u, weights, sink)
            return (y if y.dtype == x.dtype else y.to(x.dtype)), ChainRead(u, sink)
        cache = []
        if self.variant == "independent":
            # (B, S, k), in the levels' dtype (the fast weights' fp32 also when the parameters are bf16)
            gate = torch.softmax(F.linear(u, self.gate.weight.to(u.dtype), self.gate.bias.to(u.dtype)), dim=-1)
            y = u
            for lv in range(self.n_levels):
                c = self.form.read(u, weights[lv])
                y = y + gate[..., lv : lv + 1] * c.delta
                cache.append(c)
        else:  # sequential and nested read the chain of Eq 70
            y = u
            for lv in range(self.n_levels):
                c = self.form.read(y, weights[lv])
                cache.append(c)
                y = y + c.delta
        return (y if y.dtype == x.dtype else y.to(x.dtype)), cache

    # ------------------------------------------------------------------ the local objective and the step (Eq 71)
    def weight_grads(self, cache: LevelCache, factor_grads) -> torch.Tensor:
        """A level's summed weight gradient, flat ``(B, n)``, from the loss's gradients at ``cache.factors``: every
        weight is a linear map applied token-wise, so e.g. dW_up = sum_t dpre_t u_t^T and dW_down = sum_t ddelta_t
        h_t^T (``memory/cms_levels.py`` for each form)."""
        return self.form.weight_grads(cache, factor_grads)

    def local_grads(
        self, cache: list, weights: list, differentiable: bool = False, transfer_graph: bool = True
    ) -> list[torch.Tensor]:
        """Closed-form gradient of the "next_input" objective 1/2 sum_t ||MLP_l(u_t) - u_{t+1}||^2 (pairs t, t+1 of
        the segment) w.r.t. each level's fast ``weights``, per batch element. Detached unless ``differentiable``
        (or, with ``transfer_graph``, for the levels whose transfer is "backprop")."""
        out, grad_on = [], torch.is_grad_enabled()
        for lv, (c, w) in enumerate(zip(cache, self.transfer.read_weights(weights))):
            keep = differentiable or (transfer_graph and self.transfer.keeps_graph(lv))
            with torch.set_grad_enabled(grad_on and keep):
                u, delta = c.u, c.delta
                # err: (B, S, d); the segment's last token has no target yet
                err = F.pad(u[:, :-1] + delta[:, :-1] - u[:, 1:], (0, 0, 0, 1))
                out.append(self.weight_grads(c, self.form.next_input_factor_grads(c, w, err)))
        return out

    def step(self, state: CMSState, grads: list | None, end: int) -> CMSState:
        """Accumulate one segment's ``grads`` (or none) and take Eq 71's step for every level whose chunk ends at
        stream position ``end``; the nested variant then restarts faster levels from slower ones."""
        lr = self.inner_lr()
        weights, accs = list(state.weights), list(state.grads)
        for lv, C in enumerate(self.chunk_sizes):
            if grads is not None:
                g = grads[lv].to(accs[lv].dtype)
                # a level whose chunk is one segment steps at every boundary, so its accumulator holds zero here
                accs[lv] = g if C == self.segment_size or is_zero_accumulator(accs[lv]) else accs[lv] + g
            if end % C == 0:
                acc = accs[lv]
                # theta <- theta - lr * step, step = acc / C (the chunk's mean gradient, per batch element), clipped
                # to at most grad_clip long (a trust region, see the module doc): every factor but acc is (B, 1),
                # so the update is one pass over the weights
                coef = lr[lv].to(acc.dtype) / C
                if self.grad_clip is not None:
                    norm = acc.norm(dim=1, keepdim=True) / C
                    coef = coef * (self.grad_clip / norm.clamp_min(self.grad_clip))
                weights[lv] = torch.addcmul(weights[lv], acc, coef, value=-1.0)
                accs[lv] = zero_accumulator(acc)
        if self.variant == "nested":
            # slowest first, so a boundary of the slowest level restarts the whole hierarchy from it
            for s in range(self.n_levels - 2, -1, -1):
                if end % self.chunk_sizes[s + 1] == 0:
                    weights[s], accs[s] = self._nested_restart(s, weights[s + 1]), zero_accumulator(accs[s])
        weights, accs = self.transfer.generate(weights, accs, self.slow_weights, end, self.chunk_sizes)
        return CMSState(weights, accs, state.pending, end)

    def _nested_restart(self, level: int, slower: torch.Tensor) -> torch.Tensor:
        """Level ``level``'s new initial state, meta-learned from the slower level's weights ``slower: (B, n)``."""
        if self.nested_init == "copy":
            return slower
        lam = torch.sigmoid(self.nested_logit[level]).to(slower.dtype)
        own, its = self.slow_weights(level).to(slower.dtype), self.slow_weights(level + 1).to(slower.dtype)
        return own + lam * (slower - its)

    # ------------------------------------------------------------------ standalone sequence layer
    def forward(self, x: torch.Tensor, state: CMSState | None = None) -> tuple[torch.Tensor, CMSState]:
        """``x: (B, T, d)`` -> ``(y: (B, T, d), state)``, the levels learning with the "next_input" objective."""
        check_layer_input(x, self.dim)
        B, T, _ = x.shape
        if state is None:
            state = self.initial_state(
                B, x.device, torch.float64 if x.dtype == torch.float64 else torch.float32
            )
        # segment after segment of small ops, forward and backward: on one thread when idle threads sleep
        span = BackwardOnOneThread(x)
        x = span.input(x)
        with one_thread_if_threads_sleep(x.device):
            y, snap, start, xs = self._segments(x, state)
        return span.output(y), dataclasses.replace(snap, pending=xs[:, start:])

    def _segments(self, x: torch.Tensor, state: CMSState):
        """The segment loop of :meth:`forward`: ``(y, state at the last boundary, its offset, the inputs run)``."""
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
        return y, snap, start, xs
