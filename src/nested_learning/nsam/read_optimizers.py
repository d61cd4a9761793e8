"""Read an optimizer as associative memories over the gradient flow (Eq 10-13, 33-52, 101-111, Algorithm 1).

Each optimizer contributes the memories it keeps per parameter (momentum, moments, slow momentum) and the rule by
which the weights read them. Hyper-parameters are read from the optimizer's own param groups, so an M3 built with
``frequency=5`` shows its slow memory at 1/5 per step.
"""

from __future__ import annotations

import dataclasses

import torch

from nested_learning.optimizers import (
    DGD,
    M3,
    AdaGradAsMemory,
    AdamAsMemory,
    DeepMomentumGD,
    DeltaRuleMomentum,
    MomentumAsMemory,
    Muon,
    PreconditionedMomentum,
)

from .memory import AssociativeMemory, Frequency

STEP = Frequency.every(1, "step")


@dataclasses.dataclass
class Path:
    """What one kind of param group does: its memories and how the weights read them."""

    memories: list[AssociativeMemory]
    update: str
    equation: str


def _mem(component, state, keys, values, objective, update, equation, freq=STEP):
    return AssociativeMemory(component, state, keys, values, "gradients", objective, update, equation, freq)


def _dot_memory(component: str, name: str, value: str, retention: float, rate: float, equation: str,
                freq: Frequency = STEP) -> AssociativeMemory:
    """A value-less dot-product memory with retention (Eq 12-13): argmin -<m, value> + ||m - a m_t||^2 / (2 eta)."""
    eta = "" if rate == 1 else f" / (2 * {rate:g})"
    objective = f"-<{name}, {value}> + ||{name} - {retention:g} {name}_t||^2{eta or ' / 2'}"
    scaled = value if rate == 1 else f"{rate:g} {value}"
    return _mem(component, f"{name}: one per parameter", value, "1", objective,
                f"{name} <- {retention:g} {name} + {scaled}", equation, freq)


def _adam(prefix: str, beta1: float, beta2: float, eps: float) -> Path:
    first = _dot_memory(f"{prefix}.first moment M~", "M~", "g", beta1, 1 - beta1, "Eq 102")
    second = _dot_memory(f"{prefix}.second moment H", "H", "g^2", beta2, 1 - beta2, "Eq 102")
    return Path([first, second],
                f"W <- W - lr M^/(sqrt(H^) + {eps:g}), the argmin of Eq 101 (P = sqrt(H^), lam = eps P)",
                "Eq 101-105")


def _sgd_like(opt, prefix: str):
    g = opt.param_groups[0]
    if g.get("momentum", 0) == 0:
        return [(lambda gr: True, Path([], "W <- W - lr g (steepest descent)", "Eq 1-2"))]
    mem = _dot_memory(f"{prefix}.momentum m", "m", "g", g["momentum"], 1 - g.get("dampening", 0.0), "Eq 10-13")
    read = "g + mu m" if g.get("nesterov") else "m"
    return [(lambda gr: True, Path([mem], f"W <- W - lr {read}", "Eq 10"))]


def _adam_like(opt, prefix: str):
    g = opt.param_groups[0]
    path = _adam(prefix, *g["betas"][:2], g["eps"])
    if isinstance(opt, torch.optim.AdamW) or g.get("decoupled_weight_decay"):
        path.update = path.update.replace("W <- W", "W <- (1 - lr wd) W", 1)
    return [(lambda gr: True, path)]


def _adagrad(opt, prefix: str):
    g = opt.param_groups[0]
    h = _mem(f"{prefix}.accumulator H", "H: one per parameter", "g^2", "1", "-<H, g^2> (never forgets)",
             "H <- H + g^2", "Eq 106-108")
    update = f"W <- W - lr g/(sqrt(H) + {g['eps']:g}) (Eq 101 with M~ = g_t)"
    return [(lambda gr: True, Path([h], update, "Eq 106-111"))]


def _muon(opt, prefix: str):
    out = []
    muon = [g for g in opt.param_groups if g["use_muon"]]
    if muon:
        mu = muon[0]["momentum"]
        mem = _dot_memory(f"{prefix}.momentum B (matrices)", "B", "g", mu, 1 - mu, "Eq 10-13")
        update = "W <- W - lr NewtonSchulz(B) (momentum through a non-linearity)"
        out.append((lambda gr: gr["use_muon"], Path([mem], update, "Eq 52")))
    if len(muon) < len(opt.param_groups):
        g = next(g for g in opt.param_groups if not g["use_muon"])
        adam = _adam(f"{prefix}.adamw (others)", *g["adamw_betas"], g["adamw_eps"])
        out.append((lambda gr: not gr["use_muon"], adam))
    return out


def _m3(opt, prefix: str):
    out = []
    ortho = [g for g in opt.param_groups if g["orthogonalize"]]
    if ortho:
        g = ortho[0]
        (b1, b2, b3), f = g["betas"], g["frequency"]
        fast = _dot_memory(f"{prefix}.fast momentum M1", "M1", "g", b1, 1.0, "Algorithm 1")
        var = _dot_memory(f"{prefix}.variance V", "V", "g^2", b2, 1 - b2, "Algorithm 1")
        slow = _dot_memory(f"{prefix}.slow momentum M2", "M2", f"(sum of the last {f} g)", b3, 1.0,
                           "Algorithm 1, Eq 71", Frequency.every(f, "step"))
        update = f"W <- W - lr (NS(M1) + {g['alpha']:g} NS(M2)) / sqrt(V^ + eps)"
        out.append((lambda gr: gr["orthogonalize"], Path([fast, var, slow], update, "Algorithm 1")))
    if len(ortho) < len(opt.param_groups):
        g = next(g for g in opt.param_groups if not g["orthogonalize"])
        adam = _adam(f"{prefix}.adam (others)", *g["betas"][:2], g["eps"])
        out.append((lambda gr: not gr["orthogonalize"], adam))
    return out


def _dgd(opt, prefix: str):
    update = "W <- W (I - eta' x x^T) - eta' dL/dy x^T, eta' = eta/(1 + eta ||x||^2) (linear layers; GD elsewhere)"
    return [(lambda gr: True, Path([], update, "Eq 56-57"))]


def _linear_momentum(kind: str, equation: str):
    def read(opt, prefix: str):
        g = opt.param_groups[0]
        mu = g["momentum"]
        feature = g["feature_map"] if isinstance(g["feature_map"], str) else "custom"
        value = f"P phi(g) (P: {g['preconditioner']}, phi: {feature})"
        if kind == "delta":
            objective = f"({g['delta']:g}/2) <b, k>^2 - <b, P phi(g)>, k = phi(g)/|phi(g)|"
            retain = f"{mu:g} b - {g['delta']:g} (k k^T) b"
        else:
            objective = f"-<b, P phi(g)> + ||b - {mu:g} b_t||^2 / 2"
            retain = f"{mu:g} b"
        mem = _mem(f"{prefix}.momentum b", "b: one per parameter", "phi(g)", value, objective,
                   f"b <- {retain} + P phi(g)", equation)
        return [(lambda gr: True, Path([mem], "W <- W - lr b", equation))]

    return read


def _deep(opt, prefix: str):
    g = opt.param_groups[0]
    dot = g["objective"] == "dot"
    depth, hidden = g["memory_depth"], g["hidden"]
    if depth == 1:
        state, keys = "B: one per parameter (linear memory)", "u = g"
    elif g["memory"] == "rows":
        state = (f"B + s h(u/s), h: MLP over gradient rows R^c -> R^c (depth {depth}, hidden {hidden}, "
                 "tanh, zero read-out) per tensor")
        keys = "rows of u = g (RMS units)"
    else:
        state = f"B + s h(u/s), h: scalar MLP R -> R (depth {depth}, hidden {hidden}) shared by a tensor's coordinates"
        keys = "coordinates of u = g (RMS units)"
    mem = _mem(f"{prefix}.deep momentum f", state, keys, "1" if dot else "u",
               "-<f(u), u>" if dot else "||f(u) - u||^2 / 2", "one gradient step on (B, psi), then read f(g)", "Eq 50")
    return [(lambda gr: True, Path([mem], "W <- W - lr f(g)", "Eq 50"))]


READERS = [
    (MomentumAsMemory, _sgd_like), (torch.optim.SGD, _sgd_like),
    (AdamAsMemory, _adam_like), (torch.optim.Adam, _adam_like), (torch.optim.AdamW, _adam_like),
    (AdaGradAsMemory, _adagrad), (Muon, _muon), (M3, _m3), (DGD, _dgd), (DeepMomentumGD, _deep),
    (DeltaRuleMomentum, _linear_momentum("delta", "Eq 48-49")),
    (PreconditionedMomentum, _linear_momentum("preconditioned", "Eq 33-37")),
]


def read_optimizer(optimizer: torch.optim.Optimizer):
    """``(memories, weight_rule)``: the optimizer's memories, and ``weight_rule(params) -> (update, equation,
    frequency, reads)`` for the model's slow weights (the rule of the groups that hold them)."""
    name = type(optimizer).__name__
    reader = next((r for cls, r in READERS if type(optimizer) is cls), None)
    if reader is None:
        paths = [(lambda gr: True, Path([], f"W <- {name} step", "-"))]
    else:
        paths = reader(optimizer, name)
    memories = [m for _, path in paths for m in path.memories]

    def weight_rule(params):
        ids = {id(p) for p in params}
        chosen = []
        for group in optimizer.param_groups:
            if any(id(p) in ids for p in group["params"]):
                for select, path in paths:
                    if select(group) and path not in chosen:
                        chosen.append(path)
        if not chosen:
            return "not optimised", "-", Frequency(0.0), ()
        reads = tuple(m.component for path in chosen for m in path.memories)
        return (" | ".join(p.update for p in chosen), ", ".join(dict.fromkeys(p.equation for p in chosen)),
                STEP, reads)

    return memories, weight_rule
