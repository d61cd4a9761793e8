"""HOPE (Eq 94-97): self-modifying Titans followed by a Continuum Memory System, in every block.

    o_t = SMT(norm(x))_t                      Eq 94-96: Titans memories that generate their own keys, values, rates
    y_t = MLP^(f_k)(... MLP^(f_1)(norm(x)))   Eq 97 / 70: CMS levels, level l learning in context every C_l tokens

Each block is ``x + SMT(norm(x))`` then ``x + (CMS(norm(x)) - norm(x))`` (pre-norm residuals), with embeddings and a
tied LM head. The two memories are the two ends of the spectrum: Titans learns every token with an expressive rule
and small capacity; the CMS levels learn every 16, 64, 256 tokens with plain gradient steps and large capacity. The
stream state (``CMSLMState``) holds every fast weight -- the Titans memories and all CMS levels -- so memory per token
does not grow with the stream; ``save_state`` / ``load_state`` (``models/state_io.py``) keep it across restarts.

    model = HOPE(dim=512, n_layers=12, n_heads=8, chunk_sizes=[16, 64, 256], vocab_size=50257)
    model = HOPE.from_preset("hope-tiny")          # or build_model("hope", "tiny")
"""

from __future__ import annotations

import dataclasses

from nested_learning.memory.cms import ContinuumMemorySystem
from nested_learning.memory.self_modifying_titans import SelfModifyingTitans
from nested_learning.models.cms_lm import CMSLanguageModel
from nested_learning.models.hope_config import HOPE_PRESETS, HOPEConfig, preset


def make_cms(config: HOPEConfig) -> ContinuumMemorySystem:
    cms = ContinuumMemorySystem(
        config.dim,
        config.chunk_sizes,
        config.cms_expansion,
        config.cms_variant,
        config.cms_inner_lr,
        config.cms_max_inner_lr,
        config.cms_mode,
        config.cms_grad_clip,
        transfer=config.cms_transfer,
    )
    cms.test_time_updates = config.test_time_updates
    return cms


class HOPE(CMSLanguageModel):
    """HOPE; ``HOPE(HOPEConfig(...))``, ``HOPE(dim=..., n_layers=...)`` or ``HOPE.from_preset("hope-760m")``."""

    def __init__(self, config: HOPEConfig | None = None, **overrides):
        config = dataclasses.replace(config or HOPEConfig(), **overrides)
        self.config = config
        super().__init__(
            config.vocab_size,
            config.dim,
            config.n_layers,
            make_mixer=lambda i: SelfModifyingTitans(
                config.dim,
                config.n_heads,
                config.titans_chunk_size,
                objective=config.titans_objective,
                memory=config.titans_memory,
                value_norm=config.titans_value_norm,
                retention=config.titans_retention,
                conv_size=config.conv_size,
                hand_backward=config.titans_hand_backward,
                bounded_targets=config.titans_bounded_targets,
            ),
            make_cms=lambda i: make_cms(config),
            objective=config.cms_objective,
            norm_eps=config.norm_eps,
            init_std=config.init_std,
        )
        if config.titans_compile is not None:
            self.compile_chunk_steps(config.titans_compile, whole_chunk_calls=config.titans_compile_layer)

    def compile_chunk_steps(self, backend: str | None = "inductor", whole_chunk_calls: bool = True) -> HOPE:
        """``torch.compile`` every layer's self-modifying Titans chunk step (``SelfModifyingTitans.compile_chunk_step``)
        and, with ``whole_chunk_calls``, each layer call on one whole chunk as one graph
        (``SelfModifyingTitans.compile_whole_chunk_calls``: every segment, when the Titans chunk is the CMS segment);
        eager fallback with a warning if compilation fails; ``None`` returns to eager."""
        for block in self.blocks:
            block.mixer.compile_chunk_step(backend)
            block.mixer.compile_whole_chunk_calls(backend if whole_chunk_calls else None)
        return self

    def mixer_initial_state(self, mixer, batch, device, dtype):
        return mixer.initial_state(batch, device, dtype)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> HOPE:
        return cls(preset(HOPE_PRESETS, "hope", name), **overrides)
