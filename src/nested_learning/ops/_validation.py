"""Argument checks shared by every layer of the package: a bad value fails where it is passed, with a message that
names the argument, the value and what was expected (``ValueError`` for a bad value, ``TypeError`` for a bad type).
"""

from __future__ import annotations

import math
import numbers

import torch


def check_int(name: str, value, minimum: int | None = 1) -> int:
    """``value`` as an int, rejecting bools and non-integers (16.7 is not silently truncated to 16)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_float(name: str, value, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the given range (NaN and inf are rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    bad = not math.isfinite(value)
    bad = bad or (low is not None and (value <= low if low_open else value < low))
    bad = bad or (high is not None and (value >= high if high_open else value > high))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ValueError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {value!r}")
    return value


class NonFiniteError(ValueError):
    """A memory layer or op was given non-finite values. A ValueError for callers; the trainer catches this class
    to count a step whose forward pass overflowed as a non-finite step (skipped, like a NaN loss)."""


def check_finite(name: str, t: torch.Tensor) -> None:
    """Non-finite inputs are rejected rather than isolated: one NaN written into a fast-weight memory would make
    every later output of the stream NaN, and the chunk-parallel forms would spread it to earlier positions too."""
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise NonFiniteError(
            f"{name} must be finite, got {t.reshape(-1)[(~torch.isfinite(t)).reshape(-1)][0].item()} at index "
            f"{tuple(bad)}; memories are not updated from non-finite inputs"
        )


def check_layer_input(x, dim: int) -> None:
    """A sequence layer's input ``x: (B, T, dim)``: a float tensor of that width with finite entries."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x must have shape (batch, seq_len, {dim}), got {tuple(x.shape)}")
    check_finite("x", x.detach())
