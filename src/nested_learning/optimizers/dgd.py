"""Delta gradient descent (DGD, Eq 56-57) for the weights of linear layers."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from ..ops import dgd_step
from ._validation import check_choice, check_lr, check_nonnegative
from .linear_inputs import LinearInputRecorder

BATCH_MODES = ("mean", "sequential")


class DGD(Optimizer):
    """Delta gradient descent: each linear layer's weight solves the L2 regression of Eq 56 in closed form.

    Eq 56: W_{t+1} = argmin_W ||W x_t - u_t||^2 / 2 + ||W - W_t||^2 / (2 eta),  u_t = -dL/dy_t;
    Eq 57: W_{t+1} = W_t (I - eta' x x^T) - eta' (dL/dy_t) x^T,  eta' = eta / (1 + eta ||x||^2)
    (``ops.dgd_step``, exact for any input norm). Compared with GD's W_t - eta (dL/dy) x^T, the extra term
    -eta' (W_t x) x^T is a weight decay along the directions of the current inputs, which is what lets DGD
    track a stream whose input-output map drifts.

    The closed form is per sample. A step sees N recorded rows (x_n, g_n = dL/dy_n), N = all leading dims of
    all backwards since the last step. Each row's surprise is taken as N g_n, so that the rows' mean gradient
    term equals the recorded gradient sum_n g_n x_n^T whatever the loss reduction; then:
      - ``batch_mode="mean"`` (default): the mean over rows of the per-row closed form from W_t,
        W_{t+1} = mean_n dgd_step(W_t, x_n, N g_n, eta). Vectorised in chunks of rows.
      - ``batch_mode="sequential"``: rows applied one after another with step eta / N,
        W <- dgd_step(W, x_n, N g_n, eta / N), the online reading of the batch (a Python loop over rows).
    Both equal Eq 57 for a single row, and both reduce to a GD step of size eta when the decay is dropped.

    Which parameters: weights with recorded rows (pass ``recorder=record_linear_inputs(model)``). Every other
    parameter (biases, embeddings, norms, weights with nothing recorded) takes a plain GD step. The part of a
    recorded weight's gradient that the rows do not explain (a tied weight also used elsewhere, a penalty on W)
    takes a plain GD step too, so no gradient is dropped. ``weight_decay`` is coupled (added to the gradient).
    ``zero_grad`` also clears the recorder, so rows never outlive the gradients they belong to.

    What the objective implies: ||W x - u||^2 / 2 with u = -dL/dy is GD's linear term plus ||W x||^2 / 2, so DGD
    is GD on L + sum over layers of mean ||W x||^2 / 2. On least squares (u = y - W x) its fixed point is
    W x = y / 2 (docs/results/optimizers.md measures the cost on a drifting regression).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        recorder: LinearInputRecorder | None = None,
        batch_mode: str = "mean",
        weight_decay: float = 0.0,
        chunk_elements: int = 1 << 24,
    ) -> None:
        check_lr(lr)
        check_choice("batch_mode", batch_mode, BATCH_MODES)
        check_nonnegative("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, batch_mode=batch_mode, weight_decay=weight_decay))
        self.recorder = recorder
        self.chunk_elements = chunk_elements

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.recorder is not None:
            self.recorder.clear()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                rows = self.recorder.pop(p) if self.recorder is not None and p.ndim == 2 else None
                if p.grad is None and rows is None:
                    continue
                residual = torch.zeros_like(p) if p.grad is None else p.grad.clone()
                if group["weight_decay"] != 0:
                    residual.add_(p, alpha=group["weight_decay"])
                if rows is not None:
                    x, grad_y = (t.to(torch.float64 if p.dtype == torch.float64 else torch.float32) for t in rows)
                    residual.sub_((grad_y.T @ x).to(p.dtype))
                    p.copy_(self._delta_step(p, x, grad_y, lr, group["batch_mode"]).to(p.dtype))
                p.sub_(residual, alpha=lr)
        if self.recorder is not None:
            self.recorder.clear()
        return loss

    def _delta_step(self, w: torch.Tensor, x: torch.Tensor, grad_y: torch.Tensor, lr: float, mode: str):
        w = w.to(x.dtype)
        n = x.shape[0]
        surprise = grad_y * n
        if mode == "sequential":
            for i in range(n):
                w = dgd_step(w, x[i], surprise[i], lr / n)
            return w
        rows_per_chunk = max(1, self.chunk_elements // w.numel())
        total = torch.zeros_like(w)
        for start in range(0, n, rows_per_chunk):
            xs, gs = x[start : start + rows_per_chunk], surprise[start : start + rows_per_chunk]
            total += dgd_step(w, xs, gs, lr).sum(0)  # W broadcasts over the rows
        return total / n
