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
