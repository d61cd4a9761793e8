"""Modules that own a memory: fast-weight architectures (Eq 89), Titans' neural memory, self-modifying Titans
(Eq 83-93), and the matrix-memory baselines (linear attention, DeltaNet). CMS lives in ``cms.py``.

Every sequence layer follows ``y, state = layer(x, state=None)`` with a :class:`LayerState`."""

from .baselines import DeltaNetLayer, LinearAttentionLayer, MatrixMemoryState
from .cms import CMSState, ContinuumMemorySystem
from .conv import ShortConv
from .memories import FastWeightMemory, LinearMemory, MLPMemory
from .neural_memory import NeuralMemory, NeuralMemoryState
from .self_modifying_titans import SelfModifyingTitans, SelfModifyingTitansState
from .state import LayerState

TitansLayer = NeuralMemory

__all__ = [
    "CMSState",
    "ContinuumMemorySystem",
    "DeltaNetLayer",
    "LinearAttentionLayer",
    "MatrixMemoryState",
    "FastWeightMemory",
    "LayerState",
    "LinearMemory",
    "MLPMemory",
    "NeuralMemory",
    "NeuralMemoryState",
    "SelfModifyingTitans",
    "SelfModifyingTitansState",
    "ShortConv",
    "TitansLayer",
]
