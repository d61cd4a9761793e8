"""Closed-form solutions of the two internal objectives that turn gradients into momentum.

- Dot-product objective (Eq 12-13, Eq 33-34): a momentum m that is pulled towards the current value v while
  staying close to its retained past alpha m_t,

      m_{t+1} = argmin_m  -<m, v> + ||m - alpha m_t||^2 / (2 eta)  =  alpha m_t + eta v.

  With v = grad this is heavy-ball momentum; with v = P grad it is preconditioned momentum (Eq 37).

- L2 (ridge) regression objective of Adam and AdaGrad (Eq 101-102): per element, the momentum m that maps the
  stream of gradients g_i to a target P,

      m* = argmin_m  sum_i w_i (m g_i - P)^2 + lam m^2  =  P * M~ / (H + lam),
      M~ = sum_i w_i g_i,   H = sum_i w_i g_i^2,

  so the optimiser only needs the two accumulated memories M~ and H (its sufficient statistics).
"""

from __future__ import annotations

import torch


def dot_product_momentum(momentum: torch.Tensor, value: torch.Tensor, alpha: float, eta: float) -> torch.Tensor:
    """Eq 12-13 with retention: argmin_m -<m, value> + ||m - alpha momentum||^2 / (2 eta), in place."""
    return momentum.mul_(alpha).add_(value, alpha=eta)


def ridge_momentum(
    first: torch.Tensor, second: torch.Tensor, target: torch.Tensor, ridge: torch.Tensor | float
) -> torch.Tensor:
    """Eq 102: m* = [H + lam]^{-1} * M~ * P (element-wise).

    Args:
        first: M~, the accumulated gradients; second: H, the accumulated squared gradients.
        target: P, the value every gradient should be mapped to; ridge: lam (a scalar or element-wise).

    Where H + lam is zero every gradient seen so far was zero, so M~ is zero too and the regression is solved by
    m = 0 (the minimum-norm solution); the division would otherwise give 0/0.
    """
    denom = second + ridge
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, target * first / safe, torch.zeros_like(first))
