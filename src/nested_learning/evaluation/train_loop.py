"""A short training loop for tasks whose loss is on chosen positions only (answers of synthetic tasks, NIAH answers,
label tokens in continual learning).

The trainer in ``nested_learning.training`` samples windows of one token stream; these tasks come as
``(input_ids, labels)`` batches with -100 on every position that is not scored, which the model contract already
supports (``out.loss`` ignores -100). Optimiser: AdamW with warmup + cosine decay and gradient clipping, as in the
trainer; a non-finite loss skips the step instead of corrupting the weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nested_learning.progress import progress as make_progress
from nested_learning.training.schedule import warmup_cosine

Batch = tuple[torch.Tensor, torch.Tensor]


def fit(
    model: torch.nn.Module,
    next_batch: Callable[[int], Batch],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: int | None = None,
    grad_clip: float = 1.0,
    penalty: Callable[[], torch.Tensor] | None = None,
    extra_loss: Callable[[int], torch.Tensor] | None = None,
    desc: str = "fit",
    progress: bool = True,
) -> list[dict]:
    """Train ``model`` for ``steps`` steps on ``next_batch(step) -> (input_ids, labels)``; returns the loss history.

    ``penalty()`` is added to every step's loss (EWC); ``extra_loss(step)`` too (e.g. a language-modelling batch
    mixed into NIAH training). History rows: ``{"step", "loss"}`` with the task loss only.
    """
    if steps <= 0:
        return []
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, warmup if warmup is not None else max(1, steps // 10), steps)
    model.train()
    history = []
    bar = make_progress(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        x, y = next_batch(step)
        loss = model(x, labels=y).loss
        total = loss
        if penalty is not None:
            total = total + penalty()
        if extra_loss is not None:
            total = total + extra_loss(step)
        opt.zero_grad(set_to_none=True)
        if math.isfinite(float(total.detach())):
            total.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
        sched.step()
        history.append({"step": step + 1, "loss": float(loss.detach())})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    model.eval()
    return history


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                    batch_size: int = 64) -> dict[str, float]:
    """Teacher-forced accuracy on the positions where ``labels != -100``.

    Returns ``token_accuracy`` (fraction of answer tokens whose argmax is right) and ``exact_match`` (fraction of
    sequences with every answer token right).
    """
    model.eval()
    right = total = exact = 0
    for lo in range(0, inputs.shape[0], batch_size):
        x, y = inputs[lo : lo + batch_size], labels[lo : lo + batch_size]
        pred = model(x).logits.argmax(-1)
        scored = y != -100
        ok = (pred == y) & scored
        right += int(ok.sum())
        total += int(scored.sum())
        exact += int(((ok | ~scored).all(dim=1) & scored.any(dim=1)).sum())
    return {"token_accuracy": right / max(total, 1), "exact_match": exact / max(inputs.shape[0], 1)}
