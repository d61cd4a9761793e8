"""Elastic Weight Consolidation (Kirkpatrick et al. 2017), in its online form (Schwarz et al. 2018).

After each task the diagonal of the empirical Fisher information is estimated on that task's training examples,
``F_k = mean_n (d log p(y_n | x_n) / d theta_k)^2``, from per-example gradients (batch size 1: squaring a batch-mean
gradient would underestimate the Fisher by the batch size). Online EWC keeps one running Fisher ``F <- F + F_task``
and one anchor ``theta*`` (the weights after the latest task) instead of one pair per task, so memory does not grow
with the number of tasks. The penalty added to the loss of later tasks is ``(lambda / 2) sum_k F_k (theta_k -
theta*_k)^2``.
"""

from __future__ import annotations

import torch


class EWC:
    def __init__(self, model: torch.nn.Module, lam: float = 1000.0):
        self.model, self.lam = model, lam
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def fisher_diagonal(self, batches) -> dict[str, torch.Tensor]:
        """Mean squared per-example gradient of the loss over ``batches`` of one example each."""
        fisher = {n: torch.zeros_like(p) for n, p in self.params.items()}
        count = 0
        self.model.eval()
        for x, y in batches:
            self.model.zero_grad(set_to_none=True)
            self.model(x, labels=y).loss.backward()
            for n, p in self.params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
            count += 1
        self.model.zero_grad(set_to_none=True)
        return {n: f / max(count, 1) for n, f in fisher.items()}

    def consolidate(self, scorer, rows) -> None:
        """Add the Fisher of the task whose examples are ``rows`` and re-anchor at the current weights."""
        new = self.fisher_diagonal(scorer.training_batch([r]) for r in rows)
        for n, f in new.items():
            self.fisher[n] = self.fisher[n] + f if n in self.fisher else f
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def penalty(self) -> torch.Tensor:
        """``(lambda / 2) sum_k F_k (theta_k - theta*_k)^2``; zero before the first task is consolidated."""
        if not self.fisher:
            return torch.zeros(())
        total = sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum() for n, p in self.params.items())
        return 0.5 * self.lam * total
