"""Recurrent state of sequence layers: a dataclass of tensors that is detachable and serialisable.

Every sequence layer follows ``y, state = layer(x, state=None)``. Its state subclasses :class:`LayerState`, whose
fields are tensors, ints, or nested states (lists of states are allowed too). ``flatten()`` turns a state into a flat
``{name: tensor}`` dict (for safetensors) and ``unflatten()`` restores it into an instance of the same structure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def _map(value: Any, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, LayerState):
        return value.apply(fn)
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return value


@dataclasses.dataclass
class LayerState:
    """Base class of every layer state. Subclasses are dataclasses whose fields are tensors, ints or states."""

    def apply(self, fn) -> LayerState:
        """A new state with ``fn`` applied to every tensor (nested states included)."""
        return dataclasses.replace(self, **{f.name: _map(getattr(self, f.name), fn) for f in dataclasses.fields(self)})

    def detach(self) -> LayerState:
        return self.apply(lambda t: t.detach())

    def to(self, *args, **kwargs) -> LayerState:
        """Like ``nn.Module.to``: a dtype casts the floating-point tensors only (token ids and counters keep theirs)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            device = _device_of(args, kwargs)
            return t if device is None else t.to(device)

        return self.apply(move)

    def flatten(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{dotted.name: tensor}``; ints are stored as 0-d int64 tensors so the dict round-trips exactly."""
        out: dict[str, torch.Tensor] = {}
        for f in dataclasses.fields(self):
            _flatten_into(out, f"{prefix}{f.name}", getattr(self, f.name))
        return out

    def unflatten(self, flat: dict[str, torch.Tensor], prefix: str = "") -> LayerState:
        """A state shaped like ``self`` whose values come from ``flat`` (the output of :meth:`flatten`)."""
        values = {f.name: _unflatten_from(flat, f"{prefix}{f.name}", getattr(self, f.name)) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **values)


def _device_of(args, kwargs):
    if "device" in kwargs:
        return kwargs["device"]
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (str, torch.device)):
            return a
    return None


def _flatten_into(out: dict, name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        out[name] = value.detach().contiguous()
    elif isinstance(value, LayerState):
        out.update(value.flatten(prefix=name + "."))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten_into(out, f"{name}.{i}", v)
    elif isinstance(value, bool) or isinstance(value, int):
        out[name] = torch.tensor(int(value), dtype=torch.int64)
    elif value is None:
        pass
    else:
        raise TypeError(f"cannot serialise state field {name!r} of type {type(value).__name__}")


def _unflatten_from(flat: dict, name: str, template: Any) -> Any:
    if isinstance(template, torch.Tensor):
        return flat[name]
    if isinstance(template, LayerState):
        return template.unflatten(flat, prefix=name + ".")
    if isinstance(template, (list, tuple)):
        return type(template)(_unflatten_from(flat, f"{name}.{i}", v) for i, v in enumerate(template))
    if isinstance(template, bool):
        return bool(flat[name].item())
    if isinstance(template, int):
        return int(flat[name].item())
    return template
