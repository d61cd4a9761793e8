"""``describe(model, optimizer=None)``: a model and its optimizer as one nested system of associative memories."""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .read_models import in_context_memories, slow_weights
from .read_optimizers import read_optimizer
from .system import NestedSystem


def describe(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    tokens_per_step: int | None = None,
    show: bool = True,
    file=None,
) -> NestedSystem:
    """Read ``model`` (and ``optimizer``) from the modules themselves; print the level table (to ``file``,
    default stdout; ``show=False`` prints nothing) and return the :class:`NestedSystem`.

    Without an optimizer the slow weights are frozen (frequency 0, the state after training); with one they update
    once per step by its rule, and its memories (momentum, moments) join the system. ``tokens_per_step`` (batch x
    sequence length) puts optimizer steps on the token scale; without it every optimizer level is ordered after the
    in-context levels.
    """
    memories = in_context_memories(model)
    name = type(model).__name__
    rule = None
    if optimizer is not None:
        opt_memories, rule = read_optimizer(optimizer)
        memories += opt_memories
        name += f" + {type(optimizer).__name__}"
    memories += slow_weights(model, rule)
    system = NestedSystem(name, memories, tokens_per_step)
    if show:
        print(system, file=sys.stdout if file is None else file)
    return system
