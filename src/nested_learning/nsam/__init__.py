"""The nested-learning framework: models and optimizers read as nested systems of associative memories.

- :class:`AssociativeMemory`, :class:`Frequency` (Def 1-2, Eq 6): a memory's state, keys, values, objective,
  update rule and update frequency.
- :class:`NestedSystem` (Def 3-4, Eq 19-20): memories ordered by frequency into levels; ``levels()``.
- ``describe(model, optimizer=None)``: the table of levels read from the modules themselves.
- ``proximal_step`` (Eq 20, 56): the generic solver every closed-form update is checked against.
- ``nested_learning.nsam.decompose``: models and optimizers re-run from their levels' update rules alone.

This package reads models and optimizers; nothing in the library imports it (only the CLI and tests).
"""

from .describe import describe
from .memory import FROZEN, NON_PARAMETRIC, AssociativeMemory, Frequency
from .proximal import dot_objective, l2_objective, linearized_step, newton_minimize, proximal_step
from .system import Level, NestedSystem

__all__ = [
    "FROZEN",
    "NON_PARAMETRIC",
    "AssociativeMemory",
    "Frequency",
    "Level",
    "NestedSystem",
    "describe",
    "dot_objective",
    "l2_objective",
    "linearized_step",
    "newton_minimize",
    "proximal_step",
]
