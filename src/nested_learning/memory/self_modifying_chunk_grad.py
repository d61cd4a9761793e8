"""``fused_chunk_step`` (self-modifying Titans' Eq 90 chunk of the Eq 89 MLP memories) with a hand-written backward.

Autograd's backward of one 16-token chunk of HOPE tiny ran ~3.5x its forward: hundreds of small ops (the three
delta rules' decay and gate terms, the broadcast boxes, normalisations and gates each get their own backward nodes).
Here the forward keeps its intermediates and the backward is the chain rule written out once, with the three delta
rules' backward from ``ops.delta_rule_one_chunk_grad``; both run their small ops on one thread when OpenMP's idle
threads sleep (``ops.threads``).

Reference: ``fused_chunk_step`` differentiated by autograd, which this equals (tests: fp64, the gradient of every
input, both objectives, with and without value normalisation and retention toward the initial memories, chunk-start
state equal to or distinct from the running state). Under ``create_graph`` the backward is autograd through the
reference, so higher derivatives stay exact.

Notation follows ``fused_chunk_step``: memories at the chunk start R_c = (R2c, R1c, RGc) evaluated on x (zx, hx, px,
gx), the keys and values k, v and gates eta, alpha, the five memories on u = [v; k] (z, h, main, gate), the errors
e_main, e_gate, the W2 layers' output gradient delta2, and the three DGD steps (W2 layers, W1 main layers, W1 gate
layers) on the running state R.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

from ..ops.delta_rule_one_chunk_grad import one_chunk_backward, one_chunk_forward
from ..ops.reference_vjp import reference_vjp
from ..ops.threads import one_thread_if_threads_sleep
from .compiled_steps import call_compiled_or_eager, compiled_values
from .neural_memory_chunk_grad import activation_derivatives
from .self_modifying_memories import bound_targets, fused_chunk_step

_EPS = 1e-12  # F.normalize's
_INPUTS_ONLY = threading.local()  # .on: set by inputs_only_gradients (absent in a thread that never entered it)


@contextlib.contextmanager
def inputs_only_gradients():
    """Within it, the step's hand-written backward gives gradients for the chunk's inputs x and q only, None for the
    memories (chunk-start, running, initial) and the gate biases, and skips their products.

    For a backward pass that cannot reach any memory state it passes through: a CMS language model's inner gradient,
    ``autograd.grad`` from a segment's logits to that segment's CMS activations, runs back through the later layers'
    Titans chunk steps, whose memory states were all made by earlier segments. The outer backward, which needs them,
    runs outside it. Thread-local: autograd runs a CPU backward on the calling thread, where it applies; a GPU
    backward runs on autograd's device threads, which keep computing every gradient (the same result, no saving). No
    effect on the reference (create_graph) backward."""
    before = _inputs_only()
    _INPUTS_ONLY.on = True
    try:
        yield
    finally:
        _INPUTS_ONLY.on = before


def _inputs_only() -> bool:
    return getattr(_INPUTS_ONLY, "on", False)


def _normalize_backward(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient of y = x / max(||x||, eps) along the last dimension."""
    norm = x.norm(dim=-1, keepdim=True)
    on = (norm >= _EPS).to(x.dtype)
    return (g - on * y * (y * g).sum(-1, keepdim=True)) / norm.clamp_min(_EPS)


def _gelu_backward(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(g, z)


def _forward_values(objective, value_norm, bounded_targets, initial, *tensors):
    """The step's outputs ``(y, R2n, R1n, RGn)``, the intermediates the backward reads, and the three delta rules'
    saved values; no autograd (a pure function of its arguments, so ``torch.compile`` can take it whole)."""
    R2c, R1c, RGc, R2, R1, RG, x, q = tensors[:8]
    R2_0, R1_0, RG_0 = tensors[8:11] if initial else (None, None, None)
    gate_bias = tensors[-1]
    n = x.shape[1]
    zx = x @ R2c
    hx = F.gelu(zx)
    px = x + hx[:3] @ R1c
    gx = (hx[3:] @ RGc).squeeze(-1)
    k = F.normalize(px[0], dim=-1)
    v = F.normalize(px[1], dim=-1) if value_norm else px[1]
    eta = torch.sigmoid(gx[0] + gate_bias[:, :1])
    alpha = torch.sigmoid(gx[1] + gate_bias[:, 1:])
    u = torch.cat([v, k], dim=1)
    z = u @ R2c
    h = F.gelu(z)
    main = u + h[:3] @ R1c
    gate = (h[3:] @ RGc).squeeze(-1)
    zk, hk = z[:, :, n:], h[:, :, n:]
    main_v, gate_v = main[:, :, :n], gate[:, :, :n]
    v_main, v_gate = bound_targets(main_v, gate_v) if bounded_targets else (main_v, gate_v)
    if objective == "l2":
        e_main, e_gate = main[:, :, n:] - v_main, gate[:, :, n:] - v_gate
    else:
        e_main, e_gate = -v_main, -v_gate
    back = torch.cat([e_main @ R1c.mT, e_gate.unsqueeze(-1) @ RGc.mT])
    delta2 = _gelu_backward(back, zk)
    err_main, err_gate = e_main, e_gate.unsqueeze(-1)
    if initial:
        R2, R1, RG = R2 - R2_0, R1 - R1_0, RG - RG_0
        delta2 = delta2 + k @ R2_0
        err_main, err_gate = err_main + hk[:3] @ R1_0, err_gate + hk[3:] @ RG_0
    o2, R2n, s2 = one_chunk_forward(k, -delta2, eta, alpha, R2, q, read_from=2)
    if initial:
        o2 = o2 + q @ R2_0[2]
    hq = F.gelu(o2)
    hk_sq = hk.square().sum(-1)
    step = eta / (1 + eta * hk_sq)
    o1, R1n, s1 = one_chunk_forward(hk[:3], -err_main, step[:3], alpha, R1, hq, read_from=2)
    _, RGn, sG = one_chunk_forward(hk[3:], -err_gate, step[3:], alpha, RG)
    if initial:
        o1 = o1 + hq @ R1_0[2]
        R2n, R1n, RGn = R2n + R2_0, R1n + R1_0, RGn + RG_0
    y = q + o1
    inner = (
        zx, hx, px, k, v, eta, alpha, u, z, h, e_main, e_gate, back, delta2, o2, hq, hk_sq, step, main_v, v_main, v_gate
    )
    return (y, R2n, R1n, RGn), inner, (s2, s1, sG)


def _backward_values(objective, value_norm, bounded_targets, initial, states, tensors, inner, steps,
                     gy, gR2n, gR1n, gRGn):
    """The gradients of the step's tensor arguments from ``_forward_values``' intermediates and the outputs'
    gradients (None: zero); with ``states=False`` those of x and q only (see ``inputs_only_gradients``). No autograd,
    a pure function like the forward's."""
    m = len(tensors)
    R2c, R1c, RGc, R2, R1, RG, x, q = tensors[:8]
    gy = torch.zeros_like(q) if gy is None else gy
    R2_0, R1_0, RG_0 = tensors[8:11] if initial else (None, None, None)
    (zx, hx, px, k, v, eta, alpha, u, z, h, e_main, e_gate, back, delta2, o2, hq, hk_sq, step, main_v, v_main,
     v_gate) = inner
    s2, s1, sG = steps
    n = x.shape[1]
    hk = h[:, :, n:]

    g_q = gy
    g_o1 = gy
    g_R2_0 = g_R1_0 = g_RG_0 = None
    if initial and states:  # R*n = R*n' + R*_0, o1 = o1' + hq R1_0[2]
        g_R2_0, g_R1_0, g_RG_0 = (g.clone() if g is not None else torch.zeros_like(r)
                                  for g, r in ((gR2n, R2_0), (gR1n, R1_0), (gRGn, RG_0)))
        g_R1_0[2] += hq.mT @ g_o1
    g_hq = g_o1 @ R1_0[2].mT if initial else torch.zeros_like(hq)

    # the W1 gate layers and the W1 main layers (DGD with the Sherman-Morrison step, read by hq)
    gk_G, gv_G, gstep_G, galpha, gR_G, _ = one_chunk_backward(sG, gRGn, None, want_R0=states)
    gk_1, gv_1, gstep_1, galpha_1, gR_1, gq_1 = one_chunk_backward(s1, gR1n, g_o1, want_R0=states)
    g_hk = torch.cat([gk_1, gk_G])
    g_err_main, g_err_gate = -gv_1, -gv_G
    g_step = torch.cat([gstep_1, gstep_G])
    galpha = galpha + galpha_1
    g_hq = g_hq + gq_1
    # step = eta / (1 + eta |hk|^2)
    denom2 = (1 + eta * hk_sq).square()
    g_eta = (g_step / denom2).sum(0)
    g_hk = g_hk - (2 * g_step * eta.square() / denom2).unsqueeze(-1) * hk
    # hq = gelu(o2), o2 = o2' + q R2_0[2]
    g_o2 = _gelu_backward(g_hq, o2)
    if initial:
        g_q = g_q + g_o2 @ R2_0[2].mT
        if states:
            g_R2_0[2] += q.mT @ g_o2
    # the W2 layers (DGD with the unit key k, read by q)
    gk_2, gv_2, geta_2, galpha_2, gR_2, gq_2 = one_chunk_backward(s2, gR2n, g_o2, want_R0=states)
    g_k = gk_2
    g_delta2 = -gv_2
    g_eta = g_eta + geta_2
    galpha = galpha + galpha_2
    g_q = g_q + gq_2
    g_R2, g_R1, g_RG = gR_2, gR_1, gR_G
    if initial:  # R* - R*_0, delta2 + k R2_0, err + hk R*_0
        g_k = g_k + (g_delta2 @ R2_0.mT).sum(0)
        g_hk = g_hk + torch.cat([g_err_main @ R1_0.mT, g_err_gate @ RG_0.mT])
        if states:
            g_R2_0 -= g_R2
            g_R1_0 -= g_R1
            g_RG_0 -= g_RG
            g_R2_0 += k.mT @ g_delta2
            g_R1_0 += hk[:3].mT @ g_err_main
            g_RG_0 += hk[3:].mT @ g_err_gate
    g_e_main, g_e_gate = g_err_main, g_err_gate.squeeze(-1)

    # delta2 = gelu'(zk) back, back = [e_main R1c^T; e_gate RGc^T]
    zk = z[:, :, n:]
    d1 = activation_derivatives("gelu", zk, second=False)
    g_back = d1 * g_delta2
    g_zk = activation_derivatives("gelu", zk, second=True) * back * g_delta2
    g_e_main = g_e_main + g_back[:3] @ R1c
    g_e_gate = g_e_gate + (g_back[3:] @ RGc).squeeze(-1)

    # errors from the five memories on u = [v; k]
    g_main = u.new_zeros(3, *u.shape)
    g_gate = u.new_zeros(2, *u.shape[:-1])
    if objective == "l2":
        g_main[:, :, n:], g_gate[:, :, n:] = g_e_main, g_e_gate
    g_main[:, :, :n], g_gate[:, :, :n] = -g_e_main, -g_e_gate  # the targets' share
    if bounded_targets:  # v_hat = normalize(main_v), tanh(gate_v)
        g_main[:, :, :n] = _normalize_backward(main_v, v_main, g_main[:, :, :n])
        g_gate[:, :, :n] *= 1 - v_gate.square()
    # main = u + h[:3] R1c, gate = h[3:] RGc, h = gelu(z), z = u R2c
    g_h = torch.cat([g_main @ R1c.mT, g_gate.unsqueeze(-1) @ RGc.mT])
    g_h[:, :, n:] += g_hk
    g_z = _gelu_backward(g_h, z)
    g_z[:, :, n:] += g_zk
    g_u = g_main.sum(0) + (g_z @ R2c.mT).sum(0)
    g_v, g_k = g_u[:, :n], g_k + g_u[:, n:]

    # eta = sigmoid(gx0 + b0), alpha = sigmoid(gx1 + b1); k = normalize(px0), v = normalize(px1) or px1
    g_gx = torch.stack([g_eta * eta * (1 - eta), galpha * alpha * (1 - alpha)])
    g_px = torch.stack([
        _normalize_backward(px[0], k, g_k),
        _normalize_backward(px[1], v, g_v) if value_norm else g_v,
    ])
    # px = x + hx[:3] R1c (the memory box's output on x is unused), gx = hx[3:] RGc, hx = gelu(zx), zx = x R2c
    g_hx = torch.cat([g_px @ R1c[:2].mT, torch.zeros_like(hx[2:3]), g_gx.unsqueeze(-1) @ RGc.mT])
    g_zx = _gelu_backward(g_hx, zx)
    g_x = g_px.sum(0) + (g_zx @ R2c.mT).sum(0)
    if not states:
        return (*[None] * 6, g_x, g_q, *[None] * (m - 8))

    # the chunk-start memories R_c: every product above that read them
    g_R1c = g_back[:3].mT @ e_main + h[:3].mT @ g_main
    g_R1c[:2] += hx[:2].mT @ g_px
    g_RGc = g_back[3:].mT @ e_gate.unsqueeze(-1) + h[3:].mT @ g_gate.unsqueeze(-1) + hx[3:].mT @ g_gx.unsqueeze(-1)
    g_R2c = u.mT @ g_z + x.mT @ g_zx
    g_gate_bias = g_gx.sum(-1).mT  # (M, 2)
    out = [g_R2c, g_R1c, g_RGc, g_R2, g_R1, g_RG, g_x, g_q]
    if initial:
        out += [g_R2_0, g_R1_0, g_RG_0]
    return (*out, g_gate_bias)


class _FusedChunkStep(torch.autograd.Function):
    """``_forward_values`` and ``_backward_values`` as an autograd function, each eager or compiled (``compile``:
    a ``torch.compile`` backend, or None), on one thread when idle threads sleep."""

    @staticmethod
    def forward(ctx, compile, objective, value_norm, bounded_targets, initial, *tensors):
        ctx.set_materialize_grads(False)  # an output off the backward's path (a new state) gets no zeros to multiply
        ctx.device, ctx.compile = tensors[0].device, compile
        ctx.flags = (objective, value_norm, bounded_targets, initial)
        # a failure to compile propagates: the layer warns and runs eagerly
        fn = _forward_values if compile is None else compiled_values(_forward_values, compile)
        with one_thread_if_threads_sleep(ctx.device):  # steps: the delta rules' values (no graph)
            outputs, inner, ctx.steps = fn(*ctx.flags, *tensors)
        ctx.n_tensors = len(tensors)
        ctx.save_for_backward(*tensors, *inner)
        return outputs

    @staticmethod
    def backward(ctx, gy, gR2n, gR1n, gRGn):
        saved = ctx.saved_tensors
        tensors, inner = saved[: ctx.n_tensors], saved[ctx.n_tensors:]
        if torch.is_grad_enabled():  # create_graph: autograd through the reference keeps higher derivatives exact
            shapes = (tensors[7], *tensors[3:6])  # q and the running states: the shapes of y and the new states
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip((gy, gR2n, gR1n, gRGn), shapes)]
            return _reference_backward(ctx, tensors, tuple(grads))
        states = not _inputs_only()  # else only x's and q's gradients (see inputs_only_gradients)
        with one_thread_if_threads_sleep(ctx.device):
            grads = call_compiled_or_eager(
                _backward_values, ctx.compile, "self-modifying Titans chunk step's backward",
                *ctx.flags, states, tensors, inner, ctx.steps, gy, gR2n, gR1n, gRGn,
            )
        return (None, None, None, None, None, *grads)


def _pack(tensors, objective, value_norm, bounded_targets, initial):
    R_c, R, x, q = tuple(tensors[:3]), tuple(tensors[3:6]), tensors[6], tensors[7]
    R_0 = tuple(tensors[8:11]) if initial else None
    return fused_chunk_step(R_c, R, x, q, R_0, tensors[-1], objective, value_norm, bounded_targets)


def _reference_backward(ctx, tensors, grads):
    """The step's vector-Jacobian product by autograd through ``fused_chunk_step`` (differentiable)."""
    def reference(*t):
        y, R_new = _pack(t, *ctx.flags)
        return (y, *R_new)

    return (None, None, None, None, None, *reference_vjp(reference, tensors, grads))


def fused_chunk_step_hand_grad(R_c, R, x, q, R_0, gate_bias, objective: str, value_norm: bool,
                               bounded_targets: bool = False, compile: str | None = None):
    """``fused_chunk_step`` (same arguments, same outputs) with the hand-written backward of this module; without
    gradients to take it is ``fused_chunk_step`` itself (on one thread when idle threads sleep), and so it is while
    ``torch.compile`` traces it (the compiler then derives the backward of the reference).

    ``compile``: a ``torch.compile`` backend (e.g. "inductor") for the forward's and the backward's arithmetic, each
    compiled as a function without autograd (so the backward is this module's, fused by the compiler), or None. A
    failure to compile the forward is raised (``SelfModifyingTitans`` then warns and runs eagerly); one of the
    backward, which no caller could catch, warns and runs that backward eagerly from then on."""
    args = (objective, value_norm, bounded_targets)
    if torch.compiler.is_compiling():
        return fused_chunk_step(R_c, R, x, q, R_0, gate_bias, *args)
    initial = R_0 is not None
    tensors = (*R_c, *R, x, q, *(R_0 if initial else ()), gate_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        y, R2, R1, RG = _FusedChunkStep.apply(compile, *args, initial, *tensors)
        return y, (R2, R1, RG)
    step = fused_chunk_step if compile is None else compiled_values(fused_chunk_step, compile)
    with one_thread_if_threads_sleep(x.device):
        return step(R_c, R, x, q, R_0, gate_bias, *args)
