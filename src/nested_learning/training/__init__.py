"""Training: the model-agnostic trainer, configs, checkpoints and torch.distributed set-up."""

from nested_learning.training.config import TrainConfig, apply_overrides, load_config, parse_overrides
from nested_learning.training.trainer import Trainer, TrainingDiverged, evaluate_loss

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "apply_overrides", "evaluate_loss", "load_config",
           "parse_overrides"]
