"""Optimizers as levels over the weights, each level stepped by its own rule (Eq 10-13, 101-105, Algorithm 1).

A memory of the gradient flow is a dot-product memory with retention (Eq 12-13 with forgetting):

    m_{t+1} = argmin_m <m - m_t, grad(-<m, value>)> + ||m - beta m_t||^2 / (2 eta)  =  beta m_t + eta value

(momentum: value g, eta = 1 - dampening; Adam's moments: g and g^2 with eta = 1 - beta; M3's slow memory: the sum
of its chunk's gradients, every f steps, Eq 71). The weights are the level below: W <- argmin <W, d> + ||W - W_t||^2
/ (2 lr) = W_t - lr d, where d is what they read from the memories. Every runner takes ``params`` (leaf tensors,
changed in place) and ``closure()`` (returns the loss; gradients are taken here by autograd) and returns the
parameters after every step.
"""

from __future__ import annotations

import torch

from nested_learning.ops import newton_schulz

from ..proximal import linearized_step, newton_minimize


class DotProductMemory:
    """A memory of one stream of values: ``update(value)`` is the argmin above; ``init="first"`` starts the memory
    at the first value (torch's momentum buffer), ``"zero"`` at 0."""

    def __init__(self, retention: float, lr: float, init: str = "zero"):
        self.retention, self.lr, self.init, self.m = retention, lr, init, None

    def update(self, value: torch.Tensor) -> torch.Tensor:
        if self.m is None:
            if self.init == "first":
                self.m = value.clone()
                return self.m
            self.m = torch.zeros_like(value)
        self.m = linearized_step(lambda m: -(m * value).sum(), self.m, self.lr, self.retention * self.m)
        return self.m


def weight_step(p: torch.Tensor, direction: torch.Tensor, lr: float) -> None:
    """The weights' level: W <- argmin <W, d> + ||W - W_t||^2 / (2 lr), in place."""
    p.copy_(linearized_step(lambda w: (w * direction).sum(), p, lr))


def _grads(params, closure) -> list[torch.Tensor]:
    with torch.enable_grad():
        loss = closure()
        return list(torch.autograd.grad(loss, params))


def sgd_momentum_from_levels(
    params, closure, steps: int, lr: float, momentum: float, dampening: float = 0.0, weight_decay: float = 0.0,
    nesterov: bool = False,
) -> list[list[torch.Tensor]]:
    """SGD with momentum as two levels (Eq 10-13): the momentum memory, then the weights reading it."""
    memories = [DotProductMemory(momentum, 1 - dampening, init="first") for _ in params]
    history = []
    for _ in range(steps):
        grads = _grads(params, closure)
        with torch.no_grad():
            for p, g, mem in zip(params, grads, memories):
                g = g + weight_decay * p
                m = mem.update(g)
                weight_step(p, g + momentum * m if nesterov else m, lr)
        history.append([p.detach().clone() for p in params])
    return history


def adam_direction(first: torch.Tensor, second: torch.Tensor, t: int, betas, eps: float) -> torch.Tensor:
    """Eq 102-105: the minimiser of Eq 101 from the two memories, with P = sqrt(H^) and lam = eps sqrt(H^)."""
    m_hat, h_hat = first / (1 - betas[0] ** t), second / (1 - betas[1] ** t)
    target = h_hat.sqrt()
    return target * m_hat / (h_hat + eps * target)


def adam_from_levels(
    params, closure, steps: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
) -> list[list[torch.Tensor]]:
    """Adam as three levels of one frequency: the moments M~ (of g) and H (of g^2), then the weights reading the
    argmin of Eq 101 through them (Eq 102-105). ``weight_decay`` is coupled (added to g), as in torch.optim.Adam."""
    first = [DotProductMemory(betas[0], 1 - betas[0]) for _ in params]
    second = [DotProductMemory(betas[1], 1 - betas[1]) for _ in params]
    history = []
    for t in range(1, steps + 1):
        grads = _grads(params, closure)
        with torch.no_grad():
            for p, g, m1, m2 in zip(params, grads, first, second):
                g = g + weight_decay * p
                weight_step(p, adam_direction(m1.update(g), m2.update(g * g), t, betas, eps), lr)
        history.append([p.detach().clone() for p in params])
    return history


def eq101_minimiser(grads: list[torch.Tensor], betas, eps: float) -> torch.Tensor:
    """Minimise Eq 101 numerically over the stored gradients g_1..g_t (element-wise m), by Newton's method.

    With normalised weights w1_i, w2_i of the two memories (w_i = (1 - beta) beta^(t-i) / (1 - beta^t)), the
    regression sum_i w_i (m g_i - P)^2 + lam m^2 expands to m^2 sum_i w_i g_i^2 - 2 m P sum_i w_i g_i + const;
    Adam takes the quadratic term's weights from the second memory and the linear term's from the first:

        L~(m) = sum_i [ w2_i m^2 g_i^2 - 2 w1_i m g_i P + w1_i P^2 ] + lam m^2,   P = sqrt(H^), lam = eps P,

    which is Eq 101 itself when beta1 = beta2."""
    t = len(grads)
    G = torch.stack(grads)
    shape = (t,) + (1,) * (G.dim() - 1)

    def weights(beta):
        return ((1 - beta) * beta ** torch.arange(t - 1, -1, -1, dtype=G.dtype) / (1 - beta**t)).reshape(shape)

    w1, w2 = weights(betas[0]), weights(betas[1])
    target = (w2 * G * G).sum(0).sqrt()
    lam = eps * target

    def objective(m):
        m = m.reshape(G.shape[1:])
        return (w2 * m * m * G * G - 2 * w1 * m * G * target + w1 * target**2).sum() + (lam * m * m).sum()

    return newton_minimize(objective, torch.zeros(G[0].numel(), dtype=G.dtype)).reshape(G.shape[1:])


def m3_from_levels(
    params, closure, steps: int, lr: float, betas=(0.95, 0.999, 0.9), alpha: float = 0.1, eps: float = 1e-8,
    frequency: int = 10, ns_steps: int = 5, ns_coefficients="quintic",
) -> list[list[torch.Tensor]]:
    """M3 (Algorithm 1, its default "ema" / eps-inside form) for 2-D ``params`` as four levels: the fast momentum
    M1 and the variance V every step, the weights every step, the slow momentum M2 every ``frequency`` steps on the
    sum of its chunk's gradients (the CMS rule, Eq 71, on the gradient flow). Both momenta are read through
    Newton-Schulz (a non-linear read-out, Eq 52); the slow one's read is fixed until its next update."""
    b1, b2, b3 = betas
    fast = [DotProductMemory(b1, 1.0) for _ in params]
    var = [DotProductMemory(b2, 1 - b2) for _ in params]
    slow = [DotProductMemory(b3, 1.0) for _ in params]
    pending = [torch.zeros_like(p) for p in params]
    slow_read = [torch.zeros_like(p) for p in params]
    history = []
    for t in range(1, steps + 1):
        grads = _grads(params, closure)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                pending[i] = pending[i] + g
                o1 = newton_schulz(fast[i].update(g), steps=ns_steps, coefficients=ns_coefficients)
                v_hat = var[i].update(g * g) / (1 - b2**t)
                weight_step(p, (o1 + alpha * slow_read[i]) / (v_hat + eps).sqrt(), lr)
                if t % frequency == 0:
                    slow_read[i] = newton_schulz(slow[i].update(pending[i]), steps=ns_steps,
                                                 coefficients=ns_coefficients)
                    pending[i] = torch.zeros_like(p)
        history.append([p.detach().clone() for p in params])
    return history
