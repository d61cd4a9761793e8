"""Language models built from the memories: Transformer++ (baseline), and the paper's models by name."""

from nested_learning.models.base import LanguageModel, ModelOutput
from nested_learning.models.registry import build_model, model_names, register_model
from nested_learning.models.transformer import TRANSFORMER_PRESETS, TransformerConfig, TransformerPP

__all__ = [
    "LanguageModel",
    "ModelOutput",
    "TRANSFORMER_PRESETS",
    "TransformerConfig",
    "TransformerPP",
    "build_model",
    "model_names",
    "register_model",
]

from nested_learning.models.cms_lm import CMSLanguageModel, CMSLMState  # noqa: E402
from nested_learning.models.hope import HOPE  # noqa: E402
from nested_learning.models.hope_attention import HOPEAttention  # noqa: E402
from nested_learning.models.hope_config import HOPE_ATTENTION_PRESETS, HOPE_PRESETS, HOPEConfig  # noqa: E402
from nested_learning.models.state_io import load_state, save_state  # noqa: E402

__all__ += [
    "CMSLMState",
    "CMSLanguageModel",
    "HOPE",
    "HOPEAttention",
    "HOPEConfig",
    "HOPE_ATTENTION_PRESETS",
    "HOPE_PRESETS",
    "load_state",
    "save_state",
]
