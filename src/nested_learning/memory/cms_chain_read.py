"""The CMS chain read of Eq 70, ``y = MLP_k(... MLP_1(x))``, as one autograd node with a hand-written backward.

Autograd records about fifteen nodes per level for the chain (the batched products and their bias broadcasts, the
activation, the residual sum, and the split, view and transpose of the flat weights, whose backward concatenates the
pieces of every weight gradient into a new flat tensor). A CMS language model reads the chain once per segment and
layer, so these small nodes are a large share of its backward. Here the forward keeps each level's input and
activations and the backward is the chain rule written out once per level (``LevelForm.branch_backward``), writing
each level's weight gradient straight into one flat ``(B, n)`` tensor.

The flat weight gradients are also what a CMS language model's inner step needs: the gradient of a segment's
next-token loss w.r.t. the weights that segment was read with (``models/cms_lm.py``). Each read therefore carries a
:class:`ChainSink`; while the caller has its ``collect`` flag set, the node's backward puts its levels' weight
gradients there instead of passing them on, so one ``autograd.grad`` from the segment's output to the reads'
INPUTS gives every level's inner gradient through this segment's read alone, the state at the segment start held
fixed. (Asking ``autograd.grad`` for the weights themselves would do the same arithmetic, but a weight tensor made
segments ago sits early in the graph, and the engine then walks the whole graph of the call once per segment.) The
flag lives on the sink, not in a thread-local, because a GPU backward runs on autograd's device threads.

Reference: the chain of ``LevelForm.read`` differentiated by autograd (``ContinuumMemorySystem.read`` with
``fused=False``), which this equals (tests: fp64, both level forms, the gradient of the input and of every level's
weights, expanded and per-sequence weights). Under ``create_graph`` the backward is autograd through that reference,
so higher derivatives stay exact.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops.reference_vjp import reference_vjp
from .cms_levels import LevelForm


class ChainSink:
    """Where a chain read's backward puts its levels' flat weight gradients while ``collect`` is set."""

    def __init__(self):
        self.collect, self.grads = False, None

    def take(self) -> list:
        """The collected gradients, one ``(B, n)`` tensor per level (the sink lets go of them)."""
        grads, self.grads = self.grads, None
        if grads is None:
            raise RuntimeError("no weight gradients were collected: the read was not on the backward's path")
        return grads


class ChainRead(NamedTuple):
    """One CMS's fused read of a segment: its input (ask ``autograd.grad`` for it) and its sink."""

    u: torch.Tensor
    sink: ChainSink


def chain_read_reference(form: LevelForm, x: torch.Tensor, weights) -> torch.Tensor:
    """``y = MLP_k(... MLP_1(x))`` with autograd's bookkeeping (the reference of :func:`chain_read`)."""
    y = x
    for w in weights:
        y = y + form.read(y, w).delta
    return y


class _ChainRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, form, sink, x, *weights):
        ctx.set_materialize_grads(False)
        ctx.form, ctx.sink = form, sink
        inputs, saved, y = [], [], x
        for w in weights:
            delta, kept = form.branch(y, w)
            inputs.append(y)
            saved.extend(kept)
            y = y + delta
        ctx.n_levels, ctx.n_kept = len(weights), len(saved) // max(len(weights), 1)
        ctx.save_for_backward(*weights, *inputs, *saved)
        return y

    @staticmethod
    def backward(ctx, gy):
        k, m = ctx.n_levels, ctx.n_kept
        stored = ctx.saved_tensors
        weights, inputs, saved = stored[:k], stored[k : 2 * k], stored[2 * k :]
        collect = ctx.sink is not None and ctx.sink.collect
        if gy is None:
            if collect:
                ctx.sink.grads = [torch.zeros_like(w) for w in weights]
            return (None,) * (3 + k)
        if torch.is_grad_enabled() and not collect:  # create_graph: autograd through the reference
            grads = reference_vjp(
                lambda x, *w: (chain_read_reference(ctx.form, x, w),), (inputs[0], *weights), (gy,)
            )
            return (None, None, *grads)
        # Under autocast the forward's products ran in a lower precision (their activations were saved in it):
        # as autograd would for the reference, the backward's products run in that dtype too, and the gradients
        # go back to the weights' and the input's dtypes.
        compute = saved[0].dtype if saved else gy.dtype
        mixed = any(t.dtype != compute for t in (gy, *inputs, *saved))  # no casts (and no dispatches) otherwise
        g, wgrads = gy, [None] * k
        for lv in range(k - 1, -1, -1):  # y_{l+1} = y_l + delta_l(y_l)
            w = weights[lv]
            want = collect or ctx.needs_input_grad[3 + lv]
            gw = torch.empty(w.shape, dtype=compute, device=w.device) if want else None
            u, kept, g_lv = inputs[lv], saved[lv * m : (lv + 1) * m], g
            if mixed:
                u, g_lv, kept = u.to(compute), g.to(compute), [t.to(compute) for t in kept]
            g = g + ctx.form.branch_backward(u, kept, g_lv, gw)
            wgrads[lv] = gw if gw is None or gw.dtype == w.dtype else gw.to(w.dtype)
        if mixed:
            g = g.to(inputs[0].dtype)
        if collect:  # the inner step's gradients: kept here, not passed on to the weights' history
            ctx.sink.grads, wgrads = wgrads, [None] * k
        return (None, None, g if ctx.needs_input_grad[2] else None, *wgrads)


def chain_read(form: LevelForm, x: torch.Tensor, weights, sink: ChainSink | None = None) -> torch.Tensor:
    """``y = MLP_k(... MLP_1(x))`` for ``x: (B, S, d)`` and flat per-sequence weights ``(B, n)`` of each level, as
    one autograd node (see the module doc), whose backward fills ``sink`` while its ``collect`` is set; without
    gradients to take, the same arithmetic without the node."""
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return _ChainRead.apply(form, sink, x, *weights)
    y = x
    for w in weights:
        y = y + form.branch(y, w, keep=False)[0]
    return y
