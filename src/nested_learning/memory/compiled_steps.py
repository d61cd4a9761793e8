"""``torch.compile`` of a memory layer's chunk step, shared by the layers that offer ``compile_chunk_step``: one
compiled copy per step function and backend, and the warning a layer gives before it falls back to the eager step."""

from __future__ import annotations

import warnings

import torch

_CACHE: dict = {}
_FAILED: set = set()  # (function, backend) pairs whose compilation failed: run eagerly from then on


def compiled(step, backend: str):
    """``step`` under ``torch.compile`` (static shapes, one graph), created once per function and backend."""
    key = (step, backend)
    if key not in _CACHE:
        _CACHE[key] = torch.compile(step, backend=backend, dynamic=False, fullgraph=True)
    return _CACHE[key]


def warn_eager_fallback(what: str, backend: str, err: Exception, stacklevel: int) -> None:
    """Say that compiling ``what`` failed (e.g. no C compiler for inductor) and that it runs eagerly instead."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    warnings.warn(
        f"compiling the {what} with backend {backend!r} failed ({type(err).__name__}: {reason}); running it eagerly",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def call_compiled_or_eager(fn, backend: str | None, what: str, *args):
    """``fn(*args)`` compiled with ``backend`` (None: eagerly); if compiling fails, warn once and run it eagerly,
    then and on every later call. For steps whose compilation happens where no caller can catch it (a backward)."""
    if backend is None or (fn, backend) in _FAILED:
        return fn(*args)
    try:
        return compiled(fn, backend)(*args)
    except Exception as err:  # e.g. no C compiler for inductor: the eager function computes the same thing
        _FAILED.add((fn, backend))
        warn_eager_fallback(what, backend, err, stacklevel=2)
        return fn(*args)
