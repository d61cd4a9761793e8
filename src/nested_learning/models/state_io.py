"""Saving and loading a stream state with safetensors, so a deployed model keeps what it learned in context.

A state (e.g. HOPE's ``CMSLMState``: Titans memories, every CMS level's fast weights and gradient accumulators, the
pending tokens) is flattened by ``LayerState.flatten`` into ``{dotted.name: tensor}``. The file's metadata records
the state class, the batch size and the sorted key list; loading rebuilds the structure from a template -- the
model's ``initial_state(batch)`` or a state passed in -- and checks that the keys match exactly.

    save_state(out.state, "stream.safetensors")
    state = load_state("stream.safetensors", model)        # continue the stream: model(ids, state=state)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nested_learning.memory.state import LayerState

FORMAT = "nested_learning.state.v1"


def save_state(state: LayerState, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``state`` to ``path`` (safetensors). Extra string ``metadata`` is stored alongside."""
    flat = state.flatten()
    # clone: safetensors refuses tensors that share storage (a fresh state aliases its initial memories)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in flat.items()}
    batch = _batch_size(state)
    meta = {
        "format": FORMAT,
        "state_class": type(state).__qualname__,
        "batch": str(batch),
        "keys": json.dumps(sorted(tensors)),
    }
    meta.update(metadata or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_state(path: str | Path, like, device: str | torch.device | None = None) -> LayerState:
    """Read a state written by :func:`save_state`. ``like`` is a model with ``initial_state(batch, device)`` (the
    batch size comes from the file) or a template state of the same structure."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"state file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # empty, truncated or not a safetensors file at all
        raise ValueError(f"state file {str(path)!r} is not a readable safetensors file (empty or truncated?): "
                         f"{err}") from err
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a saved stream state (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    device = torch.device(device) if device is not None else None
    if isinstance(like, LayerState):
        template = like
    elif hasattr(like, "initial_state"):
        with torch.no_grad():
            template = like.initial_state(int(meta["batch"]), device=device)
    else:
        raise TypeError(
            f"like must be a model with initial_state() or a LayerState, got {type(like).__name__}"
        )
    if type(template).__qualname__ != meta.get("state_class"):
        raise ValueError(
            f"{path} holds a {meta.get('state_class')}, the template is a {type(template).__qualname__}"
        )
    flat = load_file(str(path), device=str(device) if device is not None else "cpu")
    expected = template.flatten()
    if set(expected) != set(flat):
        missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
        raise ValueError(f"saved state {str(path)!r} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, want in expected.items():
        got = flat[name]
        # a dimension of size 0 in the template grows with the stream (the pending tokens)
        fits = got.dim() == want.dim() and all(m == 0 or n == m for n, m in zip(got.shape, want.shape))
        if not fits:
            raise ValueError(f"saved state {str(path)!r} does not fit the model: {name!r} has shape "
                             f"{tuple(got.shape)}, the model expects {tuple(want.shape)} (another model size?)")
        if got.dtype != want.dtype:
            raise TypeError(f"saved state {str(path)!r}: {name!r} has dtype {got.dtype}, the model expects "
                            f"{want.dtype}")
    return template.unflatten(flat)


def _batch_size(state: LayerState) -> int:
    if isinstance(getattr(state, "pending", None), torch.Tensor):
        return int(state.pending.shape[0])
    for v in state.flatten().values():
        if v.dim() > 0:
            return int(v.shape[0])
    return 0
