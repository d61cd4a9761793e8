"""YAML configs mapped onto dataclasses, with ``key=value`` overrides that are checked against the fields.

An unknown key or a value of the wrong type is a ``ValueError`` that names it, so a typo on the command line never
silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


@dataclasses.dataclass
class TrainConfig:
    # model
    model: str = "transformer"
    size: str = "tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    # data
    dataset: str = "corpus"
    max_docs: int | None = None
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    # optimisation
    optimizer: str = "adamw"
    optimizer_kwargs: dict = dataclasses.field(default_factory=dict)
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 20
    max_steps: int = 200
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    max_bad_steps: int = 5
    # evaluation and logging
    eval_every: int = 100
    eval_batches: int = 20
    eval_batch_size: int = 16
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True
    # run
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    resume: bool = False


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (possibly a string from the command line) to the field type ``tp``, or raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(name, value, args[0])
    if isinstance(value, str) and tp is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"config key {name!r}: cannot parse {value!r}") from e
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {name!r} expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {name!r} expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {name!r} expects a number, got {value!r}")
        return float(value)
    if tp is str:
        return str(value)
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {name!r} expects a list, got {value!r}")
        return tuple(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {name!r} expects a mapping, got {value!r}")
        return dict(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {name!r} expects a list, got {value!r}")
        return list(value)
    raise ValueError(f"config key {name!r} has an unsupported type {_type_name(tp)}")


def apply_overrides(config, values: dict[str, Any]):
    """A copy of dataclass ``config`` with ``values`` applied; ``model_overrides.dim=64`` sets a dict entry."""
    hints = typing.get_type_hints(type(config))
    fields = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        head, _, sub = key.partition(".")
        if head not in fields:
            raise ValueError(f"unknown config key {head!r}; valid keys: {', '.join(sorted(fields))}")
        if sub:
            if hints[head] is not dict and typing.get_origin(hints[head]) is not dict:
                raise ValueError(f"config key {head!r} is not a mapping, so {key!r} is invalid")
            current = dict(changes.get(head, getattr(config, head)))
            current[sub] = yaml.safe_load(value) if isinstance(value, str) else value
            changes[head] = current
        else:
            changes[head] = _coerce(key, value, hints[head])
    return dataclasses.replace(config, **changes)


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base=None):
    """A :class:`TrainConfig` from an optional YAML file, then ``key=value`` overrides."""
    config = base if base is not None else TrainConfig()
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
        config = apply_overrides(config, data)
    return apply_overrides(config, parse_overrides(overrides or []))
