"""A pretrained Llama-family LM turned into Hope (Sec 7.3): every chosen layer's MLP becomes a Continuum Memory
System whose levels start from the pretrained MLP (knowledge transfer by initialisation, Eq 72-73), attention kept.

The result is HOPE-attention's shape (``models/hope_attention.py``) built from a pretrained model, and it is a
:class:`~nested_learning.models.cms_lm.CMSLanguageModel`: the levels learn at test time with the LM surprise
objective (Eq 71 with the next-token loss, Eq 8-9), a stream can be split anywhere, the state saves and loads,
``set_test_time_updates(False)`` freezes the levels.

Stacking schemes (how k levels are made from one MLP; both give exactly the original model before any update):

    "copies"  every level is a copy of the MLP, aggregated by Eq 74 (independent levels) with the input gate at zero,
              i.e. y = u + sum_l (1/k) MLP_l(u): each copy learns at its own frequency 1/C_l.
    "added"   the chain of Eq 70 with the pretrained MLP as the slowest level, and faster levels added in front of
              it whose gate and up projections copy the MLP's and whose down projection starts at zero: they start
              as the identity and learn to correct the MLP's input from the stream.

The attention keeps a sliding window of ``window`` tokens (default: the model's position limit), so a stream can
run past it; what leaves the window is kept only by the CMS levels.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn as nn

from nested_learning.memory.cms import ContinuumMemorySystem
from nested_learning.models.base import LanguageModel
from nested_learning.models.cms_lm import OBJECTIVES, CMSBlock, CMSLanguageModel
from nested_learning.models.pretrained.attention import WindowedLlamaAttention
from nested_learning.models.pretrained.loading import check_llama_family

SCHEMES = ("copies", "added")


@dataclasses.dataclass
class HopeifyConfig:
    """layers: indices of the decoder layers whose MLP becomes a CMS (None: all). chunk_sizes: C_l of the levels.
    inner_lr / max_inner_lr / grad_clip / mode: as in :class:`ContinuumMemorySystem`. window: attention span in
    tokens (None: the model's ``max_position_embeddings``). train_only_cms: only the CMS parameters (levels'
    initial weights, rates, gates) require grad."""

    layers: tuple | None = None
    chunk_sizes: tuple = (16, 256)
    scheme: str = "added"
    inner_lr: float = 1e-2
    max_inner_lr: float = 1.0
    grad_clip: float | None = 1.0
    mode: str = "first_order"
    objective: str = "lm"
    window: int | None = None
    train_only_cms: bool = False  # continual pre-training of the CMS levels alone, the pretrained rest frozen

    def __post_init__(self):
        self.chunk_sizes = tuple(int(c) for c in self.chunk_sizes)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


def cms_from_mlp(mlp: nn.Module, cfg: HopeifyConfig) -> ContinuumMemorySystem:
    """A SwiGLU CMS whose levels are initialised from ``mlp`` (``gate_proj``, ``up_proj``, ``down_proj``)."""
    dim, hidden = mlp.gate_proj.in_features, mlp.gate_proj.out_features
    if any(getattr(m, "bias", None) is not None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
        raise ValueError("MLPs with biases are not supported (a Llama MLP has none)")
    cms = ContinuumMemorySystem(
        dim, cfg.chunk_sizes, variant="independent" if cfg.scheme == "copies" else "sequential",
        inner_lr=cfg.inner_lr, max_inner_lr=cfg.max_inner_lr, mode=cfg.mode, grad_clip=cfg.grad_clip,
        level_form="swiglu", hidden=hidden,
    ).to(device=mlp.gate_proj.weight.device, dtype=mlp.gate_proj.weight.dtype)
    slowest = cms.n_levels - 1
    with torch.no_grad():
        for lv in range(cms.n_levels):
            cms.gate_proj[lv].weight.copy_(mlp.gate_proj.weight)
            cms.up[lv].weight.copy_(mlp.up_proj.weight)
            if cfg.scheme == "copies" or lv == slowest:
                cms.down[lv].weight.copy_(mlp.down_proj.weight)
            else:
                cms.down[lv].weight.zero_()
    return cms


class HopeifiedLM(CMSLanguageModel):
    """``HopeifiedLM(hf_model, HopeifyConfig(...), tokenizer=None)``; use :func:`hopeify`.

    Holds the pretrained embedding, attention, norms and head (copies, unless built with ``copy_model=False``) and
    one :class:`ContinuumMemorySystem` per chosen layer; other layers keep their MLP as a frozen block."""

    def __init__(self, hf_model: nn.Module, config: HopeifyConfig, tokenizer=None, copy_model: bool = True):
        LanguageModel.__init__(self)
        hf_config = hf_model.config
        check_llama_family(hf_config)
        if copy_model:
            hf_model = copy.deepcopy(hf_model)
        base = hf_model.model
        n_layers = len(base.layers)
        layers = tuple(range(n_layers)) if config.layers is None else config.layers
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad or not layers:
            raise ValueError(f"layers must be indices in [0, {n_layers}), got {config.layers}")
        limit = int(hf_config.max_position_embeddings)
        window = limit if config.window is None else int(config.window)
        if not 1 <= window <= limit:
            raise ValueError(f"window must lie in [1, {limit}] (the model's position limit), got {config.window}")
        self.config, self.hf_config, self.tokenizer, self.window = config, hf_config, tokenizer, window
        self.vocab_size, self.dim = int(hf_config.vocab_size), int(hf_config.hidden_size)
        self.objective, self.max_seq_len = config.objective, None
        n_heads, n_kv = int(hf_config.num_attention_heads), int(hf_config.num_key_value_heads)
        head_dim = getattr(hf_config, "head_dim", None) or self.dim // n_heads
        self.embed, self.norm, self.head = base.embed_tokens, base.norm, hf_model.lm_head
        blocks = []
        for i, layer in enumerate(base.layers):
            mixer = WindowedLlamaAttention(layer.self_attn, base.rotary_emb, n_heads, n_kv, head_dim, window)
            if i in layers:
                block = CMSBlock(self.dim, mixer, cms_from_mlp(layer.mlp, config))
            else:
                block = CMSBlock(self.dim, mixer, None, mlp=layer.mlp)
            block.norm1, block.norm2 = layer.input_layernorm, layer.post_attention_layernorm
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.segment_size = min(config.chunk_sizes)
        self.hopeified_layers = layers
        if config.train_only_cms:
            cms_params = {id(p) for cms in self.cms_layers() for p in cms.parameters()}
            for p in self.parameters():
                p.requires_grad_(id(p) in cms_params)

    def mixer_initial_state(self, mixer, batch, device, dtype):
        return mixer.initial_state(batch, device, self.embed.weight.dtype)


def hopeify(model: nn.Module, tokenizer=None, copy_model: bool = True, **options) -> HopeifiedLM:
    """Turn a ``transformers`` Llama-family causal LM into Hope; ``options`` are :class:`HopeifyConfig`'s fields.

    ``hopeify(model, layers=range(20, 30), chunk_sizes=(16, 256), scheme="added", inner_lr=1e-2, window=512)``.
    With test-time updates off, or every inner rate 0, its logits are the original model's."""
    if "layers" in options and options["layers"] is not None:
        options["layers"] = tuple(options["layers"])
    return HopeifiedLM(model, HopeifyConfig(**options), tokenizer=tokenizer, copy_model=copy_model).eval()
