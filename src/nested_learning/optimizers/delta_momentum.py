"""Delta-rule momentum: the momentum's internal objective is an L2 regression (Eq 48-49)."""

from __future__ import annotations

import torch

from ._validation import check_choice, check_unit_interval
from .linear_momentum import LinearMomentumMemory

FORMS = ("vector", "matrix")


class DeltaRuleMomentum(LinearMomentumMemory):
    """Momentum trained with the delta rule instead of the dot-product rule (Eq 48-49).

    Eq 49 reads m <- (alpha I - grad grad^T) m - eta P grad. In the buffer convention of this package
    (W <- W - lr b, b = -m / eta) and with the key normalised (k = phi(g) / ||phi(g)||, so the erase term is
    bounded; phi is Eq 51's feature map, identity by default) one step is

        b <- alpha b - delta (k k^T) b + P phi(g)                         (form="vector")
        b <- alpha b - delta b (k^T k) + P phi(g)    for 2-D W (o x i)    (form="matrix")

    Derivation: both are one gradient step (step 1, retention alpha) on the internal objective

        L~(b) = (delta / 2) ||<b, k>||^2 - <b, P phi(g)>                (vector: b and k flattened)
        L~(b) = (delta / 2) ||b k^T||_F^2 - <b, P phi(g)>               (matrix)

    For P = I and the identity map the matrix objective equals (delta / 2) ||b k^T - (||g|| / delta) I||_F^2 up
    to a constant, which is Eq 48's L2 regression "map the key to the value" with value P_i = (||g|| / delta) I;
    the vector objective is the same regression with the flattened gradient as key and the scalar ||g|| / delta
    as value. The dot-product objective of ``PreconditionedMomentum`` is the delta = 0 case.

    What it does: along the current key the old memory is erased before the new value is written. With
    delta = alpha (the default) and form="vector", <b_new, k> = <P phi(g), k> exactly: the momentum's component
    along the current gradient is replaced, not accumulated, so it cannot overshoot across a steep valley,
    while the components orthogonal to the gradient keep their heavy-ball memory. The matrix form erases along
    the right singular directions of g weighted by their share of ||g||_F^2 (its (k^T k) has trace 1); it costs
    a matrix product per step, the vector form O(d). Non-2-D parameters always use the vector form.

    Args:
        lr, momentum (alpha in [0, 1)), weight_decay (coupled), preconditioner / beta2 / eps (default
            ``"identity"``, so lr means what it means for SGD with momentum), feature_map (Eq 51).
        delta: strength of the erase term in [0, 1]; None means delta = momentum (full replacement along k).
        form: ``"vector"`` (default) or ``"matrix"`` (Eq 49 with the gradient as a matrix).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        delta: float | None = None,
        form: str = "vector",
        preconditioner: str = "identity",
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        feature_map="identity",
    ) -> None:
        delta = momentum if delta is None else delta
        check_unit_interval("delta", delta, closed=True)
        check_choice("form", form, FORMS)
        defaults = dict(
            lr=lr, momentum=momentum, delta=delta, form=form, preconditioner=preconditioner, beta2=beta2, eps=eps,
            weight_decay=weight_decay, feature_map=feature_map,
        )
        super().__init__(params, defaults)

    def _retain(self, buffer: torch.Tensor, key: torch.Tensor, group: dict) -> None:
        norm = key.norm()
        erase = torch.zeros_like(buffer)
        if norm > 0 and group["delta"] != 0:
            k = key / norm
            if group["form"] == "matrix" and buffer.ndim == 2:
                out_dim, in_dim = buffer.shape
                # b k^T k either way round; take the order whose inner Gram matrix is the smaller one.
                erase = (buffer @ k.T) @ k if out_dim <= in_dim else buffer @ (k.T @ k)
            else:
                erase = (buffer * k).sum() * k
        buffer.mul_(group["momentum"]).sub_(erase, alpha=group["delta"])
