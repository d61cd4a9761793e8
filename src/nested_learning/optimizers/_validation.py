"""Argument checks shared by the optimizers: every invalid hyper-parameter fails early with a ValueError."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_nonnegative(name: str, value: float) -> None:
    # an infinite rate or decay turns every weight into inf or NaN on the first step
    try:
        number = float(value)  # numbers and one-element tensors
    except (TypeError, ValueError, RuntimeError):
        number = None
    if isinstance(value, bool) or number is None:
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (number >= 0.0 and math.isfinite(number)):  # also rejects NaN
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_lr(lr: float) -> None:
    check_nonnegative("lr", lr)


def check_unit_interval(name: str, value: float, closed: bool = False) -> None:
    """``value`` in [0, 1), or in [0, 1] with ``closed``."""
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value}")


def check_betas(betas: Sequence[float], count: int = 2) -> None:
    if len(betas) != count:
        raise ValueError(f"betas must have {count} entries, got {len(betas)}")
    for i, beta in enumerate(betas):
        check_unit_interval(f"betas[{i}]", beta)


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
