"""Recording each nn.Linear's inputs and output gradients, which DGD's closed form needs (Eq 56-57)."""

from __future__ import annotations

import torch
from torch import nn


class LinearInputRecorder:
    """Hooks on every ``nn.Linear`` of a model that store (x, grad_y) row pairs for its weight.

    A forward hook keeps the layer input x (detached) and puts a hook on the output y; when backward reaches y,
    the pair (x, dL/dy) is stored, both flattened to rows: x (N, in), grad_y (N, out), N = all leading dims
    (batch, time). Forwards without grad (evaluation) and forwards that never see a backward store nothing.
    Several backwards before a step (gradient accumulation) append rows; ``pop`` concatenates them.

    Use as a context manager or call ``remove()`` to take the hooks off. Records hold the inputs alive until
    they are popped or cleared, about the activation memory autograd already keeps.
    """

    def __init__(self, model: nn.Module) -> None:
        self._records: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = [m.register_forward_hook(self._forward_hook) for m in model.modules() if isinstance(m, nn.Linear)]

    def _forward_hook(self, module: nn.Linear, inputs, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        x = inputs[0].detach()
        key = id(module.weight)

        def store(grad_y: torch.Tensor) -> None:
            rows = (x.reshape(-1, x.shape[-1]), grad_y.detach().reshape(-1, grad_y.shape[-1]))
            self._records.setdefault(key, []).append(rows)

        output.register_hook(store)

    def pop(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x (N, in), grad_y (N, out)) recorded for ``weight`` since the last pop, or None; removes them."""
        pairs = self._records.pop(id(weight), None)
        if not pairs:
            return None
        xs, grads = zip(*pairs)
        return torch.cat(xs), torch.cat(grads)

    def clear(self) -> None:
        self._records.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> LinearInputRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def record_linear_inputs(model: nn.Module) -> LinearInputRecorder:
    """Start recording (x, grad_y) for every ``nn.Linear`` in ``model``; see ``LinearInputRecorder``."""
    return LinearInputRecorder(model)
