"""A run of whole chunks of :class:`~nested_learning.memory.neural_memory.NeuralMemory` with ``grad_at="call_start"``,
every chunk at once.

With every gradient taken at the weights the call started with, the gradient factors (delta_t, a_t) of all tokens
are known before the first chunk runs. What a chunk adds to the memory is then known too: over chunk c, Titans'
momentum and retention recurrences (``neural_memory``'s module docstring) unrolled over the chunk give, in the
deviation from the initial memory (``retention="initial"``; the memory itself for ``"zero"``),

    W_{c+1} = f_c W_c + b_c S_c - dW_c,        S_{c+1} = e_c S_c - dS_c

(f, b, e: the chunk's products of the retention and momentum gates, ``gate_terms``; dW_c, dS_c: its writes, sums of
delta_t a_t^T weighted by the gates). The chunk-start states follow from this linear recurrence: three elementwise
ops per chunk and weight, as one autograd node with a hand-written backward (:func:`state_scan`; its reference, the
loop with autograd's bookkeeping, is :func:`state_scan_reference`). Every chunk's reads then run at once, batched
over the chunks: the same dual form as the chunk-by-chunk reference (``NeuralMemory._segment``, which reads with
:func:`dual_read` too), which this equals to rounding (tests, fp64: outputs, states and gradients).

Holding every chunk's start memory costs memory linear in the call's length, so a long call runs its whole chunks in
groups of at most ``GROUP_BYTES`` of such states (T = 16,384 tokens a group at ``NeuralMemory(256, n_heads=4,
chunk_size=64, expansion=4)``, batch 1).

Only ``"call_start"`` allows this: under Eq 90 (``"chunk_start"``) chunk c's gradient factors depend on W_c, so the
chunks stay a sequential recurrence of products (``neural_memory_fused``).
"""

from __future__ import annotations

import torch

from ..ops.reference_vjp import reference_vjp
from ..ops.threads import one_thread_if_threads_sleep
from .neural_memory_fused import gate_terms

# the chunk-start memories and momenta one batched run holds (and as much again for the writes, and the gradients in
# a backward): a long call runs its whole chunks in groups of this size, so that no-grad streaming stays bounded
GROUP_BYTES = 256 * 2**20


def chunks_at_once(weights, element_size: int) -> int:
    """How many chunks one batched run takes: the most whose stacked [W; S] states fit in ``GROUP_BYTES``."""
    per_chunk = 2 * element_size * sum(w.numel() for w in weights)
    return max(1, GROUP_BYTES // per_chunk)


def state_scan_reference(f, b, e, writes, X0):
    """``W_{c+1} = f_c W_c + b_c S_c + writes_c[0]``, ``S_{c+1} = e_c S_c + writes_c[1]`` with autograd's
    bookkeeping (the reference of :func:`state_scan`). f, b, e: (N, n); writes: (N, n, 2, P); X0 = [W_0; S_0]:
    (N, 2, P). Returns the states at the chunk starts X_0 .. X_{n-1} as (N, n, 2, P), and X_n."""
    X, starts = X0, []
    for fc, bc, ec, w in zip(f.unbind(1), b.unbind(1), e.unbind(1), writes.unbind(1)):
        starts.append(X)
        W, S = X.unbind(1)
        X = torch.stack([fc[:, None] * W + bc[:, None] * S, ec[:, None] * S], 1) + w
    return torch.stack(starts, 1), X


def _scan(f, b, e, writes, X0):
    """The scan without autograd: the chunk-start states (N, n, 2, P), contiguous (the reads view them as one
    batch), and the last state (N, 2, P)."""
    N, n = writes.shape[:2]
    starts, end = X0.new_empty(N, n, *X0.shape[1:]), torch.empty_like(X0)
    starts[:, 0] = X0
    with one_thread_if_threads_sleep(X0.device):  # a stretch of small ops (ops.threads)
        for c in range(n):
            (W, S), (wW, wS) = starts[:, c].unbind(1), writes[:, c].unbind(1)
            W_next, S_next = (starts[:, c + 1] if c + 1 < n else end).unbind(1)
            torch.addcmul(wW, f[:, c, None], W, out=W_next)
            W_next.addcmul_(b[:, c, None], S)
            torch.addcmul(wS, e[:, c, None], S, out=S_next)
    return starts, end


class _StateScan(torch.autograd.Function):
    """The scan without autograd's bookkeeping. The backward runs it in reverse: with D_c = dX_{c+1} (which is
    also the gradient of writes_c) and G the gradient of X_c, dW_c = G_W + f_c D_W and dS_c = G_S + b_c D_W + e_c D_S;
    then df_c = <D_W, W_c>, db_c = <D_W, S_c>, de_c = <D_S, S_c> for all chunks at once."""

    @staticmethod
    def forward(ctx, f, b, e, writes, X0):
        starts, end = _scan(f, b, e, writes, X0)
        ctx.save_for_backward(f, b, e, writes, X0, starts)
        return starts, end

    @staticmethod
    def backward(ctx, G_starts, G_end):
        f, b, e, writes, X0, starts = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: autograd through the reference, higher derivatives exact
            return reference_vjp(state_scan_reference, (f, b, e, writes, X0), (G_starts, G_end))
        n = writes.shape[1]
        D = torch.empty_like(writes)  # D[:, c] = dX_{c+1}
        D[:, n - 1] = G_end
        d_X0 = torch.empty_like(X0)
        with one_thread_if_threads_sleep(X0.device):
            for c in range(n - 1, -1, -1):
                (gW, gS), (DW, DS) = G_starts[:, c].unbind(1), D[:, c].unbind(1)
                oW, oS = (D[:, c - 1] if c else d_X0).unbind(1)
                torch.addcmul(gW, f[:, c, None], DW, out=oW)
                torch.addcmul(gS, b[:, c, None], DW, out=oS)
                oS.addcmul_(e[:, c, None], DS)
        df = torch.linalg.vecdot(D[:, :, 0], starts[:, :, 0])
        db = torch.linalg.vecdot(D[:, :, 0], starts[:, :, 1])
        de = torch.linalg.vecdot(D[:, :, 1], starts[:, :, 1])
        return df, db, de, D, d_X0


def state_scan(f, b, e, writes, X0):
    """:func:`state_scan_reference` as one autograd node with a hand-written backward: the states at the chunk
    starts (N, n, 2, P) and after the last chunk (N, 2, P)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (f, b, e, writes, X0)):
        return _StateScan.apply(f, b, e, writes, X0)
    return _scan(f, b, e, writes, X0)


def dual_read(a, X, scales, a_in, delta, coef, w0=None):
    """One weight's read ``a @ M_t^T`` at each token's running weight, chunk-parallel (the dual form).

    a: (..., n, d_in) the inputs of this weight, one row per token; X: (..., 2 d_out, d_in) the chunk-start
    deviation W_0 and momentum S_0 stacked (read as one product); scales: (..., n, 2) [F_t, B_t]; a_in (..., n, d_in)
    and delta (..., n, d_out): the chunk's gradient factors; coef (..., n, n); w0: None or the initial weight
    (N, d_out, d_in), added back (``retention="initial"``), with the leading dimensions of ``a`` after the first
    folded into its rows."""
    base = (a @ X.mT).unflatten(-1, (2, X.shape[-2] // 2))
    y = (base * scales.unsqueeze(-1)).sum(-2) - ((a @ a_in.mT) * coef) @ delta
    if w0 is None:
        return y
    return y + (a.flatten(1, -2) @ w0.mT).view_as(y)


def call_start_chunks(memory, chunk_size: int, w_run, s_run, w_star, q, theta, log_eta, log_keep, deltas, inputs):
    """``n_c`` whole chunks from a chunk boundary, gradients at the call's start weights (module docstring).

    q: (N, n_c * C, d); gates (N, n_c * C); deltas, inputs: per weight, (N, n_c * C, d_out / d_in), taken at the
    call's start weights. w_run, s_run: the running weights and momenta at the first chunk's start; w_star: None or
    the initial weights. Returns the reads (N, n_c * C, d) and the weights and momenta after the last chunk."""
    N, L, _ = q.shape
    nc = L // chunk_size

    def by_chunk(t):  # (N, nc * C, ...) -> (N, nc, C, ...): a view
        return t.unflatten(1, (nc, chunk_size))

    coef, scales, c_last, f_last, b_last, e_last = gate_terms(*(by_chunk(t) for t in (theta, log_eta, log_keep)))
    deltas, inputs = [by_chunk(d) for d in deltas], [by_chunk(a) for a in inputs]
    f, b, e = (t.view(N, nc) for t in (f_last, b_last, e_last))
    w_dev = w_run if w_star is None else [w - w0 for w, w0 in zip(w_run, w_star)]
    starts, w_new, s_new = [], [], []
    for i, (W, S, d, a) in enumerate(zip(w_dev, s_run, deltas, inputs)):
        # minus each chunk's writes to W and S, (N, nc, 2, d_out, d_in), as in _segment
        writes = (d.mT.unsqueeze(2) @ (-c_last * a.unsqueeze(2))).flatten(3)
        X, X_end = state_scan(f, b, e, writes, torch.stack([W, S], 1).flatten(2))  # (N, nc, 2, d_out * d_in)
        starts.append(X.view(N, nc, 2 * W.shape[-2], W.shape[-1]))
        W_end, S_end = X_end.view(N, 2, *W.shape[-2:]).unbind(1)
        w_new.append(W_end if w_star is None else W_end + w_star[i])
        s_new.append(S_end)

    def read(i: int, a: torch.Tensor) -> torch.Tensor:
        w0 = None if w_star is None else w_star[i]
        return dual_read(a, starts[i], scales, inputs[i], deltas[i], coef, w0)

    y = memory.forward_with(read, by_chunk(q))
    return y.flatten(1, 2), w_new, s_new
