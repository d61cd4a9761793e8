"""A run of consecutive Eq 90 chunks of the MLP neural memory as one autograd node, its batch of memories split across
the caller's threads once for the whole run.

``_MLPChunkStep`` (``neural_memory_chunk_grad.py``) splits the batch of memories (batch x heads) across the threads
under passive OpenMP waiting, but per chunk: every chunk hands its parts to the threads and joins their outputs and
gradients again (about twenty concatenations and two hand-overs a chunk, forward and backward), although each
memory's chunks depend only on that memory's earlier chunks. Here each part runs all the chunks of a call, forward
(``forward_values`` chunk after chunk, its intermediates kept) and backward (``backward_values`` from the last chunk
to the first, the state gradients carried between them), on a thread of its own: one split and one join per call.
The arithmetic per chunk is ``_MLPChunkStep``'s, so the results equal the chunk-by-chunk node's to rounding (tests).
Under ``create_graph`` the backward is autograd through a loop of the reference ``mlp_chunk_step``.
"""

from __future__ import annotations

import torch

from ..ops.reference_vjp import reference_vjp
from ..ops.threads import run_side_by_side
from .compiled_steps import call_compiled_or_eager, compiled_values
from .neural_memory_chunk_grad import backward_values, forward_values
from .neural_memory_fused import mlp_chunk_step

N_PER_CHUNK = 11  # k, kv, q, qk_coef, ck_T, coef, scales, c_last, f_last, b_last, e_last: (n_chunks, N, ...) each


def chunk_loop_reference(activation, grad_clip, W2t, W1t, S2t, S1t, W2st, W1st, *per_chunk):
    """``mlp_chunk_step`` chunk after chunk: the reads of every chunk (n_chunks, N, C, dh) and the final state."""
    ys = []
    for args in zip(*(t.unbind(0) for t in per_chunk)):
        y, W2t, W1t, S2t, S1t = mlp_chunk_step(W2t, W1t, S2t, S1t, W2st, W1st, *args, activation, grad_clip)
        ys.append(y)
    return torch.stack(ys), W2t, W1t, S2t, S1t


def _split(inputs, parts: int) -> list[list]:
    """The six state tensors (batch on dim 0, None kept) and the per-chunk ones (batch on dim 1) in ``parts``."""
    def pieces(t, dim):
        return [None] * parts if t is None else list(t.tensor_split(parts, dim=dim))

    split = [pieces(t, 0) for t in inputs[:6]] + [pieces(t, 1) for t in inputs[6:]]
    return [list(p) for p in zip(*split)]


def _part_forward(fn, activation, grad_clip, *inputs):
    W2t, W1t, S2t, S1t, W2st, W1st = inputs[:6]
    ys, kept = [], []
    for args in zip(*(t.unbind(0) for t in inputs[6:])):
        step_inputs = (W2t, W1t, S2t, S1t, W2st, W1st, *args)
        (y, W2t, W1t, S2t, S1t), inner = fn(*step_inputs, activation, grad_clip)
        ys.append(y)
        kept.append((step_inputs, inner))
    return (torch.stack(ys), W2t, W1t, S2t, S1t), kept


def _part_backward(backend, activation, grad_clip, kept, gy, gW2, gW1, gS2, gS1):
    g_state, g_star, per_chunk = (gW2, gW1, gS2, gS1), [None, None], []
    for (step_inputs, inner), gy_c in zip(reversed(kept), reversed(gy.unbind(0))):
        g = call_compiled_or_eager(
            backward_values, backend, "neural memory's chunk step's backward", activation, grad_clip,
            step_inputs, inner, gy_c, *g_state,
        )
        g_state = g[:4]
        g_star = [a if b is None else (b if a is None else a + b) for a, b in zip(g_star, g[4:6])]
        per_chunk.append(g[6:])
    stacked = [torch.stack(gs[::-1]) for gs in zip(*per_chunk)]
    return (*g_state, *g_star, *stacked)


class _MLPChunkLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, compile, parts, activation, grad_clip, *inputs):
        ctx.compile, ctx.activation, ctx.grad_clip = compile, activation, grad_clip
        fn = forward_values if compile is None else compiled_values(forward_values, compile)
        results = run_side_by_side(
            lambda *part: _part_forward(fn, activation, grad_clip, *part), _split(inputs, parts)
        )
        ctx.kept = [kept for _, kept in results]  # each part's per-chunk inputs and intermediates
        ctx.save_for_backward(*inputs)  # for a create_graph backward and autograd's version checks
        outs = [o for o, _ in results]
        ys = torch.cat([o[0] for o in outs], dim=1)
        return (ys, *(torch.cat([o[i] for o in outs]) for i in range(1, 5)))

    @staticmethod
    def backward(ctx, gy, gW2, gW1, gS2, gS1):
        inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: autograd through the reference keeps higher derivatives exact
            def reference(*x):
                return chunk_loop_reference(ctx.activation, ctx.grad_clip, *x)

            return (None, None, None, None, *reference_vjp(reference, inputs, (gy, gW2, gW1, gS2, gS1)))
        parts = len(ctx.kept)
        grads = [list(gy.tensor_split(parts, dim=1))] + [list(g.tensor_split(parts)) for g in (gW2, gW1, gS2, gS1)]
        results = run_side_by_side(
            lambda kept, *g: _part_backward(ctx.compile, ctx.activation, ctx.grad_clip, kept, *g),
            [(kept, *g) for kept, g in zip(ctx.kept, zip(*grads))],
        )
        joined = []
        for i, per_part in enumerate(zip(*results)):
            if per_part[0] is None or not ctx.needs_input_grad[4 + i]:
                joined.append(None)
            else:
                joined.append(torch.cat(per_part, dim=0 if i < 6 else 1))
        return (None, None, None, None, *joined)


def mlp_chunk_loop(parts: int, activation: str, grad_clip, *inputs, compile: str | None = None):
    """``chunk_loop_reference(activation, grad_clip, *inputs)`` (the same outputs) as one autograd node whose
    forward and backward run the batch of memories in ``parts`` on threads of their own, each part all the chunks;
    ``inputs``: W2t, W1t, S2t, S1t, W2st, W1st (batch first; W*st may be None), then the 11 per-chunk tensors of
    ``mlp_chunk_step`` stacked chunk-major (n_chunks, N, ...). ``compile``: as in ``mlp_chunk_step_hand_grad``."""
    return _MLPChunkLoop.apply(compile, parts, activation, grad_clip, *inputs)
