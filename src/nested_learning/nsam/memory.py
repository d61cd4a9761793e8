"""An associative memory as the framework sees it (Def 1-2, Eq 6): what it stores, what it maps to what, the
problem it solves, the rule that solves it, and how often.

    M* = argmin_M L~(M(K); V)                                                       Eq 6 (Def 1)

A memory is described, not wrapped: the modules keep their own fast code, and :class:`AssociativeMemory` records
(state, keys, values, context flow, objective, update rule, equation, frequency) read from them.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

CONTEXTS = ("tokens", "gradients", "activations", "training data")
UNITS = ("token", "step")


@dataclasses.dataclass(frozen=True)
class Frequency:
    """Def 2: updates per unit of time. ``unit`` is a token of the stream or an optimizer step.

    ``Frequency.every(C)`` is 1/C (a memory that learns once per chunk of C); ``NON_PARAMETRIC`` is infinity (a
    memory that stores every pair it sees, attention's KV cache); ``FROZEN`` is 0 (weights fixed after training).
    """

    rate: float
    unit: str = "token"
    period: int | None = None  # C, when rate = 1/C

    @classmethod
    def every(cls, period: int, unit: str = "token") -> Frequency:
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        return cls(1.0 / period, unit, int(period))

    def per_token(self, tokens_per_step: int | None) -> float | None:
        """Updates per stream token; None for optimizer steps when the step's token count is not known."""
        if self.unit == "token" or self.rate in (0.0, math.inf):
            return self.rate
        return None if tokens_per_step is None else self.rate / tokens_per_step

    def __str__(self) -> str:
        if self.rate == math.inf:
            return "inf"
        if self.rate == 0:
            return "0"
        text = "1" if self.period == 1 else (f"1/{self.period}" if self.period else str(Fraction(self.rate)))
        return f"{text} per {self.unit}"


NON_PARAMETRIC = Frequency(math.inf)
FROZEN = Frequency(0.0)


@dataclasses.dataclass(frozen=True)
class AssociativeMemory:
    """One optimisation problem of a nested system (Def 3-4): a memory with its own context flow and frequency.

    component: where it lives (module path, or optimizer state). state: what it stores, with shapes.
    keys, values: the pairs it maps (Eq 20's k_t^(i), v_t^(i)). context: "tokens", "gradients", "activations" or
    "training data". objective: its internal L~. update: the rule that (approximately) minimises it. equation:
    where the sources state the rule. frequency: :class:`Frequency`. reads: components whose output is part of its
    context flow (the dependency that orders memories of equal frequency).
    """

    component: str
    state: str
    keys: str
    values: str
    context: str
    objective: str
    update: str
    equation: str
    frequency: Frequency
    reads: tuple[str, ...] = ()

    def __post_init__(self):
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        if self.frequency.unit not in UNITS:
            raise ValueError(f"frequency unit must be one of {UNITS}, got {self.frequency.unit!r}")
