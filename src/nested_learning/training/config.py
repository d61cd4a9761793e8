"""YAML configs mapped onto dataclasses, with ``key=value`` overrides that are checked against the fields.

An unknown key or a value of the wrong type is a ``ValueError`` that names it, so a typo on the command line never
silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
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
    save_every: int = 100  # also saved at the end of every run; 0: only at the end
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True
    # run
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    # "bf16": forward passes under bf16 autocast (weights, gradients, optimizer and memory states stay fp32)
    precision: str = "fp32"
    parallel: str = "ddp"  # under torchrun: "ddp" (whole model on every rank) or "fsdp" (FSDP2, sharded)
    resume: bool = False  # continue from out_dir's latest checkpoint; an error when there is none ...
    allow_fresh_start: bool = False  # ... unless this is true: then a run without a checkpoint starts at step 0

    def __post_init__(self):
        validate(self)


DATASETS = ("corpus",)
PRECISIONS = ("fp32", "bf16")


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"config key {name!r} must be {expected}, got {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(c: TrainConfig) -> None:
    """Range checks of every field, so a bad value fails before training instead of training nothing or garbage."""
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "eval_batch_size",
                 "log_every", "max_bad_steps"):
        value = getattr(c, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value,
                 "an integer >= 1")
    for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints", "threads", "seed"):
        value = getattr(c, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, name, value,
                 "an integer >= 0")
    _require(c.max_docs is None or (isinstance(c.max_docs, int) and c.max_docs >= 1), "max_docs", c.max_docs,
             "None or an integer >= 1")
    _require(_finite(c.lr) and c.lr > 0, "lr", c.lr, "a finite number > 0")
    _require(_finite(c.weight_decay) and c.weight_decay >= 0, "weight_decay", c.weight_decay,
             "a finite number >= 0")
    _require(_finite(c.min_lr_ratio) and 0 <= c.min_lr_ratio <= 1, "min_lr_ratio", c.min_lr_ratio,
             "a number in [0, 1]")
    _require(_finite(c.grad_clip) and c.grad_clip >= 0, "grad_clip", c.grad_clip, "a finite number >= 0 (0: off)")
    _require(isinstance(c.betas, (tuple, list)) and len(c.betas) == 2 and all(_finite(b) and 0 <= b < 1
                                                                            for b in c.betas),
             "betas", c.betas, "two numbers in [0, 1)")
    _require(c.dataset in DATASETS, "dataset", c.dataset, f"one of {DATASETS}")
    _require(c.precision in PRECISIONS, "precision", c.precision, f"one of {PRECISIONS}")
    from nested_learning.training.fsdp import FSDP_OPTIMIZERS
    from nested_learning.training.parallel import PARALLELISMS

    _require(c.parallel in PARALLELISMS, "parallel", c.parallel, f"one of {PARALLELISMS}")
    _require(c.parallel != "fsdp" or c.optimizer in FSDP_OPTIMIZERS, "optimizer", c.optimizer,
             f"one of {FSDP_OPTIMIZERS} with parallel=fsdp (an element-wise optimizer: FSDP shards every weight "
             "into row blocks, and matrix optimizers such as Muon and M3 need the whole matrix)")
    _require(isinstance(c.model_overrides, dict), "model_overrides", c.model_overrides, "a mapping")
    _require(isinstance(c.optimizer_kwargs, dict), "optimizer_kwargs", c.optimizer_kwargs, "a mapping")
    if c.device != "auto":
        import torch

        try:
            device = torch.device(c.device)
        except (RuntimeError, TypeError):
            device = None
        _require(device is not None, "device", c.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
        _require(device.type != "cuda" or torch.cuda.is_available(), "device", c.device,
                 "a device that exists here (CUDA is not available)")


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
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
        config = apply_overrides(config, data)
    return apply_overrides(config, parse_overrides(overrides or []))
