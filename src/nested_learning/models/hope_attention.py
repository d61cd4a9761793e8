"""HOPE-attention: softmax attention followed by a Continuum Memory System (the paper's simpler HOPE variant).

    o = softmax(Q K^T / sqrt(d)) V           causal, RoPE, KV cache (``models/attention.CausalSelfAttention``)
    y_t = MLP^(f_k)(... MLP^(f_1)(norm(x)))  CMS levels learning in context (Eq 70-71)

It is Transformer++ with the frozen MLP replaced by CMS levels: attention is the level of frequency infinity, the
CMS levels sit at 1/16, 1/64, 1/256 of the token rate, the slow weights at frequency 0. Unlike HOPE, its state grows
with the stream by nature (the KV cache: 2 * n_layers * dim floats per token per sequence); ``max_seq_len`` bounds it.
"""

from __future__ import annotations

import dataclasses

import torch

from nested_learning.models.attention import CausalSelfAttention, KVCache
from nested_learning.models.cms_lm import CMSLanguageModel
from nested_learning.models.hope import make_cms
from nested_learning.models.hope_config import HOPE_ATTENTION_PRESETS, HOPEConfig, preset


class HOPEAttention(CMSLanguageModel):
    """``HOPEAttention(HOPEConfig(...))``, ``HOPEAttention(dim=..., ...)`` or ``HOPEAttention.from_preset("tiny")``."""

    def __init__(self, config: HOPEConfig | None = None, **overrides):
        config = dataclasses.replace(config or HOPEConfig(), **overrides)
        self.config = config
        super().__init__(
            config.vocab_size,
            config.dim,
            config.n_layers,
            make_mixer=lambda i: CausalSelfAttention(
                config.dim, config.n_heads, config.rope_theta, config.max_seq_len
            ),
            make_cms=lambda i: make_cms(config),
            objective=config.cms_objective,
            max_seq_len=config.max_seq_len,
            norm_eps=config.norm_eps,
            init_std=config.init_std,
        )

    def mixer_initial_state(self, mixer, batch, device, dtype):
        # an empty cache: attention treats it as the start of the stream
        empty = torch.zeros(
            batch, mixer.n_heads, 0, mixer.head_dim, device=device, dtype=self.embed.weight.dtype
        )
        return KVCache(empty, empty.clone())

    @classmethod
    def from_preset(cls, name: str, **overrides) -> HOPEAttention:
        return cls(preset(HOPE_ATTENTION_PRESETS, "hope_attention", name), **overrides)
