"""Titans' long-term neural memory, trained in context by mini-batch gradient descent with momentum and decay.

Per head, with q, k L2-normalised projections of the (convolved) input and v a plain projection:

    loss          l_t(M) = ||M(k_t) - v_t||^2                       (associative loss)
    surprise      S_t = eta_t S_{t-1} - theta_t grad l_t(M_{c})    (momentum eta_t, learning rate theta_t)
    memory        M_t = (1 - alpha_t) M_{t-1} + alpha_t M_init + S_t   (retention 1 - alpha_t, toward M_init)
    read          y_t = M_t(q_t)

where M_c is the memory at the start of t's chunk (Eq 90: all gradients of one chunk are taken at the chunk's
starting weights, so they are independent of each other and computed in one batched pass). theta_t =
max_lr * sigmoid(.), eta_t = sigmoid(.), alpha_t = sigmoid(.) are per token and per head.

Chunk-parallel form. With the gradients fixed, the two recurrences are linear with scalar coefficients, so over a
segment of n tokens starting from (M_0, S_0) (both recurrences unrolled; E_t = prod_{j<=t} eta_j, F_t = prod_{j<=t}
(1 - alpha_j), products restarted at the segment start):

    S_t = E_t S_0 - sum_{i<=t} (E_t / E_i) theta_i g_i
    M_t = F_t M_0 + B_t S_0 - sum_{i<=t} C[t, i] theta_i g_i,   B = D E,  C = D P,
    D[t, j] = F_t / F_j (j <= t),   P[j, i] = E_j / E_i (i <= j).

Every weight matrix W of the memory has per-token gradient g_i = delta_i a_i^T (layer output gradient times layer
input, see ``memories.py``), so the read with the per-token weights M_t never materialises them (TTT's dual form):

    W_t a = F_t W_0 a + B_t S_0 a - sum_{i<=t} C[t, i] theta_i (a_i . a) delta_i.

Read choice: y_t = M_t(q_t), the weights *after* token t's own write (Titans' retrieval with the current memory), which
the dual form gives at no extra cost. All ratios come from log-cumsums masked before exp, so they lie in [0, 1].

Retention choice (``retention="initial"``, the default). Titans' forgetting M_t = (1 - alpha_t) M_{t-1} + S_t is the
gradient step on the loss plus a weight decay alpha/2 ||M||^2, which pulls the memory toward M = 0. For an MLP memory
M(x) = x + W1 sigma(W2 x) that point is absorbing: at W1 = W2 = 0 both weight gradients vanish (W1's carries
sigma(W2 k) = gelu(0) = 0, W2's carries W1^T), so once the decay has won the memory never learns again; an untrained
Titans LM's memories reached exactly 0 within 10k tokens. We decay toward the meta-learned initial memory instead,
the regulariser alpha/2 ||M - M_init||^2 (the initial state is what the outer loop learns, Eq 72-73): all formulas
above hold for M - M_init, the memory stays within reach of M_init (bounded by its clipped steps) and never dies.
``retention="zero"`` gives Titans' rule; for a zero-initialised linear memory the two are the same.

Gradient point (``grad_at``). ``"chunk_start"`` (the default) is Eq 90 exactly: chunk c's gradients are taken at
M_c, the memory at the start of chunk c, so the chunks form a sequential recurrence. ``"call_start"`` takes every
chunk's gradients at the memory the call started with (titans-pytorch's rule: cheaper, one batched gradient pass
for the whole call, but not Eq 90: a call of n chunks is one chunk of n * chunk_size tokens for the gradients, while
momentum, decay and reads still run per token). Both equal their own token loops (tests). With every gradient
factor known before the first chunk, a call's whole chunks then run at once (``neural_memory_call_start``: the
chunk-start memories from a linear recurrence, every chunk's reads batched); ``fused=False`` keeps them chunk by
chunk on ``_segment``, the reference it is tested against.

Fast path (``fused=True``, the default). Whole chunks of an MLP memory with Eq 90 gradients run through
``neural_memory_fused.mlp_chunk_step``: the same formulas, with everything that does not depend on the running
memory batched over all chunks of a call, and a hand-written backward per chunk (``neural_memory_chunk_grad``,
tested against autograd through ``mlp_chunk_step``; under passive OpenMP waiting it splits the batch's memories across
the caller's threads, and while training a call's run of whole chunks is one node whose parts each run every chunk
on a thread of their own, ``neural_memory_chunk_loop``), its forward and backward optionally compiled
(``compile_chunk_step``). ``_segment`` is the reference it is tested against; it also runs partial chunks at a
call's edges and every other memory.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops._validation import check_int, check_layer_input
from ..ops.fast_linear import linear_layer
from ..ops.threads import side_by_side_parts
from .compiled_steps import warn_eager_fallback
from .conv import ShortConv
from .memories import FastWeightMemory, LinearMemory, MLPMemory
from .neural_memory_call_start import call_start_chunks, chunks_at_once, dual_read
from .neural_memory_chunk_grad import mlp_chunk_step_hand_grad
from .neural_memory_chunk_loop import mlp_chunk_loop
from .neural_memory_fused import gate_terms
from .state import LayerState

RETENTIONS = ("initial", "zero")
GRAD_POINTS = ("chunk_start", "call_start")


@dataclasses.dataclass
class NeuralMemoryState(LayerState):
    """Fast weights of a :class:`NeuralMemory`; every weight tensor is ``(B * H, d_out, d_in)`` (batch-major).

    weights: the running memory M_t.  momentum: the running surprise S_t.  chunk_weights: M at the start of the
    current chunk (where the chunk's gradients are taken).  conv: ``(B, K-1, dim)`` short-conv cache or None.
    pos: tokens already processed in the current chunk, in ``[0, chunk_size)``.
    """

    weights: list
    momentum: list
    chunk_weights: list
    conv: torch.Tensor | None
    pos: int


def chunk_sizes(T: int, chunk_size: int, pos: int) -> list[int]:
    """Lengths of the pieces of a T-token call that starts ``pos`` tokens into a chunk: first the rest of the
    current chunk, then whole chunks, then the start of the next one."""
    sizes, t = [], 0
    while t < T:
        n = min(chunk_size - pos, T - t)
        sizes.append(n)
        t, pos = t + n, (pos + n) % chunk_size
    return sizes


class NeuralMemory(nn.Module):
    """Titans' neural long-term memory as a sequence layer: ``y, state = layer(x, state=None)``, ``x: (B, T, dim)``.

    Args:
        dim: model width; n_heads: heads (one memory each, head width dh = dim // n_heads).
        chunk_size: tokens per mini-batch (Eq 90); 1 gives plain per-token online gradient descent.
        memory: ``"mlp"`` (Eq 89, hidden = expansion * dh), ``"linear"`` (a dh x dh matrix), or a
            :class:`FastWeightMemory` with ``n_heads`` heads mapping dh -> dh.
        conv_size: window of the causal depthwise conv on the input (0 disables it).
        max_lr: theta_t = max_lr * sigmoid(.); max_lr = 0 stops every write (the memory then only decays).
            Default ``1 / chunk_size``: all gradients of a chunk are taken at the same weights (Eq 90), so for a
            linear memory and unit keys the chunk's summed step shrinks the error along a shared key direction by
            ``1 - 2 sum_t theta_t``, which is a contraction for every key pattern only while ``sum_t theta_t < 1``.
            With ``max_lr = 1`` and chunks of 64, a trained layer's memory grew without bound past the training
            length (NaN from the 4th chunk of a 1,024-token document).
        grad_clip: None, or the largest Frobenius norm of one token's gradient over all memory weights; larger
            ones are scaled down to it. An MLP memory's curvature grows with its own weights (W1's gradient scales
            with W2 and back), so a step bound on theta alone does not keep it stable: in a trained 2-layer Titans
            LM with chunks of 64 and theta <= 1/64, the second layer's MLP memory still grew from |W| ~ 4 to
            1e17 within four chunks of real text. Scaling each token's factors delta_i keeps the chunk-parallel
            dual form exact (the clipped gradient is still delta_i a_i^T).
        retention: ``"initial"`` (decay toward the initial memory, see "Retention choice" above) or ``"zero"``
            (Titans' decay toward 0).
        grad_at: ``"chunk_start"`` (Eq 90: gradients at each chunk's start weights) or ``"call_start"`` (at the
            weights the call started with, see "Gradient point" above).
        fused: whole chunks of an MLP memory (Eq 89) with ``grad_at="chunk_start"`` go through the fast path of
            ``neural_memory_fused`` (the same numbers, tested against ``_segment`` and the token loop), and with
            ``grad_at="call_start"`` a call's whole chunks of the built-in memories run at once
            (``neural_memory_call_start``, tested the same way); False keeps every chunk on the reference
            ``_segment``. Other memories always take ``_segment``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 4,
        chunk_size: int = 64,
        memory: str | FastWeightMemory = "mlp",
        expansion: int = 2,
        conv_size: int = 4,
        max_lr: float | None = None,
        grad_clip: float | None = None,
        retention: str = "initial",
        grad_at: str = "chunk_start",
        fused: bool = True,
    ):
        super().__init__()
        if not (isinstance(dim, int) and isinstance(n_heads, int) and n_heads > 0) or dim % n_heads:
            check_int("dim", dim)
            check_int("n_heads", n_heads)
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        check_int("chunk_size", chunk_size)
        self.dim, self.n_heads, self.head_dim, self.chunk_size = dim, n_heads, dim // n_heads, chunk_size
        dh = self.head_dim
        if memory == "mlp":
            memory = MLPMemory(dh, expansion * dh, n_heads=n_heads)
        elif memory == "linear":
            memory = LinearMemory(dh, dh, n_heads=n_heads, init="zeros")
        elif not isinstance(memory, FastWeightMemory):
            raise ValueError(f"memory must be 'mlp', 'linear' or a FastWeightMemory, got {memory!r}")
        self.memory = memory
        self.max_lr = 1.0 / chunk_size if max_lr is None else float(max_lr)
        if self.max_lr < 0:
            raise ValueError(f"max_lr must be >= 0, got {max_lr}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        self.grad_clip = grad_clip
        if retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {RETENTIONS}, got {retention!r}")
        self.retention = retention
        if grad_at not in GRAD_POINTS:
            raise ValueError(f"grad_at must be one of {GRAD_POINTS}, got {grad_at!r}")
        self.grad_at = grad_at
        self.fused = fused
        self.compile_backend: str | None = None  # see compile_chunk_step
        self.conv = ShortConv(dim, conv_size) if conv_size > 0 else None
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        # per head logits of [theta, eta, alpha]; biases start at small steps, half momentum, slow forgetting
        self.to_gates = nn.Linear(dim, 3 * n_heads)
        with torch.no_grad():
            self.to_gates.weight.mul_(0.1)
            self.to_gates.bias.copy_(torch.tensor([-2.0, 0.0, -4.0]).repeat_interleave(n_heads))
        self.out_norm = nn.RMSNorm(dh)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> NeuralMemoryState:
        weights = [w.to(device=device, dtype=dtype) for w in self.memory.init_weights(batch)]
        conv = None if self.conv is None else self.conv.initial_cache(batch, device, dtype)
        return NeuralMemoryState(weights, [torch.zeros_like(w) for w in weights], list(weights), conv, 0)

    def project(self, x: torch.Tensor, conv_cache: torch.Tensor | None):
        """Inputs of the memory rule. Returns q, k, v: (B*H, T, dh) in the state dtype, theta, log_eta, log_keep:
        (B*H, T) (log eta_t and log(1 - alpha_t)), and the new conv cache."""
        h = x
        if self.conv is not None:
            h, conv_cache = self.conv(x, conv_cache)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        q, k, v = rearrange(linear_layer(self.to_qkv, h), "b t (s h d) -> s (b h) t d", s=3, h=self.n_heads).to(dtype)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = rearrange(self.to_gates(h), "b t (s h) -> s (b h) t", s=3).to(dtype)
        theta = self.max_lr * torch.sigmoid(gates[0])
        return q, k, v, theta, F.logsigmoid(gates[1]), F.logsigmoid(-gates[2]), conv_cache

    def _grad_factors(self, w_grad, k, v):
        """Per-token gradient factors of the associative loss at ``w_grad`` (clipped), see ``memories.py``."""
        deltas, inputs = self.memory.grad_factors(w_grad, k, lambda out: 2.0 * (out - v))
        if self.grad_clip is not None:  # ||g_t||_F^2 = sum over weights of ||delta_t||^2 ||a_t||^2
            sq = sum(d.square().sum(-1) * a.square().sum(-1) for d, a in zip(deltas, inputs))
            # clamp before the root: no infinite derivative at a zero gradient in the backward
            scale = (self.grad_clip * sq.clamp_min(self.grad_clip**2).rsqrt()).unsqueeze(-1)
            deltas = [d * scale for d in deltas]
        return deltas, inputs

    def _segment(self, w_grad, w_run, s_run, q, k, v, theta, log_eta, log_keep, w_star=None, factors=None):
        """Tokens of one chunk (or part of one), chunk-parallel. q, k, v: (N, n, dh); gates (N, n). ``factors``:
        precomputed (deltas, inputs) of these tokens (then ``w_grad`` is unused)."""
        deltas, inputs = self._grad_factors(w_grad, k, v) if factors is None else factors
        coef, scales, c_last, f_last, b_last, e_last = gate_terms(theta, log_eta, log_keep)

        # the recurrences run on W - W_init (retention toward the initial memory); W_init is added back on reads
        w_dev = w_run if w_star is None else [w - w0 for w, w0 in zip(w_run, w_star)]

        def read(i: int, a: torch.Tensor) -> torch.Tensor:
            # F_t W_0 a + B_t S_0 a as one matmul against [W_0; S_0]
            X = torch.cat([w_dev[i], s_run[i]], dim=-2)
            return dual_read(a, X, scales, inputs[i], deltas[i], coef, None if w_star is None else w_star[i])

        y = self.memory.forward_with(read, q)
        w_new, s_new = [], []
        for i, (W, S, d, a) in enumerate(zip(w_dev, s_run, deltas, inputs)):
            dw, ds = (d.mT.unsqueeze(1) @ (c_last * a.unsqueeze(1))).unbind(1)
            w_new.append(f_last * W + b_last * S - dw + (0 if w_star is None else w_star[i]))
            s_new.append(e_last * S - ds)
        return y, w_new, s_new

    def _fast_chunks(self) -> bool:
        """Whether whole chunks take ``mlp_chunk_step``: an Eq 89 MLP memory (its own forward), Eq 90 gradients."""
        mem = self.memory
        return (
            self.fused
            and self.grad_at == "chunk_start"
            and isinstance(mem, MLPMemory)
            and type(mem).forward_with is MLPMemory.forward_with
        )

    def _batched_call_start(self) -> bool:
        """Whether whole chunks with ``grad_at="call_start"`` run all at once (``neural_memory_call_start``): the
        built-in memories, whose ``forward_with`` takes any leading dimensions as batch."""
        own = type(self.memory).forward_with in (MLPMemory.forward_with, LinearMemory.forward_with)
        return self.fused and self.grad_at == "call_start" and own

    def _whole_chunks(self, w_run, s_run, w_star, q, k, v, theta, log_eta, log_keep):
        """``n_c`` whole chunks starting at a chunk boundary (so each chunk's gradient point is the running memory)
        through ``mlp_chunk_step``. q, k, v: (N, n_c * C, dh); gates (N, n_c * C). Returns y and the new lists."""
        N, L, dh = q.shape
        nc, C = L // self.chunk_size, self.chunk_size

        def chunk_major(t):  # (N, nc * C, ...) -> (nc, N, C, ...)
            return t.unflatten(1, (nc, C)).transpose(0, 1)

        q, k, v = (chunk_major(t) for t in (q, k, v))
        coef, scales, c_last, f_last, b_last, e_last = gate_terms(
            *(chunk_major(t) for t in (theta, log_eta, log_keep))
        )
        per_chunk = (
            k,
            k - v,
            q,
            (q @ k.mT) * coef,
            (c_last * k.unsqueeze(2)).mT,  # (nc, N, 2, dh, C)
            coef,
            scales,
            c_last,
            f_last,
            b_last,
            e_last,
        )
        dev = w_run if w_star is None else [w - w0 for w, w0 in zip(w_run, w_star)]
        W2t, W1t, S2t, S1t = (t.mT.contiguous() for t in (*dev, *s_run))
        W2st, W1st = (None, None) if w_star is None else (w.mT.contiguous() for w in w_star)
        states = (W2t, W1t, S2t, S1t, W2st, W1st)
        parts = self._loop_parts(nc, N, q, per_chunk, states)
        if parts > 1:  # passive waiting: each part of the batch runs every chunk on a thread of its own
            ys, W2t, W1t, S2t, S1t = self._chunk_loop(parts, states, per_chunk)
        else:
            outs = []
            for args in zip(*(t.unbind(0) for t in per_chunk)):
                y, W2t, W1t, S2t, S1t = self._chunk_step(
                    W2t, W1t, S2t, S1t, W2st, W1st, *args, self.memory.activation, self.grad_clip
                )
                outs.append(y)
            ys = torch.stack(outs)
        y = ys.transpose(0, 1).reshape(N, L, dh)
        w_new = [t.mT.contiguous() for t in (W2t, W1t)]
        if w_star is not None:
            w_new = [w + w0 for w, w0 in zip(w_new, w_star)]
        return y, w_new, [t.mT.contiguous() for t in (S2t, S1t)]

    def _loop_parts(self, nc: int, N: int, q: torch.Tensor, per_chunk, states) -> int:
        """Into how many parts ``_chunk_loop`` splits the batch of memories for a run of ``nc`` whole chunks: under
        passive waiting with several threads, while training (``ops.threads.side_by_side_parts``), else 1 (the
        chunk-by-chunk node, which splits each chunk itself when it applies)."""
        if nc < 2 or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return 1
        if not any(t is not None and t.requires_grad for t in (*per_chunk, *states)):
            return 1
        return side_by_side_parts(q.device, N)

    def _chunk_loop(self, parts, states, per_chunk):
        args = (parts, self.memory.activation, self.grad_clip, *states, *per_chunk)
        return self._compiled_or_eager(mlp_chunk_loop, *args)

    def _chunk_step(self, *args):
        return self._compiled_or_eager(mlp_chunk_step_hand_grad, *args)

    def _compiled_or_eager(self, step, *args):
        """``step(*args)`` with the layer's compile backend; if compiling fails, warn, and run eagerly from then on."""
        if self.compile_backend is None:
            return step(*args)
        try:
            return step(*args, compile=self.compile_backend)
        except Exception as err:  # e.g. no C compiler for inductor: the eager step computes the same thing
            warn_eager_fallback("neural memory's chunk step", self.compile_backend, err, stacklevel=5)
            self.compile_backend = None
            return step(*args)

    def compile_chunk_step(self, backend: str | None = "inductor") -> NeuralMemory:
        """Run the whole chunks of the fast path through ``torch.compile``: the chunk step's forward and its
        hand-written backward (``neural_memory_chunk_grad``), each compiled as one function without autograd (one
        compiled copy shared by all layers; partial chunks at a call's edges stay on ``_segment``). Under passive
        OpenMP waiting the batch's memories still split across the threads, as in the eager step. If compilation
        fails, a warning is issued and the eager step runs instead; ``backend=None`` switches back to eager.

        Forward + backward of ``NeuralMemory(256, n_heads=4, chunk_size=64, expansion=4)`` at T = 512-8192, batch
        1, fp32, on a 2-core CPU: 1.03-1.17x the eager step and 1.03-1.36x the reference step compiled with the
        compiler's own backward, at 1 or 2 threads and either OpenMP wait policy
        (``python benchmarks/bench_neural_memory_step.py``, docs/results/bench_neural_memory_step.md)."""
        if backend is not None and not self._fast_chunks():
            raise ValueError("compile_chunk_step needs fused=True, an MLP memory and grad_at='chunk_start'")
        self.compile_backend = backend
        return self

    def read(self, x: torch.Tensor, state: NeuralMemoryState | None = None):
        """The memory part alone: x: (B, T, dim) -> reads y_t = M_t(q_t): (B*H, T, dh) in the state dtype, new state."""
        check_layer_input(x, self.dim)
        B, T, _ = x.shape
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if state is None:
            state = self.initial_state(B, x.device, dtype)
        with torch.autocast(x.device.type, enabled=False):
            q, k, v, theta, log_eta, log_keep, conv = self.project(x, state.conv)
            w_run, s_run, w_chunk, pos = state.weights, state.momentum, state.chunk_weights, state.pos
            # a call may start or end inside a chunk: chunks stay aligned to the stream's absolute positions.
            # Consecutive whole chunks from a boundary form one group of the fast path.
            sizes = chunk_sizes(T, self.chunk_size, pos)
            batched = self._batched_call_start()
            if self._fast_chunks() or batched:
                groups, p = [], pos
                # the batched call-start form holds every group's chunk-start memories at once: groups bounded there
                most = self.chunk_size * chunks_at_once(w_run, q.element_size()) if batched else T
                for n in sizes:
                    if p == 0 and n == self.chunk_size and groups and groups[-1][0] and groups[-1][1] < most:
                        groups[-1][1] += n
                    else:
                        groups.append([p == 0 and n == self.chunk_size, n])
                    p = (p + n) % self.chunk_size
            else:
                groups = [[False, n] for n in sizes]
            sizes = [n for _, n in groups]
            # split (not slice) so the backward of each piece does not allocate a full-length zero gradient
            pieces = zip(*(t.split(sizes, dim=1) for t in (q, k, v, theta, log_eta, log_keep)))
            outs = []
            w_star = None
            if self.retention == "initial":
                w_star = [w.to(device=x.device, dtype=dtype) for w in self.memory.init_weights(B)]
            factors = [None] * len(sizes)
            if self.grad_at == "call_start" and T:  # one batched gradient pass at the call's start weights
                deltas, inputs = self._grad_factors(w_run, k, v)
                factors = list(zip(*(zip(*(t.split(sizes, dim=1) for t in group)) for group in (deltas, inputs))))
            for (whole, n), piece, f in zip(groups, pieces, factors):
                if whole:
                    if self.grad_at == "call_start":  # every chunk at once (neural_memory_call_start)
                        q_c, _, _, *gates = piece
                        y, w_run, s_run = call_start_chunks(
                            self.memory, self.chunk_size, w_run, s_run, w_star, q_c, *gates, *f
                        )
                    else:
                        y, w_run, s_run = self._whole_chunks(w_run, s_run, w_star, *piece)
                    w_chunk = w_run
                    outs.append(y)
                    continue
                y, w_run, s_run = self._segment(w_chunk, w_run, s_run, *piece, w_star, f)
                outs.append(y)
                pos += n
                if pos == self.chunk_size:
                    pos, w_chunk = 0, w_run
            y = torch.cat(outs, dim=1) if outs else q.new_zeros(q.shape)
        return y, NeuralMemoryState(w_run, s_run, w_chunk, conv, pos)

    def forward(self, x: torch.Tensor, state: NeuralMemoryState | None = None):
        """x: (B, T, dim) -> y: (B, T, dim), new state."""
        y, state = self.read(x, state)
        y = rearrange(self.out_norm(y.to(x.dtype)), "(b h) t d -> b t (h d)", h=self.n_heads)
        return linear_layer(self.to_out, y), state
