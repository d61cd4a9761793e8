"""Optimizers as associative memories (torch.optim.Optimizer subclasses).

- Gradient descent read three ways: ``gd_step`` (Eq 1), ``steepest_descent_step`` (Eq 2), ``ftrl_step`` (Eq 3).
- Classic optimizers in their memory form: ``MomentumAsMemory`` (Eq 10-13, = SGD), ``AdamAsMemory``
  (Eq 101-105, = Adam), ``AdaGradAsMemory`` (Eq 106-111, = Adagrad).
- Deep optimizers: ``PreconditionedMomentum`` (Eq 33-37), ``DeltaRuleMomentum`` (Eq 48-49), feature maps
  (Eq 51, ``feature_map=``), ``DeepMomentumGD`` (Eq 50), ``Muon`` (Eq 52), ``M3`` (Algorithm 1).
- ``DGD`` (Eq 56-57) with ``record_linear_inputs``.
- ``build_optimizer`` / ``OPTIMIZER_NAMES`` for the trainer; ``muon_param_groups``, ``weight_decay_param_groups``.
"""

from .adagrad_memory import AdaGradAsMemory
from .adam_memory import AdamAsMemory
from .deep_momentum import DeepMomentumGD
from .delta_momentum import DeltaRuleMomentum
from .dgd import DGD
from .gd_forms import ftrl_step, gd_step, steepest_descent_step
from .linear_inputs import LinearInputRecorder, record_linear_inputs
from .m3 import M3
from .momentum_memory import MomentumAsMemory
from .muon import Muon
from .param_groups import muon_param_groups, weight_decay_param_groups
from .preconditioned import PreconditionedMomentum
from .registry import OPTIMIZER_NAMES, build_optimizer

__all__ = [
    "AdaGradAsMemory",
    "AdamAsMemory",
    "DGD",
    "DeepMomentumGD",
    "DeltaRuleMomentum",
    "LinearInputRecorder",
    "M3",
    "MomentumAsMemory",
    "Muon",
    "OPTIMIZER_NAMES",
    "PreconditionedMomentum",
    "build_optimizer",
    "ftrl_step",
    "gd_step",
    "muon_param_groups",
    "record_linear_inputs",
    "steepest_descent_step",
    "weight_decay_param_groups",
]
