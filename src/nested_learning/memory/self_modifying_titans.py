"""Self-modifying (self-referential) Titans, Eq 83-88, and their chunk-wise form, Eq 90-93.

Per head (width dh), after a causal depthwise convolution of the input:

    q_t = normalize(x_t W_q)                                    the only static projection (Eq 83)
    k_t = normalize(M_k(x_t)),  v_t = normalize(M_v(x_t))       adaptive projections (Eq 83; v normalised: value_norm)
    eta_t = sigmoid(M_eta(x_t) + b_eta),  alpha_t = sigmoid(M_alpha(x_t) + b_alpha)
    v_hat_box = M_box(v_t)         for box in {k, v, memory, eta, alpha}     self-generated values (Eq 84, 87;
                                   bounded: normalize, tanh for the gates; matrix memories with value_norm,
                                   _Memories.bounded; MLP memories with bounded_targets)
    M_box <- M_box (alpha_t I - eta_t k_t k_t^T) - eta_t grad L(M_box; k_t, v_hat_box)          DGD (Eq 88)
    o_t = M_memory(q_t)                                                                          (Eq 83)

Objectives (Eq 92-93), with the gradient taken at the chunk-start memory M_c (Eq 90):
    "dot":  L = -<M k, v_hat>          grad = -v_hat k^T           update term + eta v_hat k^T
    "l2":   L = 1/2 ||M k - v_hat||^2  grad = (M_c k - v_hat) k^T  update term + eta (v_hat - M_c k) k^T
(seed 000 writes "- eta v_hat k^T" for the dot objective; minimising -<Mk, v_hat> gives the plus sign.)
q is not a memory here: Eq 83 lists M_q among the boxes but also says q_t = x_t W_q is the one static projection.

Chunk-wise form (Eq 90): in a chunk, every memory *evaluation* (k, v, eta, alpha, v_hat, and the gradient) uses the
chunk-start state M_c; the decay term M_{t-1}(alpha_t I - eta_t k k^T) still runs token by token. chunk_size=1 is
Eq 83-88 exactly. The inputs of chunk c depend on the memories after chunk c-1, so chunks run in a Python loop; each
chunk's update is a delta rule (``ops.delta_rule`` in chunk mode), see ``self_modifying_memories.py`` for the matrix
memories (all five stacked into one state, one delta rule per chunk) and the Eq 89 MLP memories (DGD per layer). By
default (``op_mode="fused"``) the MLP memories run the same step box-major with ``ops.delta_rule_one_chunk``
(``fused_chunk_step``; tested against the ``ops.delta_rule`` form and the plain token loop), optionally compiled or
with a hand-written backward (``hand_backward``; ``self_modifying_chunk_grad``, tested against autograd).

Read choice: o_t = M_{memory,t-1}(q_t), the running memory *before* token t's write, also inside a chunk (the op's
read="before"). With chunk_size=1 this is Eq 83's y_t = M_{memory,t-1}(q_t) exactly, and with larger chunks a token
still sees the writes of the earlier tokens of its own chunk (reading at the chunk-start state would hide them).

Knowledge transfer by initialisation (Eq 72-73): the initial memories are parameters of ``self.memories``; a fresh
state starts from them and gradients reach them through the whole in-context trajectory. Memory states are fp32
(fp64 for fp64 inputs) whatever the parameter dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..ops._validation import check_int, check_layer_input
from ..ops.cpu import cpp_wrapper_default
from ..ops.threads import BackwardOnOneThread, one_thread_if_threads_sleep
from .compiled_steps import compiled, warn_eager_fallback
from .conv import ShortConv
from .neural_memory import chunk_sizes
from .self_modifying_chunk_grad import fused_chunk_step_hand_grad
from .self_modifying_memories import LinearSelfModifyingMemories, MLPSelfModifyingMemories, fused_chunk_step
from .state import LayerState

OBJECTIVES = ("l2", "dot")
OP_MODES = ("fused", "chunk", "recurrent")
MEMORIES = {"linear": LinearSelfModifyingMemories, "mlp": MLPSelfModifyingMemories}
_SECOND_ORDER = threading.local()  # .on: set by second_order_calls


@contextlib.contextmanager
def second_order_calls():
    """Within it, layer calls that ``compile_whole_chunk_calls`` would compile run as before: a backward with
    ``create_graph`` (second order) must go through them, and a compiled graph has no double backward."""
    before = getattr(_SECOND_ORDER, "on", False)
    _SECOND_ORDER.on = True
    try:
        yield
    finally:
        _SECOND_ORDER.on = before


@dataclasses.dataclass
class SelfModifyingTitansState(LayerState):
    """memory: the running memories, a list of tensors (linear: ``[S]`` with ``S: (B, H, 3*dh+2, dh)``, rows
    [M_k; M_v; M_memory; M_eta; M_alpha]; mlp: ``[W2, W1, G1]``, see ``MLPSelfModifyingMemories``).
    chunk_memory: the same at the start of the current chunk (Eq 90). conv: ``(B, K-1, dim)`` or None.
    pos: tokens already processed in the current chunk, in ``[0, chunk_size)``."""

    memory: list
    chunk_memory: list
    conv: torch.Tensor | None
    pos: int


def _state_like_later_calls(x: torch.Tensor, state):
    """``state`` laid out as a stream's later calls carry theirs, so that a fresh stream's first call takes their
    compiled graph instead of one of its own (the compiler guards on requires_grad and strides): the convolution
    cache requiring gradients when ``x`` does (later caches hold earlier inputs; a fresh one is a constant, so the
    gradient computed for it goes nowhere) and the memories materialised (a fresh stream's are expanded from the
    initial ones over the batch), the memory at the chunk start the same tensors as the running one."""
    if state is None:
        return state
    conv = state.conv
    if conv is not None and not conv.requires_grad and torch.is_grad_enabled() and x.requires_grad:
        conv = conv.detach().requires_grad_()
    memory = [m.contiguous() for m in state.memory]
    same = all(a is b for a, b in zip(state.memory, state.chunk_memory))
    chunk = memory if same else [m.contiguous() for m in state.chunk_memory]
    return dataclasses.replace(state, memory=memory, chunk_memory=chunk, conv=conv)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the strides of a fresh tensor (a copy only if it has others): a model's first block gets a slice
    of its embeddings, the next ones a sum, and the compiler guards on every stride, a size-1 batch's too."""
    expected, n = [], 1
    for size in reversed(x.shape):
        expected.append(n)
        n *= size
    return x if x.stride() == tuple(reversed(expected)) else x.clone(memory_format=torch.contiguous_format)


class SelfModifyingTitans(nn.Module):
    """Eq 83-93 as a sequence layer: ``y, state = layer(x, state=None)``, ``x: (B, T, dim)``.

    Args:
        dim: model width; n_heads: heads (dh = dim // n_heads; all memories are per head, dh -> dh or dh -> 1).
        chunk_size: Eq 90 chunk (memories are evaluated at the chunk-start state); 1 gives Eq 83-88.
        objective: ``"l2"`` (Eq 93, delta rule) or ``"dot"`` (Eq 92, Hebbian).
        memory: ``"mlp"`` (Eq 89, per-layer DGD; hidden width ``hidden``, default 2 * dh) or ``"linear"`` (matrix
            memories, stacked). With matrix memories and the literal values (``value_norm=False``) every memory is
            M_box,t = M_box,0 Q_t with one shared Q_t: the five memories are one, read through fixed maps (see
            docs/equations.md, "Why MLP memories"); the MLP memories have no such identity.
        conv_size: causal depthwise conv window (0 disables it).
        gate: output gate ``y = W_o (norm(o) * silu(x W_g))``; False gives ``W_o norm(o)``.
        eta_bias, alpha_bias: initial static biases of the eta / alpha logits.
        op_mode: ``"fused"`` (default): the MLP memories run ``MLPSelfModifyingMemories.fused_chunk``, the same
            step in a box-major layout with ``ops.delta_rule_one_chunk`` (the matrix memories run ``"chunk"``);
            ``"chunk"``: each chunk through ``ops.delta_rule`` in chunk mode (the reference the fused form is
            tested against); ``"recurrent"``: the same with the op's token loop.
        hidden: hidden width of the MLP memories.
        retention: MLP memories only: ``"initial"`` (the alpha decay pulls toward the meta-learned initial weights,
            default; see ``MLPSelfModifyingMemories``) or ``"zero"`` (Eq 88 as written, a pull toward 0, where an
            untrained layer's MLP memories die within about a thousand tokens).
        value_norm: L2-normalise v_t (as q_t and k_t are). The self-generated targets v_hat = M(v_t) scale with v_t
            and feed back into the memories that produce v_t; without the normalisation the dot objective and the
            MLP memories diverge from a random start. False (with ``bounded_targets=False`` for MLP memories) gives
            Eq 83 literally.
        hand_backward: eager whole chunks of the fused MLP memories take ``fused_chunk_step`` with its hand-written
            backward (``self_modifying_chunk_grad``: the same values, gradients equal to autograd's to rounding;
            HOPE tiny trained 1.01-1.08x faster at one thread, 1.29-1.38x at two with passive OpenMP waiting, over
            three runs of ``benchmarks/bench_hope_chunk_step.py``).
            False: autograd's backward of the same step.
        bounded_targets: MLP memories only (default True; our addition): bound their self-generated targets
            (normalize for k, v, memory; tanh for the gates), as ``value_norm`` bounds the matrix memories'. Without
            it the targets grow with W2 and W2 can grow by a factor per chunk: HOPE tiny trained at the demo's lr
            3e-3 overflowed inside one window at step 130 when only its backward's rounding changed (see
            ``MLPSelfModifyingMemories``).

    The slow initial memories (Eq 72-73) and gate biases live in ``self.memories``.
    """

    # compile_whole_chunk_calls with inductor: the graph's small products as loops of inductor's own, fused with
    # their neighbours (compiled_steps.small_products_options); False: one library call each
    whole_chunk_small_products: bool = True
    # compile_whole_chunk_calls with inductor on a CPU: the graph's C++ wrapper where it pays (ops.cpu.cpp_wrapper_pays);
    # False: inductor's Python wrapper
    whole_chunk_cpp_wrapper: bool = cpp_wrapper_default()

    def __init__(
        self,
        dim: int,
        n_heads: int = 4,
        chunk_size: int = 16,
        objective: str = "l2",
        memory: str = "mlp",
        conv_size: int = 4,
        gate: bool = True,
        eta_bias: float = 0.0,
        alpha_bias: float = 5.0,
        op_mode: str = "fused",
        hidden: int | None = None,
        value_norm: bool = True,
        retention: str = "initial",
        hand_backward: bool = True,
        bounded_targets: bool = True,
    ):
        super().__init__()
        if not (isinstance(dim, int) and isinstance(n_heads, int) and n_heads > 0) or dim % n_heads:
            check_int("dim", dim)
            check_int("n_heads", n_heads)
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if memory not in MEMORIES:
            raise ValueError(f"memory must be one of {tuple(MEMORIES)}, got {memory!r}")
        check_int("chunk_size", chunk_size)
        self.dim, self.n_heads, self.head_dim, self.chunk_size = dim, n_heads, dim // n_heads, chunk_size
        self.objective = objective
        if op_mode not in OP_MODES:
            raise ValueError(f"op_mode must be one of {OP_MODES}, got {op_mode!r}")
        self.op_mode = op_mode
        self.compile_backend: str | None = None  # see compile_chunk_step
        self.whole_chunk_backend: str | None = None  # see compile_whole_chunk_calls
        self.hand_backward = bool(hand_backward)
        self.conv = ShortConv(dim, conv_size) if conv_size > 0 else None
        self.to_q = nn.Linear(dim, dim, bias=False)
        extra = {} if memory == "linear" else {"hidden": hidden, "retention": retention,
                                                "bounded_targets": bounded_targets}
        self.memories = MEMORIES[memory](
            n_heads, self.head_dim, objective, eta_bias, alpha_bias, "recurrent" if op_mode == "recurrent" else "chunk",
            value_norm, **extra
        )
        self.out_norm = nn.RMSNorm(self.head_dim)
        self.to_gate = nn.Linear(dim, dim, bias=False) if gate else None
        self.to_out = nn.Linear(dim, dim, bias=False)

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> SelfModifyingTitansState:
        memory = self.memories.initial_state(batch, device, dtype)
        conv = None if self.conv is None else self.conv.initial_cache(batch, device, dtype)
        return SelfModifyingTitansState(memory, list(memory), conv, 0)

    def read(self, x: torch.Tensor, state: SelfModifyingTitansState | None = None, check: bool = True):
        """The memory part: x: (B, T, dim) -> o_t = M_{memory,t-1}(q_t): (B, T, H, dh) in the state dtype, new state."""
        if check:
            check_layer_input(x, self.dim)
        B, T, _ = x.shape
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if state is None:
            state = self.initial_state(B, x.device, dtype)
        h, conv = (x, None) if self.conv is None else self.conv(x, state.conv)
        q = F.normalize(rearrange(self.to_q(h), "b t (h d) -> b t h d", h=self.n_heads), dim=-1)
        with torch.autocast(x.device.type, enabled=False):
            hx = rearrange(h, "b t (h d) -> b t h d", h=self.n_heads).to(dtype)
            q = q.to(dtype)
            S = [s.to(dtype) for s in state.memory]
            S_c = [s.to(dtype) for s in state.chunk_memory]
            # the inputs of chunk c depend on the state after chunk c-1: a Python loop over chunks, parallel inside.
            # A call may start or end inside a chunk; chunks stay aligned to the stream's absolute positions.
            sizes = chunk_sizes(T, self.chunk_size, state.pos)
            run = self._chunks_fused if self.fused else self._chunks
            with one_thread_if_threads_sleep(x.device):  # the loop's ops are small (see ops.threads)
                o, S, S_c, pos = run(hx, q, S, S_c, state.pos, sizes)
        return o, SelfModifyingTitansState(S, S_c, conv, pos)

    @property
    def fused(self) -> bool:
        return self.op_mode == "fused" and isinstance(self.memories, MLPSelfModifyingMemories)

    def _chunks(self, hx, q, S, S_c, pos, sizes):
        outs = []
        for n, x_c, q_c in zip(sizes, hx.split(sizes, dim=1), q.split(sizes, dim=1)):
            o, S = self.memories.chunk(S_c, S, x_c, q_c)
            outs.append(o)
            pos += n
            if pos == self.chunk_size:
                pos, S_c = 0, S
        B = hx.shape[0]
        o = torch.cat(outs, dim=1) if outs else hx.new_zeros(B, 0, self.n_heads, self.head_dim)
        return o, S, S_c, pos

    def _chunks_fused(self, hx, q, S, S_c, pos, sizes):
        """``_chunks`` for the MLP memories in their fused layout (``MLPSelfModifyingMemories.fused_chunk``): the
        layout changes once per call, not per chunk."""
        mem, (B, T, H, dh) = self.memories, hx.shape
        same = all(a is b for a, b in zip(S, S_c))
        R = mem.fused_layout(S)
        R_c = R if same else mem.fused_layout(S_c)
        R_0 = mem.fused_layout(mem.initial_state(B, hx.device, hx.dtype)) if mem.retention == "initial" else None
        gate_bias = mem.gate_bias.to(hx.dtype).repeat(B, 1)  # (B * H, 2)
        xs, qs = (t.transpose(1, 2).reshape(B * H, T, dh) for t in (hx, q))
        outs = []
        for n, x_c, q_c in zip(sizes, xs.split(sizes, dim=1), qs.split(sizes, dim=1)):
            o, R = self._fused_step(R_c, R, x_c, q_c, R_0, gate_bias, whole=n == self.chunk_size)
            outs.append(o)
            pos += n
            if pos == self.chunk_size:
                pos, R_c = 0, R
        o = torch.cat(outs, dim=1) if outs else xs[:, :0]
        S = mem.state_layout(R, B)
        S_c = S if R_c is R else mem.state_layout(R_c, B)
        return o.reshape(B, H, T, dh).transpose(1, 2), S, S_c, pos

    def _fused_step(self, R_c, R, x, q, R_0, gate_bias, whole: bool):
        mem = self.memories
        eager = fused_chunk_step_hand_grad if self.hand_backward else fused_chunk_step
        if self.compile_backend is None or not whole:  # partial chunks stay eager: one compiled shape per layer
            return mem.fused_chunk(R_c, R, x, q, R_0, gate_bias, step=eager)
        if self.hand_backward:  # the hand-written forward and backward, each compiled without autograd
            step = functools.partial(fused_chunk_step_hand_grad, compile=self.compile_backend)
        else:  # the compiler derives the backward of the reference step
            step = compiled(fused_chunk_step, self.compile_backend)
        try:
            return mem.fused_chunk(R_c, R, x, q, R_0, gate_bias, step=step)
        except Exception as err:  # e.g. no C compiler for inductor: the eager step computes the same thing
            warn_eager_fallback("self-modifying Titans chunk step", self.compile_backend, err, stacklevel=2)
            self.compile_backend = None
            return mem.fused_chunk(R_c, R, x, q, R_0, gate_bias, step=eager)

    def compile_chunk_step(self, backend: str | None = "inductor") -> SelfModifyingTitans:
        """Run every whole Eq 90 chunk through ``torch.compile`` (one compiled copy shared by all layers; partial
        chunks at a call's edges stay eager). MLP memories in the fused mode only. With ``hand_backward`` (the
        default) the step's hand-written forward and backward are compiled, each as a function without autograd;
        without it ``fused_chunk_step`` is compiled and the compiler derives its backward.

        On a 2-core CPU (T=512) HOPE tiny's training step ran 1.19x / 1.15x / 1.21x faster with the first than with
        the eager step at 1 thread / 2 threads with passive OpenMP waiting / with active waiting, and 0.99x / 1.02x /
        1.03x the second (``benchmarks/bench_hope_chunk_step.py``). HOPE tiny's first step took 60 s with an empty
        kernel cache (inductor builds C++ kernels for the forward and the backward's variants), 6 s with the cache
        a previous process left (0.9 s eager). If the forward fails to compile, a warning is issued and the eager
        step runs instead; if the backward does, it warns once and runs its backward eagerly. ``backend=None``
        switches back to eager."""
        if backend is not None and not self.fused:
            raise ValueError("compile_chunk_step needs the MLP memories in op_mode='fused'")
        self.compile_backend = backend
        return self

    def compile_whole_chunk_calls(self, backend: str | None = "inductor") -> SelfModifyingTitans:
        """Run every call that is exactly one whole chunk aligned to the stream (a CMS language model's segments
        when the chunk is the segment, as in HOPE) through ``torch.compile`` of the whole layer: convolution,
        projections, the Eq 90 chunk step, norm, gate and output in one graph, whose backward the compiler derives
        from the reference step (``fused_chunk_step``). Other calls run as before (with ``compile_chunk_step``'s
        compiled step if set). MLP memories in the fused mode only.

        Against the compiled chunk step alone, HOPE tiny trained at 869 against 737 tokens/s (T=512, 2 threads,
        passive OpenMP waiting; 796 against 692 at 1 thread; ``benchmarks/bench_hope_chunk_step.py``, the forms
        "compiled-layer" and "compiled-hand", docs/results/bench_hope_chunk_step.md). With inductor the graph's small batched products become loops of the
        compiler's own (``whole_chunk_small_products``): 1.02-1.07x against one library call per product, at 1 and 2
        threads, either OpenMP wait policy, on an AMD EPYC (the same benchmark, "compiled-layer" against
        "compiled-layer-bmm"); 0.98-1.01x on an Intel Xeon, where fewer products become loops
        (``compiled_steps.small_products_options``).
        A training stream's calls run one compiled graph per batch size, its first call included
        (``_state_like_later_calls``): HOPE tiny's first training step took 34-36 s with an empty kernel cache and
        7-8 s with a warm one, and the second ran at full speed (T=512, 2 threads); with the C++ wrapper
        (``whole_chunk_cpp_wrapper``, the default on Intel CPUs: 1.04-1.06x faster steps there) 57 s and 11 s.
        If compilation fails, a warning is issued and such calls run as before; ``backend=None`` switches back. A
        compiled graph has no double backward: inside :func:`second_order_calls` (a CMS language model in meta mode
        enters it) such calls run as before."""
        if backend is not None and not self.fused:
            raise ValueError("compile_whole_chunk_calls needs the MLP memories in op_mode='fused'")
        self.whole_chunk_backend = backend
        return self

    def _whole_chunk_options(self, x: torch.Tensor) -> tuple:
        """``compiled``'s backend, small_products and cpp_wrapper for a whole-chunk call on ``x``."""
        cpp = self.whole_chunk_cpp_wrapper and x.device.type == "cpu"
        return self.whole_chunk_backend, self.whole_chunk_small_products, cpp

    def _compiles_call(self, x: torch.Tensor, state) -> bool:
        return (
            self.whole_chunk_backend is not None
            and not getattr(_SECOND_ORDER, "on", False)
            and not torch.compiler.is_compiling()
            and x.shape[1] == self.chunk_size
            and (state is None or state.pos == 0)
        )

    def forward(self, x: torch.Tensor, state: SelfModifyingTitansState | None = None):
        """x: (B, T, dim) -> y: (B, T, dim), new state."""
        if self._compiles_call(x, state):
            check_layer_input(x, self.dim)  # here: its test on the values would break the compiled graph
            try:
                call = compiled(SelfModifyingTitans._forward, *self._whole_chunk_options(x))
                return call(self, x, _state_like_later_calls(x, state), False)
            except Exception as err:  # e.g. no C compiler for inductor: the eager layer computes the same thing
                warn_eager_fallback("self-modifying Titans layer", self.whole_chunk_backend, err, stacklevel=2)
                self.whole_chunk_backend = None
        return self._forward(x, state)

    def residual_forward(
        self, x: torch.Tensor, norm: nn.Module, state: SelfModifyingTitansState | None = None,
        next_norm: nn.Module | None = None,
    ):
        """A pre-norm residual block's mixer half: ``(r, next_norm(r) or None, state)`` with ``r = x +
        self(norm(x))``. A call that ``compile_whole_chunk_calls`` compiles takes the norms and the residual sum
        into the layer's graph (their small ops fuse into its kernels, and autograd records one node instead of a
        few dozen)."""
        if self._compiles_call(x, state):
            check_layer_input(x, self.dim)
            try:
                call = compiled(SelfModifyingTitans._residual_forward, *self._whole_chunk_options(x))
                return call(self, _row_major(x), norm, _state_like_later_calls(x, state), next_norm)
            except Exception as err:  # e.g. no C compiler for inductor: the eager layer computes the same thing
                warn_eager_fallback("self-modifying Titans layer", self.whole_chunk_backend, err, stacklevel=2)
                self.whole_chunk_backend = None
        y, state = self(norm(x), state)
        r = x + y
        return r, (None if next_norm is None else next_norm(r)), state

    def _residual_forward(self, x, norm, state, next_norm):
        y, state = self._forward(norm(x), state, False)
        r = x + y
        return r, (None if next_norm is None else next_norm(r)), state

    def _forward(self, x: torch.Tensor, state, check: bool = True):
        span = BackwardOnOneThread(x)  # the backward of the chunk loop's small ops: one thread too (see ops.threads)
        x = span.input(x)
        o, state = self.read(x, state, check)
        y = rearrange(self.out_norm(o.to(x.dtype)), "b t h d -> b t (h d)")
        if self.to_gate is not None:
            y = y * F.silu(self.to_gate(x))
        return span.output(self.to_out(y)), state
