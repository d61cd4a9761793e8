"""Argument checks shared by the optimizers: every invalid hyper-parameter fails early with a ValueError."""

from __future__ import annotations

from collections.abc import Sequence


def check_nonnegative(name: str, value: float) -> None:
    if not value >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")


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
