"""The tied LM head of a model that runs its stream segment by segment (``models/cms_lm.py``).

Each segment needs its logits at once (its next-token loss drives the CMS levels' inner step), but the head's WEIGHT
gradient of the outer loss is only needed at the end. :class:`SegmentedHead` therefore writes every segment's logits
into one buffer without graph, and :class:`TiedHead` attaches the head's graph to the whole buffer once per call: one
(V, T) x (T, d) GEMM for the weight gradient instead of one (V, d) gradient per segment. In meta mode (second order
through the inner steps) the logits must carry their graph, so every segment computes them the plain way and the
loss is summed per segment.

The softmax is computed once per position. Each segment's softmax goes into a time-major buffer ``(T, B, V)`` (a
segment is then one contiguous block, and ``probs @ W`` one plain GEMM); the inner gradient reads it, and in training
the backward of the outer loss reuses it instead of exponentiating the logits again. With ``onehot`` the label's
one-hot row, the head's gradients are written as ``softmax @ W - W[label]`` and ``softmax^T h - scatter(h)``, so the
(T, V) softmax is never modified for the labels. The cost is one extra (T, B, V) buffer while training.

The product ``softmax @ W`` is likewise taken once per position. The CMS levels' inner gradient needs it for every
segment (``dL/dh = softmax @ W - W[next token]``) and the outer backward needs it for every position (times the
loss's per-position scale), so while training with labels each segment writes it into a ``(T, B, d)`` buffer that
both read: one (T, V) x (V, d) GEMM per call instead of two, the second the size of the whole head.

Where the products go through oneDNN (``ops/fast_linear.py``), a call of at least ``PREPACK_MIN_SEGMENTS`` segments
reorders the head once for each of the two per-segment products (``fast_linear.prepack``) instead of once per
product: HOPE tiny's compiled training step 1.02-1.08x at T = 512 on an AMD EPYC, 1.04x at T = 256 and 0.998x at
T = 128 (8 segments), where the two reorders (for ``softmax @ W`` a transposing copy of the head first) cost as much
as they save.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nested_learning.ops.fast_linear import linear, prepack
from nested_learning.ops.threads import caller_threads


def nll_sum(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_t -log softmax(logits_t)[labels_t] over labels != -100; logits: (B, T, V), lse: (B, T)."""
    valid = labels != -100
    picked = logits.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return ((lse - picked) * valid).sum()


def softmax_into(p: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Write the softmax of ``logits: (..., V)`` into ``p`` (same shape; by default p holds the logits and is
    overwritten in place); returns the log-sum-exp ``(...)``."""
    src = p if logits is None else logits
    m = src.amax(-1, keepdim=True)
    torch.sub(src, m, out=p).exp_()
    s = p.sum(-1, keepdim=True)
    p.div_(s)
    return (m + s.log()).squeeze(-1)


class TiedHead(torch.autograd.Function):
    """``logits = h W^T`` and the summed NLL of ``labels``, both already computed with W held constant; the
    backward is the usual one: ``d = dlogits + dloss (softmax - onehot)``, ``dh = d W``, ``dW = d^T h``.
    h: (B, T, d), W: (V, d), logits: (B, T, V), lse: (B, T) log-sum-exp of the logits, labels: (B, T) or None,
    probs: None or the softmax, time-major (T, B, V) (this call's own buffer, released by the first backward; a
    second backward, with retain_graph, recomputes it from the logits). probs_W: None or ``probs @ W``, time-major
    (T, B, d), already computed for the inner gradients (used by the first backward only, like probs)."""

    @staticmethod
    def forward(ctx, h, W, logits, lse, labels, probs, probs_W=None):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, W, logits, lse, labels)
        ctx.probs, ctx.probs_W = probs, (probs_W if probs is not None else None)
        nll = nll_sum(logits, lse, labels) if labels is not None else logits.new_zeros(())
        return logits.view_as(logits), nll

    @staticmethod
    def backward(ctx, g_logits, g_nll):
        # products with the whole head: every thread, inside a backward that BackwardOnOneThread put on one
        with caller_threads():
            return TiedHead._backward(ctx, g_logits, g_nll)

    @staticmethod
    def _backward(ctx, g_logits, g_nll):
        h, W, logits, lse, labels = ctx.saved_tensors
        hd = h.detach().to(W.dtype)
        dh = dW = None
        want_h, want_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if g_nll is not None and labels is not None:
            (p, pW), ctx.probs, ctx.probs_W = (ctx.probs, ctx.probs_W), None, None
            if p is None:  # recompute the softmax (time-major, as the forward stores it)
                p = (logits - lse[..., None]).exp_().transpose(0, 1).contiguous()
            scale = ((labels != -100) * g_nll).to(W.dtype)  # (B, T): dloss / dlogits = scale * (softmax - onehot)
            T, B, V = p.shape
            rows = p.view(T * B, V)
            target = labels.clamp_min(0)
            h_scaled = hd * scale[..., None]  # the scale goes on the small factor of each product
            if want_h:
                if pW is None:
                    pW = linear(rows, W.t()).view(T, B, -1)
                dh = scale[..., None] * (pW.transpose(0, 1) - F.embedding(target, W))
            if want_W:
                # rows^T h_scaled as (h_scaled^T rows)^T: both operands read as stored (fast_linear)
                dW = linear(h_scaled.transpose(0, 1).reshape(T * B, -1).t(), rows.t()).t().contiguous()
                dW.index_add_(0, target.reshape(-1), h_scaled.reshape(B * T, -1), alpha=-1)
        if g_logits is not None:
            g = g_logits.to(W.dtype).contiguous()
            if want_h:
                gW = linear(g.flatten(0, -2), W.t()).view_as(hd)
                dh = gW if dh is None else dh + gW
            if want_W:
                extra = linear(hd.flatten(0, -2).t(), g.flatten(0, -2).t()).t()
                dW = extra.contiguous() if dW is None else dW + extra
        if dh is not None:
            dh = dh.to(h.dtype)
        return dh, dW, None, None, None, None, None


# the fewest segments a call runs for the head to be reordered for them (see the module docstring)
PREPACK_MIN_SEGMENTS = 16


class SegmentedHead:
    """Collects the logits of a call's segments; ``shape = (B, L)`` of the ids run (pending tokens included).

    ``direct``: logits without graph into one buffer (first-order training and no-grad use); ``keep_probs``: keep
    every position's softmax and its product with the head, ``softmax @ W``, for the outer backward (direct training
    with labels). Otherwise (meta) per-segment logits with graph and a per-segment log-softmax. ``segment``: the
    segment length; given, and with at least ``PREPACK_MIN_SEGMENTS`` of them in the call, the direct products take
    the head reordered once for them (see the module docstring)."""

    def __init__(self, shape, W: torch.Tensor, direct: bool, keep_probs: bool = False, segment: int | None = None):
        self.W, self.direct = W, direct
        B, L = shape
        V = W.shape[0]
        self.buffer = W.new_empty(B, L, V) if direct else None
        self.probs = W.new_empty(L, B, V) if direct and keep_probs else None
        self.probs_W = W.new_empty(L, B, W.shape[1]) if self.probs is not None else None
        self.scratch = None
        # rows of one segment's products, where the head is worth reordering for them; the reordered heads for
        # h W^T and for softmax @ W, made on first use (inside a segment, so that the reorder takes every thread)
        self._prepack_rows = B * segment if direct and segment and L >= PREPACK_MIN_SEGMENTS * segment else None
        self._packs: dict[bool, object] = {}
        self.h, self.lse, self.logits, self.logp = [], [], [], []

    def _pack(self, transposed: bool):
        """The head (``transposed``: its transpose, for ``softmax @ W``) reordered for this call's segments, or
        None where that does not pay or apply."""
        if self._prepack_rows is None:
            return None
        if transposed not in self._packs:
            W = self.W.detach()
            self._packs[transposed] = prepack(W.t() if transposed else W, self._prepack_rows)
        return self._packs[transposed]

    def softmax_W(self, p: torch.Tensor) -> torch.Tensor:
        """``p @ W`` for a direct-mode softmax block ``p: (S, B, V)`` (time-major), ``(S, B, d)``."""
        S, B, V = p.shape
        with torch.autocast(p.device.type, enabled=False):
            return linear(p.reshape(S * B, V), self.W.detach().t(), self._pack(True)).view(S, B, -1)

    def _probs_block(self, a: int, b: int) -> torch.Tensor:
        """Where the softmax of positions a..b-1 goes: (b-a, B, V), contiguous."""
        if self.probs is not None:
            return self.probs[a:b]
        B, S = self.buffer.shape[0], b - a
        if self.scratch is None or self.scratch.shape[0] < S:  # one segment's worth, reused
            self.scratch = self.buffer.new_empty(S, B, self.buffer.shape[-1])
        return self.scratch[:S]

    def segment(self, h: torch.Tensor, Wt: torch.Tensor, a: int, b: int, need_probs: bool):
        """Logits of positions a..b-1 from the final hidden state ``h: (B, b-a, d)``; returns the softmax of the
        first b-a-1 positions when ``need_probs`` (for the inner gradient), else None. In direct mode that softmax
        is TIME-MAJOR, ``(b-a-1, B, V)``; in meta mode it is ``(B, b-a-1, V)`` with graph. With ``keep_probs``,
        ``probs_W_block(a, b - 1)`` then holds those positions' ``softmax @ W``."""
        with caller_threads():  # products with the whole head: worth every thread inside a one-thread stretch
            return self._segment(h, Wt, a, b, need_probs)

    def _segment(self, h: torch.Tensor, Wt: torch.Tensor, a: int, b: int, need_probs: bool):
        if self.direct:
            logits = self.buffer[:, a:b]
            hd = h.detach().to(Wt.dtype)
            if need_probs or self.probs is not None:
                p = self._probs_block(a, b)
                S, B, V = p.shape
                with torch.autocast(h.device.type, enabled=False):  # the buffers have the head's dtype
                    # one 2-D product (oneDNN where it applies, ops/fast_linear.py), copied into the buffers
                    if B == 1:  # time-major and batch-major blocks coincide: one pass writes their softmax
                        z = linear(hd.reshape(S, -1), Wt.t(), self._pack(False))
                        logits.view(S, V).copy_(z)
                        lse = softmax_into(p, z.view(S, 1, V)).transpose(0, 1)
                    else:
                        p.view(S * B, V).copy_(linear(hd.transpose(0, 1).reshape(S * B, -1), Wt.t(), self._pack(False)))
                        logits.copy_(p.transpose(0, 1))
                        lse = softmax_into(p).transpose(0, 1)
                if self.probs_W is not None:
                    self.probs_W[a:b].copy_(self.softmax_W(p))
            else:
                with torch.autocast(h.device.type, enabled=False):
                    logits.copy_(linear(hd.reshape(-1, hd.shape[-1]), Wt.t(), self._pack(False)).view_as(logits))
                lse, p = torch.logsumexp(logits, dim=-1), None
            self.h.append(h)
            self.lse.append(lse)
            return p[:-1] if need_probs else None
        logits = h @ Wt
        logp = F.log_softmax(logits, dim=-1)
        self.logits.append(logits)
        self.logp.append(logp)
        return logp[:, :-1].exp() if need_probs else None

    def probs_W_block(self, a: int, b: int) -> torch.Tensor | None:
        """``softmax @ W`` of positions a..b-1, time-major ``(b-a, B, d)``, or None when it is not kept."""
        return None if self.probs_W is None else self.probs_W[a:b]

    def finish(self, P: int, labels: torch.Tensor | None):
        """``(logits of the new tokens (B, T, V), mean NLL of labels or None)``; the first P positions were pending."""
        n = None if labels is None else int((labels != -100).sum())
        if self.direct:
            logits = self.buffer[:, P:]
            lse = torch.cat(self.lse, dim=1)[:, P:] if self.lse else logits.new_zeros(logits.shape[:2])
            if torch.is_grad_enabled() and self.h:  # attach the head's graph once for the whole call
                probs = self.probs[P:] if self.probs is not None else None
                probs_W = self.probs_W[P:] if self.probs_W is not None else None
                logits, total = TiedHead.apply(
                    torch.cat(self.h, dim=1)[:, P:], self.W, logits, lse, labels, probs, probs_W
                )
            else:
                total = nll_sum(logits, lse, labels) if labels is not None else None
        else:
            logits = torch.cat(self.logits, dim=1)[:, P:]
            total = None
            if labels is not None:
                logp = torch.cat(self.logp, dim=1)[:, P:]
                total = F.nll_loss(
                    logp.reshape(-1, logp.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
                )
        if labels is None:
            return logits, None
        return logits, (total / n if n else logits.new_tensor(float("nan")))
