"""``mlp_chunk_step`` (one Eq 90 chunk of the Eq 89 MLP neural memory) with a hand-written backward: the same
outputs, one autograd node per chunk.

The backward is the chain rule of ``mlp_chunk_step`` written out once: the products that share an operand are
stacked into one batched matmul (the two end-state outer-product sums of each layer), intermediates of the forward
are kept instead of recomputed, and elementwise terms are fused where autograd gives each broadcast factor its own
pass. The product count is autograd's (twice the forward's); the forward also differs in one arrangement: the layer-2
read scales its inputs by the per-token gate factors, ``[F q, B q, q] @ [W; S; W*]``, instead of scaling three
(n, hidden) outputs. Forward and backward run their small ops on one thread when OpenMP's idle threads sleep
(``ops.threads``), which the autograd graph of ``mlp_chunk_step`` cannot do for its backward. Both are pure
functions of tensors (``forward_values``, ``backward_values``), so ``torch.compile`` can take each whole
(``compile=``), the backward still this module's.

Reference: ``mlp_chunk_step`` differentiated by autograd, which this equals (tests: fp64, the gradient of every input,
every activation, clipping on all, some and no tokens, retention toward the initial memory or zero). Under
``create_graph`` (second-order gradients through the step) the backward is autograd through the reference, so
higher derivatives stay exact.

Notation follows ``mlp_chunk_step``: z = k W2f, h = sigma(z), e = 2 (kv + h W1f), u = e W1f^T, d0 = sigma'(z) u,
the clipped factors d0c = s d0 and ec = s e, the reads r1 (layer 2 on q), a1 = sigma(r1), y = q + r2 (layer 1 on
a1), and the end state from the outer products of d0c and ec.
"""

from __future__ import annotations

import functools
import math

import torch

from ..ops.reference_vjp import reference_vjp
from ..ops.threads import one_thread_if_threads_sleep, run_side_by_side, side_by_side_parts
from .compiled_steps import call_compiled_or_eager, compiled_values
from .memories import _ACTIVATION_VJPS, _ACTIVATIONS
from .neural_memory_fused import mlp_chunk_step

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation_derivatives(activation: str, z: torch.Tensor, second: bool) -> torch.Tensor:
    """sigma'(z), or sigma''(z) with ``second``, of the memory's activation (gelu: the exact, erf form of
    ``F.gelu``)."""
    if activation == "gelu":
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        if second:
            return pdf * (2.0 - z * z)
        return torch.erf(z * (1.0 / math.sqrt(2.0))).add_(1.0).mul_(0.5).addcmul_(z, pdf)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s)) if second else s * (1 + z * (1 - s))
    if activation == "relu":
        return torch.zeros_like(z) if second else (z > 0).to(z.dtype)
    if activation == "tanh":
        t = torch.tanh(z)
        return -2 * t * (1 - t * t) if second else 1 - t * t
    raise ValueError(f"unknown activation {activation!r}")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per batch element <a, b> over the last two dims, shaped (N, 1, 1) like the gate scalars."""
    return (a * b).sum((-2, -1), keepdim=True)


def _split_batch(args, parts: int) -> list[list]:
    """Every tensor of ``args`` (leading dimension the batch of memories) in ``parts`` views along it; other
    arguments (the activation's name, the clip, None, a tuple of such) likewise, tuples element by element."""
    def split(t):
        if isinstance(t, torch.Tensor):
            return t.tensor_split(parts)
        if isinstance(t, tuple):
            return [tuple(p) for p in zip(*(split(u) for u in t))] if t else [()] * parts
        return [t] * parts

    return [list(p) for p in zip(*(split(t) for t in args))]


def _join_batch(results) -> tuple:
    return tuple(None if r[0] is None else torch.cat(r) for r in zip(*results))


def forward_values(W2t, W1t, S2t, S1t, W2st, W1st, k, kv, q, qk_coef, ck_T, coef, scales, c_last, f_last, b_last,
                   e_last, activation, grad_clip):
    """``mlp_chunk_step``'s outputs ``(y, W2n, W1n, S2n, S1n)`` and the intermediates ``backward_values`` reads; no
    autograd (a pure function of its arguments, so ``torch.compile`` can take it whole)."""
    sigma = _ACTIVATIONS[activation]
    initial = W2st is not None
    W2f, W1f = (W2t + W2st, W1t + W1st) if initial else (W2t, W1t)
    z = k @ W2f
    h = sigma(z)
    e = 2.0 * torch.baddbmm(kv, h, W1f)
    u = e @ W1f.mT
    d1 = activation_derivatives(activation, z, second=False)
    d0 = d1 * u
    if grad_clip is not None:
        sq = d0.square().sum(-1) * k.square().sum(-1) + e.square().sum(-1) * h.square().sum(-1)
        scale = (grad_clip * sq.clamp_min(grad_clip**2).rsqrt()).unsqueeze(-1)
        d0c, ec = d0 * scale, e * scale
    else:
        sq = scale = None
        d0c, ec = d0, e
    # read of layer 2 (dh -> hid): the per-token gate factors scale the inputs, [F q, B q, q] @ [W; S; W*]
    Fq, Bq = scales[..., :1] * q, scales[..., 1:] * q
    xq = torch.cat([Fq, Bq, q] if initial else [Fq, Bq], dim=-1)  # (N, n, R dh)
    side2 = torch.cat([W2t, S2t, W2st] if initial else [W2t, S2t], dim=-2)  # (N, R dh, hid)
    r1 = torch.baddbmm(xq @ side2, qk_coef, d0c, alpha=-1.0)
    a1 = sigma(r1)
    p2 = a1 @ h.mT
    dual2 = p2 * coef
    # read of layer 1 (hid -> dh): the factors scale the (narrower) outputs
    row = torch.cat([scales, torch.ones_like(scales[..., :1])], -1) if initial else scales
    row = row.unsqueeze(-1)  # (N, n, R, 1)
    side1 = torch.cat([W1t, S1t, W1st] if initial else [W1t, S1t], dim=-1)  # (N, hid, R dh)
    base2 = (a1 @ side1).unflatten(-1, (row.shape[-2], W1t.shape[-1]))
    y = q + torch.baddbmm((base2 * row).sum(-2), dual2, ec, alpha=-1.0)
    ck = ck_T.mT  # (N, 2, n, dh)
    dW2, dS2 = (ck_T @ d0c.unsqueeze(1)).unbind(1)
    X = c_last * ec.unsqueeze(1)  # (N, 2, n, dh)
    dW1, dS1 = (h.mT.unsqueeze(1) @ X).unbind(1)
    W2n = torch.addcmul(dW2.neg_(), f_last, W2t).addcmul_(b_last, S2t)
    W1n = torch.addcmul(dW1.neg_(), f_last, W1t).addcmul_(b_last, S1t)
    S2n = torch.addcmul(dS2.neg_(), e_last, S2t)
    S1n = torch.addcmul(dS1.neg_(), e_last, S1t)

    inner = (W2f, W1f, z, h, e, u, d1, d0, sq, scale, d0c, ec, row, xq, side2, side1, r1, a1, p2, dual2, base2, ck, X)
    return (y, W2n, W1n, S2n, S1n), inner


def backward_values(activation, grad_clip, inputs, inner, gy, gW2n, gW1n, gS2n, gS1n):
    """The gradients of the 17 tensor inputs of ``mlp_chunk_step`` (None for absent initial weights) from the
    outputs' gradients, ``inputs`` and ``forward_values``' intermediates; no autograd (compilable whole)."""
    (W2t, W1t, S2t, S1t, W2st, W1st, k, kv, q, qk_coef, ck_T, coef, scales, c_last, f_last, b_last,
     e_last) = inputs
    (W2f, W1f, z, h, e, u, d1, d0, sq, scale, d0c, ec, row, xq, side2, side1, r1, a1, p2, dual2, base2, ck,
     X) = inner
    initial = W2st is not None
    N, n, dh = q.shape

    # end state: W*n = f W*t + b S*t - dW*, S*n = e S*t - dS*
    gW2t, gW1t = f_last * gW2n, f_last * gW1n
    gS2t = b_last * gW2n + e_last * gS2n
    gS1t = b_last * gW1n + e_last * gS1n
    g_f_last = _dot(gW2n, W2t) + _dot(gW1n, W1t)
    g_b_last = _dot(gW2n, S2t) + _dot(gW1n, S1t)
    g_e_last = _dot(gS2n, S2t) + _dot(gS1n, S1t)
    # [dW2; dS2] = ck^T d0c and [dW1; dS1] = h^T X, with the upstream gradient -[gW*n; gS*n]
    G2 = torch.cat([gW2n, gS2n], dim=1)  # (N, 2 dh, hid)
    g_ck_T = (G2 @ d0c.mT).neg_().unflatten(1, (2, dh))
    g_d0c = -(ck.transpose(1, 2).reshape(N, n, 2 * dh) @ G2)
    G1 = torch.cat([gW1n, gS1n], dim=-1)  # (N, hid, 2 dh)
    g_h = -(X.transpose(1, 2).reshape(N, n, 2 * dh) @ G1.mT)
    g_X = (h @ G1).neg_().unflatten(-1, (2, dh)).transpose(1, 2)  # (N, 2, n, dh)
    g_c_last = (g_X * ec.unsqueeze(1)).sum(-1, keepdim=True)
    g_ec = (g_X * c_last).sum(1)

    # y = q + sum_j row_j (a1 side1)_j - dual2 ec
    g_q = gy.clone()
    G = (row * gy.unsqueeze(-2)).flatten(-2)  # (N, n, R dh)
    g_a1 = G @ side1.mT
    g_side1 = a1.mT @ G  # (N, hid, R dh)
    g_row = (base2 * gy.unsqueeze(-2)).sum(-1)
    g_dual2 = -(gy @ ec.mT)
    g_ec.baddbmm_(dual2.mT, gy, alpha=-1.0)
    g_p2 = g_dual2 * coef
    g_coef = g_dual2 * p2
    g_a1.baddbmm_(g_p2, h)
    g_h.baddbmm_(g_p2.mT, a1)

    # a1 = sigma(r1); r1 = [F q, B q, q] side2 - qk_coef d0c
    g_r1 = _ACTIVATION_VJPS[activation](g_a1, r1)
    g_xq = (g_r1 @ side2.mT).unflatten(-1, (-1, dh))  # (N, n, R, dh)
    g_side2 = xq.mT @ g_r1  # (N, R dh, hid)
    g_q += (g_xq * row).sum(-2)
    g_row += (g_xq * q.unsqueeze(-2)).sum(-1)
    g_qk_coef = -(g_r1 @ d0c.mT)
    g_d0c.baddbmm_(qk_coef.mT, g_r1, alpha=-1.0)

    # clipping: d0c = s d0, ec = s e, s = c / sqrt(max(sq, c^2)), sq = |d0|^2 |k|^2 + |e|^2 |h|^2
    g_k = None
    if grad_clip is not None:
        c2 = grad_clip**2
        g_s = (g_d0c * d0).sum(-1, keepdim=True) + (g_ec * e).sum(-1, keepdim=True)
        g_sq = g_s * (-0.5) * scale / sq.clamp_min(c2).unsqueeze(-1) * (sq >= c2).unsqueeze(-1).to(sq.dtype)
        g_sq2 = 2.0 * g_sq
        g_d0 = g_d0c * scale + d0 * (g_sq2 * k.square().sum(-1, keepdim=True))
        g_k = k * (g_sq2 * d0.square().sum(-1, keepdim=True))
        g_ee = g_ec * scale + e * (g_sq2 * h.square().sum(-1, keepdim=True))
        g_h.add_(h * (g_sq2 * e.square().sum(-1, keepdim=True)))
    else:
        g_d0, g_ee = g_d0c, g_ec

    # d0 = sigma'(z) u, u = e W1f^T, e = 2 (kv + h W1f), h = sigma(z), z = k W2f
    d2 = activation_derivatives(activation, z, second=True)
    g_u = d1 * g_d0
    g_z = d2 * u * g_d0
    g_ee = g_ee.baddbmm(g_u, W1f)
    g_kv = 2.0 * g_ee
    g_W1f = g_u.mT @ e
    g_W1f.baddbmm_(h.mT, g_kv)
    g_h.baddbmm_(g_kv, W1f.mT)
    g_z.addcmul_(d1, g_h)
    g_k = g_z @ W2f.mT if g_k is None else g_k.baddbmm_(g_z, W2f.mT)
    g_W2f = k.mT @ g_z

    # the side-by-side reads' weight gradients, and W*f = W*t + W*st
    gs2, gs1 = g_side2.unflatten(-2, (-1, dh)), g_side1.unflatten(-1, (-1, dh))
    gW2t = gW2t + gs2[:, 0] + g_W2f
    gS2t = gS2t + gs2[:, 1]
    gW1t = gW1t + gs1[..., 0, :] + g_W1f
    gS1t = gS1t + gs1[..., 1, :]
    gW2st = gW1st = None
    if initial:
        gW2st = gs2[:, 2] + g_W2f
        gW1st = gs1[..., 2, :] + g_W1f
    g_scales = g_row[..., :2]
    return (gW2t, gW1t, gS2t, gS1t, gW2st, gW1st, g_k, g_kv, g_q, g_qk_coef, g_ck_T, g_coef, g_scales,
            g_c_last, g_f_last, g_b_last, g_e_last)


class _MLPChunkStep(torch.autograd.Function):
    """``forward_values`` and ``backward_values`` as an autograd function, each eager or compiled (``compile``: a
    ``torch.compile`` backend, or None). The batch's memories are independent, so when idle threads sleep the step
    splits them across the caller's threads (``ops.threads.side_by_side_parts``), each part running forward and
    backward on a thread of its own: the same arithmetic per memory."""

    @staticmethod
    def forward(ctx, compile, *args):
        device = args[0].device
        ctx.compile, ctx.activation, ctx.grad_clip = compile, args[17], args[18]
        # a failure to compile propagates: the layer warns and runs eagerly
        fn = forward_values if compile is None else compiled_values(forward_values, compile)
        parts = side_by_side_parts(device, args[0].shape[0])
        if parts == 1:
            ctx.parts = None
            with one_thread_if_threads_sleep(device):
                outs, inner = fn(*args)
            ctx.save_for_backward(*args[:17], *inner)
            return outs
        results = run_side_by_side(fn, _split_batch(args, parts))
        ctx.parts = [inner for _, inner in results]  # each part's intermediates, for its own backward
        ctx.save_for_backward(*args[:17])  # the inputs, for a create_graph backward and autograd's version checks
        return _join_batch([outs for outs, _ in results])

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        inputs = saved[:17]
        if torch.is_grad_enabled():  # create_graph: autograd through the reference keeps higher derivatives exact
            return (None, *_reference_backward(inputs, grads, ctx.activation, ctx.grad_clip))
        what = "neural memory's chunk step's backward"
        if ctx.parts is None:
            with one_thread_if_threads_sleep(grads[0].device):
                g = call_compiled_or_eager(
                    backward_values, ctx.compile, what, ctx.activation, ctx.grad_clip, inputs, saved[17:], *grads
                )
            return (None, *g, None, None)
        pieces = _split_batch((inputs, *grads), len(ctx.parts))
        run = functools.partial(call_compiled_or_eager, backward_values, ctx.compile, what)
        parts = [(ctx.activation, ctx.grad_clip, p[0], inner, *p[1:]) for p, inner in zip(pieces, ctx.parts)]
        return (None, *_join_batch(run_side_by_side(run, parts)), None, None)


def _reference_backward(inputs, grads, activation, grad_clip):
    """The step's vector-Jacobian product by autograd through ``mlp_chunk_step`` (differentiable: create_graph)."""
    return (*reference_vjp(lambda *t: mlp_chunk_step(*t, activation, grad_clip), inputs, grads), None, None)


def mlp_chunk_step_hand_grad(*args, compile: str | None = None):
    """``mlp_chunk_step(*args)`` (same arguments, same outputs) with the hand-written backward of this module;
    without gradients to take it is ``mlp_chunk_step`` itself (on one thread when idle threads sleep, or the batch
    split across the caller's threads as ``_MLPChunkStep`` splits it), and so it is while ``torch.compile`` traces it
    (the compiler then derives the backward of the reference).

    ``compile``: a ``torch.compile`` backend (e.g. "inductor") for the forward's and the backward's arithmetic, each
    compiled as a function without autograd (the backward is this module's, fused by the compiler, and the batch
    still splits across threads), or None. A failure to compile the forward is raised (``NeuralMemory`` then warns
    and runs eagerly); one of the backward, which no caller could catch, warns and runs that backward eagerly from
    then on."""
    if torch.compiler.is_compiling():
        return mlp_chunk_step(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return _MLPChunkStep.apply(compile, *args)
    step = mlp_chunk_step if compile is None else compiled_values(mlp_chunk_step, compile)
    parts = side_by_side_parts(args[0].device, args[0].shape[0])
    if parts > 1:  # the batch's memories side by side, as in _MLPChunkStep
        return _join_batch(run_side_by_side(step, _split_batch(args, parts)))
    with one_thread_if_threads_sleep(args[0].device):
        return step(*args)
