"""The chunked delta rule with its independent memories split across the caller's threads when idle threads sleep.

Under passive OpenMP waiting (``OMP_WAIT_POLICY=PASSIVE``) with more than one thread, every op of the chunked form
either wakes the other threads (a few tens of microseconds each) or, in its recurrence over chunks, runs on one
thread while the others idle, and the cache-sized chunk groups are off (each of their smaller ops would pay a
wake-up). The heads (or, with a single head, the sequences of a batch) are independent delta rules, so here each
part runs ``delta_rule_chunk`` whole on a thread of its own with one torch thread (``ops.threads.run_side_by_side``):
no wake-ups, chunk groups on, both cores busy. Forward and backward both split: each part records its own autograd
graph in its thread, and the backward asks each part's graph for its inputs' gradients side by side. Under
``create_graph`` the backward is autograd through ``delta_rule_chunk`` on the unsplit inputs, so higher derivatives
stay exact. The arithmetic per memory is the unsplit form's, so the results equal it to rounding (tests).
"""

from __future__ import annotations

import contextlib

import torch

from .reference_vjp import reference_vjp
from .threads import run_side_by_side, side_by_side_parts

# Below this many chunks per call a part's work is too small to pay for handing it to another thread.
MIN_CHUNKS = 4
_OFF = {"depth": 0}  # inside no_side_by_side()


@contextlib.contextmanager
def no_side_by_side():
    """Within it, ``delta_rule`` never splits (for comparisons against the unsplit form)."""
    _OFF["depth"] += 1
    try:
        yield
    finally:
        _OFF["depth"] -= 1


def side_by_side_split(q: torch.Tensor, chunk_size: int) -> tuple[int, int]:
    """``(parts, axis)`` for the delta rule on ``q: (B, T, H, Dk)``: into how many parts to split it and along which
    axis of the (B, T, H, D) inputs (2: heads, 0: batch); ``(1, 2)`` for no split."""
    B, T, H, _ = q.shape
    if T < MIN_CHUNKS * chunk_size or _OFF["depth"]:
        return 1, 2
    axis = 2 if H > 1 or B == 1 else 0
    parts = side_by_side_parts(q.device, q.shape[axis])
    return parts, axis


def _state_axis(axis: int) -> int:
    """The state's (B, H, Dv, Dk) axis that matches ``axis`` of the (B, T, H, D) inputs."""
    return 1 if axis == 2 else 0


def _split(x: torch.Tensor | None, parts: int, axis: int) -> list:
    """``x`` in ``parts`` views along ``axis`` (None: a None per part)."""
    return [None] * parts if x is None else list(x.tensor_split(parts, dim=axis))


def _pieces(inputs: tuple, parts: int, axis: int) -> list[list]:
    """q, k, v, eta, alpha (axis as given) and the state (B, H, Dv, Dk: heads on axis 1) split into parts."""
    split = [_split(x, parts, axis) for x in inputs[:5]] + [_split(inputs[5], parts, _state_axis(axis))]
    return [list(p) for p in zip(*split)]


def _join(outs: list, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    o = torch.cat([r[0] for r in outs], dim=axis)
    S = torch.cat([r[1] for r in outs], dim=_state_axis(axis))
    return o, S


class _SideBySide(torch.autograd.Function):
    """``run(q, k, v, eta, alpha, S0) -> (o, S)`` (the chunked delta rule with its options bound), its memories
    split into ``parts`` along ``axis`` and run side by side, forward and backward."""

    @staticmethod
    def forward(ctx, run, parts, axis, *inputs):
        ctx.set_materialize_grads(False)
        ctx.run, ctx.axis = run, axis
        wants = ctx.needs_input_grad[3:]

        def part(*xs):
            with torch.enable_grad():  # each part keeps its own graph, for its own backward
                leaves = [
                    None if x is None else x.detach().requires_grad_(want) for x, want in zip(xs, wants)
                ]
                return run(*leaves), leaves

        ctx.graphs = run_side_by_side(part, _pieces(inputs, parts, axis))
        ctx.save_for_backward(*inputs)  # for a create_graph backward and autograd's version checks
        with torch.no_grad():
            o, S = _join([outs for outs, _ in ctx.graphs], axis)
        ctx.out_like = [(t.shape, t.dtype, t.device) for t in (o, S)]
        return o, S

    @staticmethod
    def backward(ctx, go, gS):
        inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: autograd through the unsplit form keeps higher derivatives exact
            grads = [torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                     for g, (shape, dtype, device) in zip((go, gS), ctx.out_like)]
            return (None, None, None, *reference_vjp(ctx.run, inputs, grads))
        axis, parts = ctx.axis, len(ctx.graphs)
        go_parts, gS_parts = _split(go, parts, axis), _split(gS, parts, _state_axis(axis))

        def part_backward(graph, go_p, gS_p):
            (o, S), leaves = graph
            outs = [t for t, g in ((o, go_p), (S, gS_p)) if g is not None]
            grads = [g for g in (go_p, gS_p) if g is not None]
            live = [x for x in leaves if x is not None and x.requires_grad]
            if not outs or not live:
                return [None] * len(leaves)
            # retain_graph: the outer graph may be differentiated again (retain_graph there), and this node's
            # parts go with it when it is freed
            got = iter(torch.autograd.grad(outs, live, grads, retain_graph=True, allow_unused=True))
            return [next(got) if x is not None and x.requires_grad else None for x in leaves]

        results = run_side_by_side(part_backward, list(zip(ctx.graphs, go_parts, gS_parts)))
        grads = []
        for i, per_part in enumerate(zip(*results)):
            if not ctx.needs_input_grad[3 + i]:
                grads.append(None)
                continue
            dim = _state_axis(axis) if i == 5 else axis
            grads.append(torch.cat([g if g is not None else torch.zeros_like(leaf) for g, leaf in
                                    zip(per_part, (graph[1][i] for graph in ctx.graphs))], dim=dim))
        return (None, None, None, *grads)


def delta_rule_side_by_side(run, parts: int, axis: int, q, k, v, eta, alpha, initial_state):
    """``run(q, k, v, eta, alpha, initial_state) -> (o, S)`` with the memories split into ``parts`` along ``axis``
    (see ``side_by_side_split``), each part on a thread of its own; differentiable as ``run`` is."""
    inputs = (q, k, v, eta, alpha, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return _SideBySide.apply(run, parts, axis, *inputs)
    return _join(run_side_by_side(run, _pieces(inputs, parts, axis)), axis)
