"""What every evaluation suite needs from a model, written once against the model contract.

* :func:`build` builds a registered model, dropping size overrides a model family does not know;
* :func:`test_time_updates` switches a model's test-time memory updates (HOPE's CMS) on or off for a block of code,
  and is a no-op for models without the switch (:func:`has_test_time_switch`);
* :func:`context_limit` is the longest stream a model accepts (None: unbounded, e.g. recurrent memories);
* :func:`prefill` streams a long token sequence through a model in chunks, carrying ``state`` (the contract
  guarantees this equals one call), so a 16K-token prompt never materialises a 16K x vocab logit tensor;
* :func:`tile_state` copies a batch-1 state to a batch of n, so a shared prefix (an in-context prompt, a stream of
  training examples) is read once and many continuations are scored from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from nested_learning.memory.state import LayerState

SWITCH = "set_test_time_updates"


def build(name: str, size: str = "tiny", overrides: dict | None = None, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """``(model, overrides actually used)``; seeded so that two calls give the same initial weights.

    Size overrides (``dim``, ``n_layers``) are shared names across the model families, but a family may not have
    one of them: the model is then built with the overrides it accepts, and what was dropped is reported by
    omission in the returned dict. ``vocab_size`` is never dropped (a task's vocabulary is not optional).
    """
    from nested_learning.models import build_model

    overrides = dict(overrides or {})
    torch.manual_seed(seed)
    try:
        return build_model(name, size, **overrides), overrides
    except (TypeError, ValueError):
        if not overrides:
            raise
    kept = {k: v for k, v in overrides.items() if k == "vocab_size"}
    for key, value in overrides.items():
        if key in kept:
            continue
        try:
            build_model(name, size, **{**kept, key: value})
            kept[key] = value
        except (TypeError, ValueError):
            pass
    torch.manual_seed(seed)
    return build_model(name, size, **kept), kept


def has_test_time_switch(model: torch.nn.Module) -> bool:
    return callable(getattr(model, SWITCH, None))


@contextlib.contextmanager
def test_time_updates(model: torch.nn.Module, enabled: bool | None):
    """Run the block with test-time memory updates on/off; ``None`` or a model without the switch: unchanged.

    The previous setting is restored when the model exposes it as a ``test_time_updates`` attribute.
    """
    if enabled is None or not has_test_time_switch(model):
        yield
        return
    previous = getattr(model, "test_time_updates", None)
    getattr(model, SWITCH)(bool(enabled))
    try:
        yield
    finally:
        if isinstance(previous, bool):
            getattr(model, SWITCH)(previous)


def context_limit(model: torch.nn.Module) -> int | None:
    """Longest stream the model accepts, from ``model.max_seq_len`` or ``model.config.max_seq_len``."""
    limit = getattr(model, "max_seq_len", None)
    if limit is None:
        limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    return int(limit) if limit else None


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: torch.Tensor, state: Any = None, chunk: int = 512):
    """Stream ``ids: (B, T)`` through the model in chunks; returns ``(logits of the last position (B, V), state)``."""
    if ids.shape[1] == 0:
        raise ValueError("prefill needs at least one token")
    logits = None
    for lo in range(0, ids.shape[1], chunk):
        out = model(ids[:, lo : lo + chunk], state=state)
        state, logits = out.state, out.logits[:, -1].float()
    return logits, state


def _map_state(value: Any, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, LayerState):
        return value.apply(fn)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _map_state(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value)})
    if isinstance(value, (list, tuple)):
        return type(value)(_map_state(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_state(v, fn) for k, v in value.items()}
    return value


def tile_state(state: Any, n: int) -> Any:
    """A batch-1 state repeated to batch ``n``: every tensor is tiled along dim 0.

    Tiling (not interleaving) is right for both layouts the models use: ``(B, ...)`` and batch-major
    ``(B * heads, ...)``. 0-d tensors are left alone. Callers check the result against an untiled run
    (:func:`nested_learning.evaluation.scoring.check_tiling`) before trusting it for a new model.
    """
    return _map_state(state, lambda t: t if t.dim() == 0 else _tile(t, n))


def _tile(t: torch.Tensor, n: int) -> torch.Tensor:
    # a batch of one is expanded, not copied: a pretrained model's fast weights are hundreds of MB per sequence, and
    # the models never write into a state in place
    if t.shape[0] == 1:
        return t.expand(n, *t.shape[1:])
    return t.repeat(n, *([1] * (t.dim() - 1)))


def clone_state(state: Any) -> Any:
    return _map_state(state, lambda t: t.clone())


def write_json(path: str | Path, data: dict) -> Path:
    """Write ``data`` atomically (temp file + rename): a crash never leaves a half-written result to resume from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    tmp.replace(path)
    return path


def _jsonable(value: Any):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_backbone(model: torch.nn.Module, path: str | Path, meta: dict) -> Path:
    """Weights plus how to rebuild them (``name``, ``size``, ``overrides``), for reuse by the other suites."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"meta": meta, "state_dict": model.state_dict()}, tmp)
    tmp.replace(path)
    return path


def load_backbone(path: str | Path) -> tuple[torch.nn.Module, dict]:
    from nested_learning.models import build_model

    blob = torch.load(path, map_location="cpu", weights_only=False)
    meta = blob["meta"]
    model = build_model(meta["name"], meta["size"], **meta.get("overrides", {}))
    model.load_state_dict(blob["state_dict"])
    return model, meta
