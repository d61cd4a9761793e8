"""Splitting a model's parameters into groups: hidden matrices vs the rest, decayed vs not decayed.

Conventions (shared by the registry, Muon and M3):
- embeddings: weights of ``nn.Embedding`` (and any parameter tied to one, e.g. a tied output head);
- head: the weight of the last ``nn.Linear`` in ``model.modules()`` order (the output layer);
- hidden matrices: every other 2-D parameter (``nn.Linear`` weights and 2-D ``nn.Parameter`` s).
Biases, norm gains and other 1-D (or >2-D) tensors are neither. Parameters that do not require grad are skipped;
a parameter shared by several modules appears once.
"""

from __future__ import annotations

import torch
from torch import nn


def _unique_params(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    params = []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def embedding_param_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def head_param_ids(model: nn.Module) -> set[int]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return {id(linears[-1].weight)} if linears else set()


def muon_param_groups(model: nn.Module, flag: str = "use_muon") -> list[dict]:
    """Two groups: ``{"params": hidden matrices, flag: True}`` and ``{"params": the rest, flag: False}``.

    ``flag`` is ``"use_muon"`` for ``Muon`` and ``"orthogonalize"`` for ``M3``.
    Orthogonalised updates suit matrices that map hidden states to hidden states; embeddings are looked up row
    by row and the head's rows are class scores, so both, and every non-matrix, go to the element-wise path.
    Empty groups are left out.
    """
    excluded = embedding_param_ids(model) | head_param_ids(model)
    hidden, rest = [], []
    for p in _unique_params(model):
        (hidden if p.ndim == 2 and id(p) not in excluded else rest).append(p)
    groups = [{"params": hidden, flag: True}, {"params": rest, flag: False}]
    return [g for g in groups if g["params"]]


def no_decay_param_ids(model: nn.Module) -> set[int]:
    """Parameters that weight decay must spare: embeddings and every tensor with fewer than 2 dims."""
    embeddings = embedding_param_ids(model)
    return {id(p) for p in _unique_params(model) if p.ndim < 2 or id(p) in embeddings}


def weight_decay_param_groups(model: nn.Module, weight_decay: float, groups: list[dict] | None = None) -> list[dict]:
    """Decay matrices (ndim >= 2) except embeddings; no decay on biases, norm gains and embeddings.

    With ``groups`` (e.g. from ``muon_param_groups``) each group is split the same way, keeping its other keys.
    """
    spared = no_decay_param_ids(model)
    out = []
    for group in groups if groups is not None else [{"params": _unique_params(model)}]:
        decay = [p for p in group["params"] if id(p) not in spared]
        no_decay = [p for p in group["params"] if id(p) in spared]
        out += [{**group, "params": decay, "weight_decay": weight_decay}, {**group, "params": no_decay, "weight_decay": 0.0}]
    return [g for g in out if g["params"]]


def split_matrix_groups(params, flag: str, rest_overrides: dict) -> list[dict]:
    """Normalise ``params`` into groups that each carry a boolean ``flag``.

    A group that sets ``flag`` is kept as is; a group (or a plain iterable of tensors) that does not is split
    into its 2-D parameters (``flag=True``) and the rest (``flag=False``, with ``rest_overrides`` applied, e.g. a
    separate learning rate), so every group is handled by a single path.
    """
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        group = dict(group)
        tensors = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        if flag in group:
            out.append({**group, "params": tensors, flag: bool(group[flag])})
            continue
        matrices = [p for p in tensors if p.ndim == 2]
        rest = [p for p in tensors if p.ndim != 2]
        if matrices:
            out.append({**group, "params": matrices, flag: True})
        if rest:
            out.append({**group, **rest_overrides, "params": rest, flag: False})
    return out
