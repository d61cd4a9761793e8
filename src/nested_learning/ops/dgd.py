"""Delta gradient descent (DGD) for a weight matrix: the exact minimiser of Eq 56 (closed form Eq 57, Eq 113-121).

Eq 56 treats one step of training a linear layer y = W x as an L2 regression of the input x onto the local
surprise signal u = -grad_y L(W_t; x), with a proximal term keeping W near W_t:

    W_{t+1} = argmin_W  1/2 ||W x - u||^2 + 1/(2 eta) ||W - W_t||_F^2.

Derivation. The objective is a strictly convex quadratic in W; its gradient is
    (W x - u) x^T + (W - W_t) / eta = 0   <=>   W (I + eta x x^T) = W_t + eta u x^T.
Sherman-Morrison: (I + eta x x^T)^{-1} = I - eta' x x^T with eta' = eta / (1 + eta ||x||^2). Hence
    W_{t+1} = (W_t + eta u x^T)(I - eta' x x^T)
            = W_t (I - eta' x x^T) + eta (1 - eta' ||x||^2) u x^T
            = W_t (I - eta' x x^T) + eta' u x^T                  since eta (1 - eta' ||x||^2) = eta'.
With u = -grad_y this is exactly Eq 57, W_{t+1} = W_t (I - eta' x x^T) - eta' grad_y x^T, for x of any norm; for
||x|| = 1 it reduces to the sources' eta' = eta / (1 + eta). (The other reading of the target, u = W_t x - grad_y,
would cancel the decay term and give plain GD with step eta': it does not reproduce Eq 57, so u = -grad_y.)
The delta rule on a matrix memory (``delta_rule``, Eq 65/88) is this update with x = k, u = v and step eta'.
"""

from __future__ import annotations

import torch


def dgd_step(W: torch.Tensor, x: torch.Tensor, grad_y: torch.Tensor, lr) -> torch.Tensor:
    """One exact DGD step, the minimiser of Eq 56 (Eq 57 with eta' = lr / (1 + lr ||x||^2)).

    Args:
        W: (..., d_out, d_in) current weights W_t.
        x: (..., d_in) layer input.
        grad_y: (..., d_out) gradient of the loss w.r.t. the layer output y = W x (the target is u = -grad_y).
        lr: step size eta >= 0, a float or a tensor broadcastable to the leading dims (...).

    Returns:
        W_{t+1}: (..., d_out, d_in) in W's dtype (computed in at least fp32), i.e.
        W_t - eta' (W_t x + grad_y) x^T, the rank-one form of W_t (I - eta' x x^T) - eta' grad_y x^T.
    """
    for name, t in (("W", W), ("x", x), ("grad_y", grad_y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
    if W.ndim < 2:
        raise ValueError(f"W must be (..., d_out, d_in), got shape {tuple(W.shape)}")
    if x.shape[-1:] != W.shape[-1:] or grad_y.shape[-1:] != W.shape[-2:-1]:
        raise ValueError(
            f"expected x (..., {W.shape[-1]}) and grad_y (..., {W.shape[-2]}) for W {tuple(W.shape)}, "
            f"got x {tuple(x.shape)} and grad_y {tuple(grad_y.shape)}"
        )
    if isinstance(lr, (int, float)) and lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")

    dtype = torch.promote_types(W.dtype, torch.float32)
    Wc, xc, gc = W.to(dtype), x.to(dtype), grad_y.to(dtype)
    lr = torch.as_tensor(lr, dtype=dtype, device=W.device)
    eta_prime = lr / (1 + lr * (xc * xc).sum(-1))  # (...)
    error = (Wc @ xc.unsqueeze(-1)).squeeze(-1) + gc  # W_t x - u, (..., d_out)
    W_next = Wc - eta_prime[..., None, None] * error.unsqueeze(-1) * xc.unsqueeze(-2)
    return W_next.to(W.dtype)
