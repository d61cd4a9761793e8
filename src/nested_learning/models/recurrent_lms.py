"""Recurrent baselines of the paper's comparisons: Titans (neural long-term memory) and DeltaNet language models.

Both are :class:`BlockLM` stacks, ``x + mixer(norm(x)); x + SwiGLU(norm(x))``, with a memory layer as the mixer,
so they share every line but the mixer with Transformer++. Their state is the memories' fast weights: memory per
token does not grow with the stream.
"""

from __future__ import annotations

import dataclasses

from nested_learning.memory import DeltaNetLayer, NeuralMemory
from nested_learning.models.block_lm import BlockLM
from nested_learning.models.layers import SwiGLU


@dataclasses.dataclass
class RecurrentLMConfig:
    vocab_size: int = 50257
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    chunk_size: int = 64
    memory_grad_clip: float | None = 1.0  # Titans: per-token gradient norm bound of the memory (NeuralMemory)
    mlp_hidden: int | None = None
    norm_eps: float = 1e-6
    init_std: float = 0.02


RECURRENT_PRESETS: dict[str, RecurrentLMConfig] = {
    "tiny": RecurrentLMConfig(dim=128, n_layers=2, n_heads=4),
    "small": RecurrentLMConfig(dim=256, n_layers=4, n_heads=4),
    "760M": RecurrentLMConfig(dim=1536, n_layers=24, n_heads=16),
    "1.3B": RecurrentLMConfig(dim=2048, n_layers=24, n_heads=16),
}


def _config(size: str, overrides: dict) -> RecurrentLMConfig:
    if size not in RECURRENT_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(RECURRENT_PRESETS)}")
    return dataclasses.replace(RECURRENT_PRESETS[size], **overrides)


class TitansLM(BlockLM):
    """Titans (LMM): Titans' neural memory (MLP memory, momentum, chunk-wise updates, Eq 90) as the mixer."""

    def __init__(self, config: RecurrentLMConfig | None = None, memory: str = "mlp", **overrides):
        config = dataclasses.replace(config or RecurrentLMConfig(), **overrides)
        self.config = config
        super().__init__(config.vocab_size, config.dim, config.n_layers,
                         make_mixer=lambda i: NeuralMemory(config.dim, config.n_heads, config.chunk_size, memory=memory,
                                                           grad_clip=config.memory_grad_clip),
                         make_mlp=lambda i: SwiGLU(config.dim, config.mlp_hidden),
                         norm_eps=config.norm_eps, init_std=config.init_std, reinit_mixers=False)


class DeltaNetLM(BlockLM):
    """DeltaNet: the delta rule (Eq 65) with a chunk-parallel form as the mixer."""

    def __init__(self, config: RecurrentLMConfig | None = None, **overrides):
        config = dataclasses.replace(config or RecurrentLMConfig(), **overrides)
        self.config = config
        super().__init__(config.vocab_size, config.dim, config.n_layers,
                         make_mixer=lambda i: DeltaNetLayer(config.dim, config.n_heads, config.chunk_size),
                         make_mlp=lambda i: SwiGLU(config.dim, config.mlp_hidden),
                         norm_eps=config.norm_eps, init_std=config.init_std, reinit_mixers=False)


def build_titans(size: str = "tiny", **overrides) -> TitansLM:
    memory = overrides.pop("memory", "mlp")
    return TitansLM(_config(size, overrides), memory=memory)


def build_deltanet(size: str = "tiny", **overrides) -> DeltaNetLM:
    return DeltaNetLM(_config(size, overrides))
