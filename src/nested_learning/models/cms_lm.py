"""The skeleton of HOPE and HOPE-attention: a pre-norm residual LM whose MLPs are CMS levels that learn in context.

``x -> embed -> N x [x + mixer(norm(x)); x + (CMS(norm(x)) - norm(x))] -> norm -> tied LM head``. The CMS chain's own
residual connections (Eq 70) are the block's residual connection, hence ``- norm(x)``: the stream is not fed the
normalised input a second time. The mixer (self-modifying Titans or softmax attention) follows the layer contract.

Test-time learning (Eq 71 with the "lm" objective, Eq 8-9). The model processes a stream in SEGMENTS of C_min =
min(chunk_sizes) tokens aligned to stream positions. For each segment it runs all blocks (mixer states carried, CMS
fast weights read from the state) and computes the segment's logits; then

    L_seg = sum_{t, t+1 in segment} CE(logits_t, x_{t+1})        (next token inside the segment: no labels needed)

is differentiated w.r.t. every level of every layer with ONE ``torch.autograd.grad`` call: the local surprise signal
of the LM loss at each level's output, carried back to its weights (backprop as an associative memory from inputs to
their errors, Eq 8-9). The call asks for the gradients w.r.t. this segment's level activations (pre-activation and
branch output), from which the weight gradients are outer products summed over the segment; so it is the gradient of
this segment's loss with the state at the segment start (mixer memories, KV cache) held fixed, and the outer graph
through the weights stays intact. Each level accumulates its segment gradients and takes its step when
its chunk ends (``ContinuumMemorySystem.step``). Since a level is constant over its chunk, summing segment gradients
is exact; the only pairs left out are the C/C_min - 1 pairs (last token of a segment, first of the next) that cross a
segment boundary inside a level's chunk. ``objective="next_input"`` uses the CMS's own local objective instead.
While training in first order each block's chain is read as one autograd node (``memory/cms_chain_read.py``): the
call then asks for the gradient at the read's input, and the node hands over its levels' weight gradients (the same
outer products).

Modes: ``"first_order"`` detaches the inner gradients (the outer optimizer still learns the slow initial weights
through the identity path of theta = theta_0 - eta * sum g, and eta through eta * g); ``"meta"`` keeps their graph
(create_graph) so the outer gradient flows THROUGH the inner updates (second order; per level with the CMS's
``transfer="backprop"``; softmax attention then runs its
math kernel, the only one with a double backward on CPU). In no-grad use the inner gradient is still computed (under
``torch.enable_grad``); every tensor the model returns is then detached.

Exact streaming. The returned state is the state at the start of the PENDING segment (every mixer state and CMS
level at that point) plus the pending tokens; the next call re-runs them from there (their logits were already
returned) and continues, so a stream split at any token gives the same logits as one call. Cost: at most one partial
segment (< C_min tokens) recomputed per call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nested_learning.memory.cms import ContinuumMemorySystem, segment_bounds
from nested_learning.memory.cms_chain_read import ChainRead
from nested_learning.memory.self_modifying_chunk_grad import inputs_only_gradients
from nested_learning.memory.self_modifying_titans import second_order_calls
from nested_learning.memory.state import LayerState
from nested_learning.models.base import LanguageModel, ModelOutput, check_input_ids, check_labels
from nested_learning.models.layers import RMSNorm
from nested_learning.models.state_checks import check_cms_lm_call
from nested_learning.models.tied_head import SegmentedHead
from nested_learning.ops.threads import BackwardOnOneThread, caller_threads, one_thread_if_threads_sleep

OBJECTIVES = ("lm", "next_input")


@dataclasses.dataclass
class CMSLMState(LayerState):
    """The stream state at the start of the pending segment. mixers: one state per block (Titans memories or KV
    cache). cms: one :class:`CMSState` per block (fast weights and gradient accumulators of every level).
    pending: (B, P) ids of the unfinished segment, 0 <= P < C_min. position: stream position of pending[:, 0]."""

    mixers: list
    cms: list
    pending: torch.Tensor
    position: int

    @property
    def length(self) -> int:
        """Tokens consumed by the stream so far."""
        return self.position + self.pending.shape[1]


class CMSBlock(nn.Module):
    """``x + mixer(norm1(x))``, then the CMS chain on ``norm2(x)``; with ``cms=None`` a plain, frozen ``mlp``
    instead (a layer of a pretrained model that is kept as it is)."""

    def __init__(
        self, dim: int, mixer: nn.Module, cms: ContinuumMemorySystem | None, norm_eps: float = 1e-6,
        mlp: nn.Module | None = None,
    ):
        super().__init__()
        if (cms is None) == (mlp is None):
            raise ValueError("a block has either a CMS or a plain mlp")
        self.norm1, self.mixer = RMSNorm(dim, norm_eps), mixer
        self.norm2, self.cms, self.mlp = RMSNorm(dim, norm_eps), cms, mlp


class CMSLanguageModel(LanguageModel):
    """Embedding, blocks of (mixer, CMS), final norm, tied head; subclasses supply the mixer and its initial state.

    ``out = model(input_ids, state=None, labels=None)``; ``labels[:, t]`` is the target of position t (-100 ignored)
    and ``out.loss`` their mean cross-entropy (the outer objective). ``model.set_test_time_updates(False)`` freezes
    every CMS level (the "CMS frozen" baseline; the mixers keep their own in-context memory).

    ``fused_cms_read`` (default True): while training with the "lm" objective in first order, each block reads its
    CMS chain as one autograd node whose backward writes every level's weight gradient
    (``memory/cms_chain_read.py``); False reads it op by op with autograd's backward (the reference, equal to
    rounding). No-grad calls read op by op either way.

    ``fused_mixer_residual`` (default True): a mixer that offers ``residual_forward`` (self-modifying Titans) runs
    the block's ``x + mixer(norm1(x))`` and ``norm2`` of that in one call, inside its compiled graph when its layer
    calls are compiled (HOPE tiny's compiled training step 1.03-1.05x, docs/results/bench_hope_phases.md); False
    runs them op by op (the reference, equal to rounding).

    ``prepacked_head`` (default True): where the head's products go through oneDNN (``ops/fast_linear.py``, on x86
    CPUs not made by Intel), a call of at least ``tied_head.PREPACK_MIN_SEGMENTS`` segments reorders the head once
    for its segments' products instead of once per product (HOPE tiny's compiled training step 1.02-1.08x on an
    AMD EPYC, docs/results/bench_head_products.md); False reorders per product (equal to rounding).
    """

    fused_cms_read: bool = True
    fused_mixer_residual: bool = True
    prepacked_head: bool = True

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_layers: int,
        make_mixer,
        make_cms,
        objective: str = "lm",
        max_seq_len: int | None = None,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.vocab_size, self.dim, self.objective, self.max_seq_len = vocab_size, dim, objective, max_seq_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            CMSBlock(dim, make_mixer(i), make_cms(i), norm_eps) for i in range(n_layers)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.segment_size = self.blocks[0].cms.segment_size
        self._init_weights(init_std, n_layers)

    def _init_weights(self, std: float, n_layers: int) -> None:
        # GPT-2 style on the Linear/Embedding weights only (memories' own initial states keep their init); residual
        # output projections scaled down with depth; biases zero except the CMS gate, which stays uniform.
        if self.embed.weight.is_meta:  # shapes only (parameter counts of the large presets): nothing to fill
            return
        for name, mod in self.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)) and not name.endswith("cms.gate"):
                residual_out = name.endswith(("out", "to_out")) or ".cms.down." in name
                nn.init.normal_(
                    mod.weight, mean=0.0, std=std / math.sqrt(2 * n_layers) if residual_out else std
                )
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)

    # ------------------------------------------------------------------ state
    def mixer_initial_state(self, mixer: nn.Module, batch: int, device, dtype) -> LayerState:
        raise NotImplementedError

    def initial_state(self, batch: int, device=None) -> CMSLMState:
        """The state of a fresh stream: mixers and CMS levels at their (meta-learned) initial values."""
        device = device if device is not None else self.embed.weight.device
        dtype = torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32
        return CMSLMState(
            [self.mixer_initial_state(b.mixer, batch, device, dtype) for b in self.blocks],
            [b.cms.initial_state(batch, device, dtype) if b.cms is not None else None for b in self.blocks],
            torch.zeros(batch, 0, dtype=torch.long, device=device),
            0,
        )

    def cms_layers(self) -> list[ContinuumMemorySystem]:
        """The CMS of every block that has one."""
        return [b.cms for b in self.blocks if b.cms is not None]

    def levels_without_training_signal(self, seq_len: int) -> list[str]:
        """The CMS levels that never step inside a training window of ``seq_len`` tokens started from a fresh
        state: a level steps after positions C_l, 2 C_l, ..., and only tokens after a step see its new weights, so a
        level with C_l >= seq_len gets no outer gradient for its rate (nor, under "init" transfer, for the part of its
        slow weights that only its steps move), yet it steps at test time. Empty when every level trains."""
        names = []
        for i, block in enumerate(self.blocks):
            if block.cms is None:
                continue
            for lv, size in enumerate(block.cms.chunk_sizes):
                if size >= seq_len:
                    names.append(f"layer {i} CMS level {lv + 1} (chunk {size})")
        return names

    def set_test_time_updates(self, enabled: bool) -> None:
        for cms in self.cms_layers():
            cms.test_time_updates = bool(enabled)

    @property
    def test_time_updates(self) -> bool:
        return self.cms_layers()[0].test_time_updates

    # ------------------------------------------------------------------ one segment
    def _segment(self, x: torch.Tensor, mixers: list, cms: list, fused: bool = False):
        """All blocks on the embedded segment ``x: (B, S, d)`` with fixed fast weights; returns the final normed
        hidden state, the mixer states, and per block the CMS cache (``ContinuumMemorySystem.read``, ``fused`` as
        there). With ``fused_mixer_residual`` the mixer's call also takes the block's norms and residual sum."""
        new_mixers, caches = [], []
        for block, ms, cs in zip(self.blocks, mixers, cms):
            residual = getattr(block.mixer, "residual_forward", None) if self.fused_mixer_residual else None
            if residual is not None:
                x, u, ms = residual(x, block.norm1, ms, block.norm2)
            else:
                y, ms = block.mixer(block.norm1(x), ms)
                x = x + y
                u = block.norm2(x)
            if block.cms is None:
                x, cache = x + block.mlp(u), []
            else:
                y, cache = block.cms.read(u, cs.weights, fused=fused)
                x = x + (y - u)
            new_mixers.append(ms)
            caches.append(cache)
        return self.norm(x), new_mixers, caches

    def _inner_grads(
        self, probs, ids, h, W, caches, cms, outer: bool, meta: bool, probs_W=None
    ) -> list[list[torch.Tensor]]:
        """Per block, per level, the gradient of the segment's inner objective w.r.t. the flat fast weights.

        "lm": the loss's gradient at the final hidden state, dL/dh_t = (softmax_t - onehot(x_{t+1})) W (zero for the
        segment's last token), written out as softmax @ W - W[x_{t+1}] because (S, V) @ (V, d) with the head as
        stored is a fast GEMM and the softmax buffer is then left as it is (the outer backward reuses it; ``probs_W``,
        that product as the segmented head took it, time-major ``(S-1, B, d)``, outside meta mode); then one
        ``autograd.grad`` call from h to every level's pre-activation and branch output OF THIS SEGMENT
        (intermediate tensors, so the state at the segment start is held fixed and nothing else is computed). The
        weight gradients follow from these factors (``ContinuumMemorySystem.weight_grads``). A fused read
        (``ChainRead``) is asked for its input's gradient instead and hands over its levels' weight gradients."""
        if self.objective == "next_input":
            return [
                b.cms.local_grads(c, cs.weights, differentiable=meta and b.cms.mode == "meta", transfer_graph=meta)
                if b.cms is not None else []
                for b, c, cs in zip(self.blocks, caches, cms)
            ]
        with torch.set_grad_enabled(meta):  # probs: softmax at positions 0..S-2 of the segment
            dh = probs.to(W.dtype) @ W if meta else probs_W.transpose(0, 1)  # meta: (B, S-1, V) with graph
            dh = F.pad(dh - F.embedding(ids[:, 1:], W), (0, 0, 0, 1))  # (softmax - onehot(x_{t+1})) W
        # a fused read (ChainRead) puts its levels' weight gradients in its sink when asked for its input's gradient
        reads = [c for c in caches if isinstance(c, ChainRead)]
        factors = [r.u for r in reads] + [
            t for cache in caches if not isinstance(cache, ChainRead) for c in cache for t in c.factors
        ]
        for r in reads:
            r.sink.collect = True
        try:
            # every memory state of a later layer's Titans chunk steps was made by earlier segments, out of this
            # pass's reach: their hand-written backward skips those gradients
            with inputs_only_gradients():
                g = torch.autograd.grad(
                    h, factors, dh, retain_graph=outer, create_graph=meta, materialize_grads=True
                )
        finally:
            for r in reads:
                r.sink.collect = False
        out, i = [], len(reads)
        with torch.set_grad_enabled(meta):
            for block, cache in zip(self.blocks, caches):
                if isinstance(cache, ChainRead):
                    out.append(cache.sink.take())  # first order: no graph
                    continue
                levels = []
                for lv, c in enumerate(cache):
                    k = len(c.factors)
                    grad = block.cms.weight_grads(c, g[i : i + k])
                    levels.append(grad if block.cms.keeps_graph(lv) else grad.detach())
                    i += k
                out.append(levels)
        return out

    # ------------------------------------------------------------------ the stream
    def forward(
        self, input_ids: torch.Tensor, state: CMSLMState | None = None, labels: torch.Tensor | None = None
    ):
        check_input_ids(input_ids, self.vocab_size)
        B, T = input_ids.shape
        check_labels(labels, input_ids, self.vocab_size)
        check_cms_lm_call(self, state, input_ids)
        if state is None:
            state = self.initial_state(B, input_ids.device)
        if self.max_seq_len is not None and state.length + T > self.max_seq_len:
            raise ValueError(
                f"stream length {state.length + T} exceeds the model's limit of {self.max_seq_len} tokens"
            )
        P = state.pending.shape[1]
        ids = torch.cat([state.pending.to(input_ids.device), input_ids.long()], dim=1)
        learn, C = self.test_time_updates, self.segment_size
        outer = torch.is_grad_enabled()
        # meta mode, or a level whose transfer is "backprop": some inner gradients keep their graph
        meta = outer and any(cms.keeps_graph(lv) for cms in self.cms_layers() for lv in range(cms.n_levels))
        # Except in meta mode (where the inner gradients depend on the head, so every segment keeps its own graph),
        # the logits are computed without graph into one buffer, and TiedHead attaches the head's graph once per call
        # (exact: first-order inner gradients are detached, so the inner computation never enters the outer graph).
        direct = not meta
        W = self.head.weight
        # (d, V), a view: the GEMMs take the transposed operand as stored, and every segment's two products with the
        # head then stream one matrix instead of two
        Wt = (W if meta else W.detach()).t()
        kernel = (lambda: sdpa_kernel([SDPBackend.MATH])) if meta else contextlib.nullcontext
        # the CMS chain as one node whose backward writes the weight gradients (first-order "lm" inner gradients);
        # in training only: what it saves is mostly the outer backward's nodes, and in a no-grad stream the
        # op-by-op read was as fast or faster (docs/results/bench_cms_read.md)
        fused = self.fused_cms_read and self.objective == "lm" and not meta and outer
        # the backward is the segment loop's small ops in reverse: one thread too (restored when the pass ends)
        backward_span = BackwardOnOneThread(W)
        x_all = self.embed(ids)
        head = SegmentedHead(ids.shape, W, direct, keep_probs=direct and outer and labels is not None,
                             segment=C if self.prepacked_head else None)
        mixers, cms, start, position = list(state.mixers), list(state.cms), 0, state.position
        # segment after segment of small ops: on one thread when idle threads sleep (the head takes them back);
        # meta mode differentiates the mixers' backward again, which compiled layer calls do not support
        with one_thread_if_threads_sleep(ids.device), second_order_calls() if meta else contextlib.nullcontext():
            for a, b in segment_bounds(ids.shape[1], C, split=learn):
                ends_on_boundary = b % C == 0
                inner = learn and ends_on_boundary and b - a > 1
                with torch.set_grad_enabled(outer or inner), kernel():
                    x = x_all[:, a:b]
                    if inner and not x.requires_grad:  # e.g. frozen parameters: the inner gradient needs a graph
                        x = x.detach().requires_grad_()
                    h, new_mixers, caches = self._segment(x, mixers, cms, fused)
                    probs = head.segment(h, Wt, a, b, need_probs=inner)
                    grads = None
                    if inner:
                        Wi = W if meta else W.detach()
                        probs_W = head.probs_W_block(a, b - 1)
                        if probs_W is None and direct and self.objective == "lm":  # not kept: taken here
                            with caller_threads():
                                probs_W = head.softmax_W(probs)
                        grads = self._inner_grads(probs, ids[:, a:b], h, Wi, caches, cms, outer, meta, probs_W)
                if not outer:
                    new_mixers = [m.detach() for m in new_mixers]
                if ends_on_boundary:  # the state here is the new snapshot; levels whose chunk ends here take their step
                    end = state.position + b
                    if learn:
                        cms = [
                            blk.cms.step(cs, g, end) if blk.cms is not None else None
                            for blk, cs, g in zip(self.blocks, cms, grads or [None] * len(cms))
                        ]
                    else:
                        cms = [dataclasses.replace(cs, position=end) if cs is not None else None for cs in cms]
                    mixers, start, position = new_mixers, b, end
        logits, loss = head.finish(P, labels)
        if loss is not None:
            logits, loss = backward_span.outputs(logits, loss)
        else:
            logits = backward_span.output(logits)
        new_state = CMSLMState(mixers, cms, ids[:, start:], position)
        keep_graph = outer and (self.training or self.keep_state_graph)  # eval: the state leaves the graph
        return ModelOutput(logits, loss, new_state if keep_graph else new_state.detach())

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n
