"""Read a model's modules as associative memories: every in-context memory with its own chunk size, and the slow
weights that only the outer optimizer (or nothing, after training) changes."""

from __future__ import annotations

import re

import torch.nn as nn

from nested_learning.memory import (
    ContinuumMemorySystem,
    DeltaNetLayer,
    LinearAttentionLayer,
    NeuralMemory,
    SelfModifyingTitans,
)
from nested_learning.models.attention import CausalSelfAttention
from nested_learning.models.pretrained.attention import WindowedLlamaAttention

from .memory import FROZEN, NON_PARAMETRIC, AssociativeMemory, Frequency


def _attention(name: str, m: CausalSelfAttention, ctx: dict) -> list[AssociativeMemory]:
    return [AssociativeMemory(
        f"{name} (KV cache)", f"K, V: (B, {m.n_heads}, t, {m.head_dim}), every pair seen",
        "k_t = RoPE(W_k x_t)", "v_t = W_v x_t", "tokens",
        f"read o_t = argmin_o sum_i exp(q_t.k_i/sqrt({m.head_dim})) ||o - v_i||^2", "append (k_t, v_t)",
        "Eq 6 (non-parametric)", NON_PARAMETRIC,
    )]


def _windowed_attention(name: str, m: WindowedLlamaAttention, ctx: dict) -> list[AssociativeMemory]:
    return [AssociativeMemory(
        f"{name} (sliding KV cache)", f"K, V: (B, {m.n_kv_heads}, <= {m.window - 1}, {m.head_dim})",
        "k_t = RoPE(W_k x_t)", "v_t = W_v x_t", "tokens",
        f"read o_t = argmin_o sum_(i > t - {m.window}) exp(q_t.k_i/sqrt({m.head_dim})) ||o - v_i||^2",
        f"append (k_t, v_t), drop the pair {m.window} tokens back", "Eq 6 (non-parametric)", NON_PARAMETRIC,
    )]


def _linear_attention(name: str, m: LinearAttentionLayer, ctx: dict) -> list[AssociativeMemory]:
    phi = "elu+1" if m.feature_map == "elu" else "l2-normalise"
    decay = "alpha_t " if m.to_decay is not None else ""
    return [AssociativeMemory(
        f"{name} (S)", f"S: (B, {m.n_heads}, {m.head_dim}, {m.head_dim})", f"phi(k_t), phi = {phi}", "v_t",
        "tokens", "-<S phi(k), v>", f"S <- {decay}S + v phi(k)^T (GD, lr 1)", "Eq 14-18, 5", Frequency.every(1),
    )]


def _deltanet(name: str, m: DeltaNetLayer, ctx: dict) -> list[AssociativeMemory]:
    return [AssociativeMemory(
        f"{name} (S)", f"S: (B, {m.n_heads}, {m.head_dim}, {m.head_dim})", "k_t (l2-normalised)", "v_t", "tokens",
        "1/2 ||S k - v||^2", "S <- S (I - beta_t k k^T) + beta_t v k^T (GD, lr beta_t)", "Eq 65",
        Frequency.every(1),
    )]


def _neural_memory(name: str, m: NeuralMemory, ctx: dict) -> list[AssociativeMemory]:
    kind = type(m.memory).__name__
    return [AssociativeMemory(
        f"{name} (M)", f"{kind}, {m.n_heads} heads of width {m.head_dim}, momentum S", "k_t", "v_t", "tokens",
        "||M(k) - v||^2",
        f"S <- eta S - theta grad(M_c), M <- (1 - alpha) M + S (writes every token, M_c every C = {m.chunk_size})",
        "Eq 65 family, Eq 90", Frequency.every(m.chunk_size),
    )]


def _self_modifying_titans(name: str, m: SelfModifyingTitans, ctx: dict) -> list[AssociativeMemory]:
    kind = "linear" if type(m.memories).__name__.startswith("Linear") else "MLP (Eq 89)"
    objective = "1/2 ||M k - v_hat||^2" if m.objective == "l2" else "-<M k, v_hat>"
    return [AssociativeMemory(
        f"{name} (M_k, M_v, M_memory, M_eta, M_alpha)", f"{kind} memories, {m.n_heads} heads of width {m.head_dim}",
        "k_t = M_k(x_t)", "v_hat = M_box(v_t) (self-generated)", "tokens", objective,
        "M <- M (alpha_t I - eta_t k k^T) - eta_t grad L(M_c) "
        f"(DGD; writes every token, M_c every C = {m.chunk_size})",
        "Eq 83-90, 92-93", Frequency.every(m.chunk_size),
    )]


def _cms(name: str, m: ContinuumMemorySystem, ctx: dict) -> list[AssociativeMemory]:
    objective = ctx.get("cms_objective", "next_input")
    if objective == "lm":
        values, loss = "-dL/dy (next-token surprise)", "sum_t CE(logits_t, x_{t+1}) over the segment (Eq 8-9)"
    else:
        values, loss = "u_{t+1}", "1/2 sum_t ||MLP(u_t) - u_{t+1}||^2"
    lr = m.inner_lr().tolist()
    clip = "" if m.grad_clip is None else f", clipped to {m.grad_clip:g}"
    out = []
    for lv, C in enumerate(m.chunk_sizes):
        rule = f"theta <- theta - eta/C sum_chunk grad (C = {C}, eta = {lr[lv]:.3g}{clip})"
        eq = {"sequential": "Eq 70-71", "independent": "Eq 71, 74", "nested": "Eq 71-73"}[m.variant]
        if m.variant == "nested" and lv + 1 < m.n_levels:
            how = "a copy of" if m.nested_init == "copy" else "its own initial state plus a learned fraction of"
            rule += f"; restarts from {how} level {lv + 2} at its boundaries"
        transfer = getattr(m, "transfer", None)
        text = transfer.describe(lv) if transfer is not None else None
        if text:  # knowledge transfer from the slower level (memory/cms_transfer.py)
            rule += f"; {text[0]}"
            eq += f", {text[1]}"
        out.append(AssociativeMemory(
            f"{name}.level{lv + 1}", f"{m.form.name} MLP weights, {m.dim} -> {m.hidden} -> {m.dim}", "u_t (level input)", values,
            "activations", loss, rule, eq, Frequency.every(C),
        ))
    return out


READERS = {
    CausalSelfAttention: _attention,
    WindowedLlamaAttention: _windowed_attention,
    LinearAttentionLayer: _linear_attention,
    DeltaNetLayer: _deltanet,
    NeuralMemory: _neural_memory,
    SelfModifyingTitans: _self_modifying_titans,
    ContinuumMemorySystem: _cms,
}


def in_context_memories(model: nn.Module) -> list[AssociativeMemory]:
    """Every memory that learns inside a forward pass, in forward order, each reading the one before it."""
    ctx = {"cms_objective": getattr(model, "objective", "next_input")}
    out: list[AssociativeMemory] = []
    for name, module in model.named_modules():
        reader = READERS.get(type(module))
        if reader is None:
            continue
        for mem in reader(name or type(module).__name__, module, ctx):
            reads = (out[-1].component,) if out else ()
            out.append(AssociativeMemory(**{**mem.__dict__, "reads": reads}))
    return out


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters by owner: ``blocks.<i>.<part>`` inside a block, the top-level module otherwise."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for pname, p in model.named_parameters():
        parts = pname.split(".")
        depth = 3 if parts[0] == "blocks" and len(parts) > 3 else 1
        owner, rest = ".".join(parts[:depth]), ".".join(parts[depth:])
        groups.setdefault(owner, []).append((rest.removesuffix(".weight") or rest, p))
    return groups


def slow_weights(model: nn.Module, rule=None) -> list[AssociativeMemory]:
    """The slow weights, one memory per distinct update rule (owners listed in the component).
    ``rule(params) -> (update, equation, frequency, reads)`` comes from the optimizer; without one the weights are
    frozen after training (frequency 0)."""
    head, embed = getattr(model, "head", None), getattr(model, "embed", None)
    tied = head is not None and embed is not None and head.weight is embed.weight
    by_rule: dict[tuple, list[tuple[str, int]]] = {}
    for owner, params in parameter_groups(model).items():
        key = ("fixed after training", "Eq 4 (outer loop)", FROZEN, ()) if rule is None else rule(
            [p for _, p in params])
        label = f"{owner} (tied head)" if tied and owner == "embed" else owner
        by_rule.setdefault(key, []).append((label, sum(p.numel() for _, p in params)))
    out = []
    for (update, eq, freq, reads), owners in by_rule.items():
        names = sorted(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", o) for o, _ in owners), key=[
            re.sub(r"(?<=\.)\d+(?=\.|$)", "*", o) for o, _ in owners].index)
        out.append(AssociativeMemory(
            "slow weights: " + ", ".join(names), f"{sum(n for _, n in owners):,} params", "x (layer input)",
            "-dL/dy", "training data", "outer loss (next-token cross-entropy)", update, eq, freq, reads,
        ))
    return out
