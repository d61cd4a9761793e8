"""The backward that hand-written autograd nodes fall back to under ``create_graph``: autograd through their
reference function, so that higher derivatives stay exact."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def reference_vjp(reference: Callable, inputs: Sequence, grads: Sequence[torch.Tensor]) -> tuple:
    """Gradients of ``<grads, reference(*inputs)>`` with respect to every input, differentiable (create_graph);
    None for inputs that are None or do not require grad. ``reference`` returns the node's outputs as a sequence."""
    def wanted(x):
        return x is not None and x.requires_grad

    with torch.enable_grad():
        live = [x for x in inputs if wanted(x)]
        outs = reference(*inputs)
        got = iter(torch.autograd.grad(outs, live, grads, create_graph=True, allow_unused=True))
    return tuple(next(got) if wanted(x) else None for x in inputs)
