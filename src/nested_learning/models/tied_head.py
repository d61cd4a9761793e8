"""The tied LM head of a model that runs its stream segment by segment (``models/cms_lm.py``).

Each segment needs its logits at once (its next-token loss drives the CMS levels' inner step), but the head's WEIGHT
gradient of the outer loss is only needed at the end. :class:`SegmentedHead` therefore writes every segment's logits
into one buffer without graph, with a per-row log-sum-exp instead of a materialised log-softmax, and
:class:`TiedHead` attaches the head's graph to the whole buffer once per call: one (V, T) x (T, d) GEMM for the
weight gradient instead of one (V, d) gradient per segment. In meta mode (second order through the inner steps) the
logits must carry their graph, so every segment computes them the plain way and the loss is summed per segment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nll_sum(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_t -log softmax(logits_t)[labels_t] over labels != -100; logits: (B, T, V), lse: (B, T)."""
    valid = labels != -100
    picked = logits.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    return ((lse - picked) * valid).sum()


class TiedHead(torch.autograd.Function):
    """``logits = h W^T`` and the summed NLL of ``labels``, both already computed with W held constant; the
    backward is the usual one: ``d = dlogits + dloss (softmax - onehot)``, ``dh = d W``, ``dW = d^T h``.
    h: (B, T, d), W: (V, d), logits: (B, T, V), lse: (B, T) log-sum-exp of the logits, labels: (B, T) or None."""

    @staticmethod
    def forward(ctx, h, W, logits, lse, labels):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, W, logits, lse, labels)
        nll = nll_sum(logits, lse, labels) if labels is not None else logits.new_zeros(())
        return logits.view_as(logits), nll

    @staticmethod
    def backward(ctx, g_logits, g_nll):
        h, W, logits, lse, labels = ctx.saved_tensors
        d = g_logits
        if g_nll is not None and labels is not None:
            p = (logits - lse[..., None]).exp_()
            p.scatter_add_(-1, labels.clamp_min(0)[..., None], torch.full_like(p[..., :1], -1.0))
            p.mul_(((labels != -100) * g_nll)[..., None])
            d = p if d is None else d + p
        if d is None:
            return None, None, None, None, None
        d = d.to(W.dtype)
        dh = d @ W if ctx.needs_input_grad[0] else None
        dW = d.flatten(0, -2).T @ h.flatten(0, -2) if ctx.needs_input_grad[1] else None
        return dh, dW, None, None, None


class SegmentedHead:
    """Collects the logits of a call's segments; ``shape = (B, L)`` of the ids run (pending tokens included).

    ``direct``: logits without graph into one buffer, softmax via a per-row log-sum-exp (first-order training and
    no-grad use); otherwise (meta) per-segment logits with graph and a per-segment log-softmax."""

    def __init__(self, shape, W: torch.Tensor, direct: bool):
        self.W, self.direct = W, direct
        B, L = shape
        self.buffer = W.new_empty(B, L, W.shape[0]) if direct else None
        self.h, self.lse, self.logits, self.logp = [], [], [], []

    def segment(self, h: torch.Tensor, Wt: torch.Tensor, a: int, b: int, need_probs: bool):
        """Logits of positions a..b-1 from the final hidden state ``h: (B, b-a, d)``; returns the softmax of the
        first b-a-1 positions when ``need_probs`` (for the inner gradient), else None."""
        if self.direct:
            logits = self.buffer[:, a:b]
            hd = h.detach().to(Wt.dtype)
            with torch.autocast(h.device.type, enabled=False):  # the buffer has the head's dtype
                if logits.is_contiguous():
                    torch.matmul(hd, Wt, out=logits)
                else:
                    logits.copy_(hd @ Wt)
            lse = torch.logsumexp(logits, dim=-1)
            self.h.append(h)
            self.lse.append(lse)
            return (logits[:, :-1] - lse[:, :-1, None]).exp_() if need_probs else None
        logits = h @ Wt
        logp = F.log_softmax(logits, dim=-1)
        self.logits.append(logits)
        self.logp.append(logp)
        return logp[:, :-1].exp() if need_probs else None

    def finish(self, P: int, labels: torch.Tensor | None):
        """``(logits of the new tokens (B, T, V), mean NLL of labels or None)``; the first P positions were pending."""
        n = None if labels is None else int((labels != -100).sum())
        if self.direct:
            logits = self.buffer[:, P:]
            lse = torch.cat(self.lse, dim=1)[:, P:] if self.lse else logits.new_zeros(logits.shape[:2])
            if torch.is_grad_enabled() and self.h:  # attach the head's graph once for the whole call
                logits, total = TiedHead.apply(torch.cat(self.h, dim=1)[:, P:], self.W, logits, lse, labels)
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
