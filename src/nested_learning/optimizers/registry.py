"""Optimizers by name, for the trainer: ``build_optimizer(name, model, lr, weight_decay, **kwargs)``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._validation import check_lr, check_nonnegative
from .adagrad_memory import AdaGradAsMemory
from .adam_memory import AdamAsMemory
from .deep_momentum import DeepMomentumGD
from .delta_momentum import DeltaRuleMomentum
from .dgd import DGD
from .linear_inputs import record_linear_inputs
from .m3 import M3
from .muon import Muon
from .param_groups import muon_param_groups, weight_decay_param_groups
from .preconditioned import PreconditionedMomentum


def _decay_groups(cls) -> Callable[..., torch.optim.Optimizer]:
    """Optimizers whose weight decay spares biases, norm gains and embeddings."""

    def build(model: nn.Module, lr: float, weight_decay: float, **kwargs) -> torch.optim.Optimizer:
        return cls(weight_decay_param_groups(model, weight_decay), lr=lr, **kwargs)

    return build


def _sgd(model, lr, weight_decay, **kwargs):
    kwargs.setdefault("momentum", 0.9)
    return torch.optim.SGD(weight_decay_param_groups(model, weight_decay), lr=lr, **kwargs)


def _muon(model, lr, weight_decay, **kwargs):
    # One lr for both paths: the RMS-matched scaling makes Muon's update the size of AdamW's.
    kwargs.setdefault("adjust_lr", "match_rms_adamw")
    groups = weight_decay_param_groups(model, weight_decay, muon_param_groups(model))
    return Muon(groups, lr=lr, weight_decay=weight_decay, **kwargs)


def _m3(model, lr, weight_decay, adam_lr: float | None = None, **kwargs):
    groups = weight_decay_param_groups(model, weight_decay, muon_param_groups(model, flag="orthogonalize"))
    for group in groups:
        if not group["orthogonalize"]:
            group["lr"] = lr if adam_lr is None else adam_lr
    return M3(groups, lr=lr, weight_decay=weight_decay, **kwargs)


def _dgd(model, lr, weight_decay, **kwargs):
    # The optimizer owns the hooks; ``optimizer.recorder.remove()`` takes them off.
    groups = weight_decay_param_groups(model, weight_decay)
    return DGD(groups, lr=lr, recorder=record_linear_inputs(model), **kwargs)


_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _decay_groups(torch.optim.AdamW),
    "adam": _decay_groups(torch.optim.Adam),
    "sgd": _sgd,
    "muon": _muon,
    "m3": _m3,
    "dgd": _dgd,
    "deep_momentum": _decay_groups(DeepMomentumGD),
    "delta_momentum": _decay_groups(DeltaRuleMomentum),
    "preconditioned_momentum": _decay_groups(PreconditionedMomentum),
    "adam_memory": _decay_groups(AdamAsMemory),
    "adagrad_memory": _decay_groups(AdaGradAsMemory),
}

OPTIMIZER_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float = 0.0, **kwargs
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (one of ``OPTIMIZER_NAMES``; default choice ``"adamw"``) for every trainable
    parameter of ``model``; ``kwargs`` go to the optimizer's constructor.

    Weight decay never touches 1-D parameters (biases, norm gains) or embeddings, for every name. ``"muon"`` and ``"m3"``
    orthogonalise hidden matrices only (``muon_param_groups``); for ``"m3"`` the element-wise Adam path uses
    ``adam_lr`` (default ``lr``). ``"dgd"`` installs input-recording hooks on the model's ``nn.Linear`` layers.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    check_lr(lr)  # torch's own optimizers accept lr=inf
    check_nonnegative("weight_decay", weight_decay)
    return _BUILDERS[name](model, lr, weight_decay, **kwargs)
