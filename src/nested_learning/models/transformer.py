"""Transformer++ baseline: pre-norm RMSNorm, RoPE, SwiGLU MLP, causal SDPA attention, tied embeddings.

In the paper's terms it is a two-level system (Section 3.1 of the sources): attention is a non-parametric memory of
frequency infinity, and the MLP and projections are level-infinity weights that never change after training.
"""

from __future__ import annotations

import dataclasses

from nested_learning.models.attention import CausalSelfAttention
from nested_learning.models.block_lm import BlockLM
from nested_learning.models.layers import SwiGLU


@dataclasses.dataclass
class TransformerConfig:
    vocab_size: int = 50257
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 2048
    mlp_hidden: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02


TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    "tiny": TransformerConfig(dim=128, n_layers=2, n_heads=4, max_seq_len=16384),
    "small": TransformerConfig(dim=256, n_layers=4, n_heads=4, max_seq_len=16384),
    "760M": TransformerConfig(dim=1536, n_layers=24, n_heads=16, max_seq_len=4096),
    "1.3B": TransformerConfig(dim=2048, n_layers=24, n_heads=16, max_seq_len=4096),
}


class TransformerPP(BlockLM):
    """Transformer++; ``TransformerPP(TransformerConfig(...))`` or ``TransformerPP.from_preset("tiny")``.

    State: the per-layer KV caches. A stream longer than ``max_seq_len`` raises ``ValueError``.
    """

    def __init__(self, config: TransformerConfig | None = None, **overrides):
        config = dataclasses.replace(config or TransformerConfig(), **overrides)
        self.config = config
        super().__init__(
            config.vocab_size,
            config.dim,
            config.n_layers,
            make_mixer=lambda i: CausalSelfAttention(config.dim, config.n_heads, config.rope_theta, config.max_seq_len),
            make_mlp=lambda i: SwiGLU(config.dim, config.mlp_hidden),
            max_seq_len=config.max_seq_len,
            norm_eps=config.norm_eps,
            init_std=config.init_std,
        )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TransformerPP:
        if name not in TRANSFORMER_PRESETS:
            raise ValueError(f"unknown Transformer++ preset {name!r}; choose from {sorted(TRANSFORMER_PRESETS)}")
        return cls(TRANSFORMER_PRESETS[name], **overrides)
