"""Language models built from the memories: HOPE, HOPE-attention, Titans, DeltaNet and the Transformer++ baseline.

``build_model(name, size, **overrides)`` builds any of them by name (``model_names()`` lists the names).
"""

from nested_learning.models.base import LanguageModel, ModelOutput
from nested_learning.models.cms_lm import CMSLanguageModel, CMSLMState
from nested_learning.models.hope import HOPE
from nested_learning.models.hope_attention import HOPEAttention
from nested_learning.models.hope_config import HOPE_ATTENTION_PRESETS, HOPE_PRESETS, HOPEConfig
from nested_learning.models.pretrained import HopeifiedLM, hopeify, load_pretrained
from nested_learning.models.recurrent_lms import RECURRENT_PRESETS, DeltaNetLM, RecurrentLMConfig, TitansLM
from nested_learning.models.registry import build_model, model_names, register_model
from nested_learning.models.state_io import load_state, save_state
from nested_learning.models.transformer import TRANSFORMER_PRESETS, TransformerConfig, TransformerPP

__all__ = [
    "CMSLMState",
    "CMSLanguageModel",
    "DeltaNetLM",
    "HOPE",
    "HOPEAttention",
    "HOPEConfig",
    "HOPE_ATTENTION_PRESETS",
    "HOPE_PRESETS",
    "HopeifiedLM",
    "LanguageModel",
    "ModelOutput",
    "RECURRENT_PRESETS",
    "RecurrentLMConfig",
    "TRANSFORMER_PRESETS",
    "TitansLM",
    "TransformerConfig",
    "TransformerPP",
    "build_model",
    "hopeify",
    "load_pretrained",
    "load_state",
    "model_names",
    "register_model",
    "save_state",
]
