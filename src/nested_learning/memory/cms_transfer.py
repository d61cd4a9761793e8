"""Knowledge transfer between CMS levels (Eq 24-30, 72-73), chosen per level with ``transfer=``.

Level l's slower neighbour is level l+1 (the next larger chunk size). Each level takes one of:

    "init"      Eq 28, 72-73   the stream starts from the level's slow weights, which the outer optimizer learns
                               (MAML-style initialisation). The default: the CMS as it always was.
    "backprop"  Sec 3.3        the outer gradient flows through the level's inner updates (their gradients keep
                               their graph, create_graph): the slower level (the outer optimizer) learns from the
                               faster level's whole in-context trajectory. ``mode="meta"`` is "backprop" everywhere.
    "direct"    Eq 24-27       the slower level's parameters condition the faster one: level l is read with
                               theta_l + gamma_l * theta_{l+1} (gamma_l a learned scalar, starting at 1). The read's
                               gradient w.r.t. the sum is level l's inner gradient (its own flow); level l+1 learns
                               only from its own read (no backpropagation between levels, Def 3).
    "generate"  Eq 29-30       the slower level generates the faster level's initial weights at each of its
                               boundaries (a hypernetwork): after level l+1 closes a chunk, level l restarts from
                               G_l(theta_{l+1}) = theta_l^0 + a_l * (theta_{l+1} - theta_{l+1}^0), a linear generator
                               (per-tensor gains a_l, learned, starting at 1) of what the slower level has learned
                               in context since the stream start, added to level l's own learned initial state.

Choices where the sources leave room (docs/equations.md): the parametric form of the direct connection (a learned
mix of the two levels' weights, so it works for any objective and keeps streaming exact), and the generator's
form (linear with one gain per weight tensor: a full hypernetwork from n to n weights would cost n^2 parameters).
"""

from __future__ import annotations

import torch
import torch.nn as nn

TRANSFERS = ("init", "backprop", "direct", "generate")


def parse_transfer(transfer, n_levels: int) -> tuple[str, ...]:
    """One transfer per level from a name (every level) or a sequence of names."""
    out = (transfer,) * n_levels if isinstance(transfer, str) else tuple(transfer)
    if len(out) != n_levels:
        raise ValueError(f"transfer needs one entry per level ({n_levels}), got {len(out)}")
    for lv, t in enumerate(out):
        if t not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS}, got {t!r}")
        if t in ("direct", "generate") and lv == n_levels - 1:
            raise ValueError(f"transfer {t!r} needs a slower level; level {lv + 1} is the slowest")
    return out


class LevelTransfer(nn.Module):
    """The learned parts of the transfers: ``gain[l]`` (direct) and ``generator[l]`` (generate), and the rules."""

    def __init__(self, transfers: tuple[str, ...], sizes: list[int]):
        super().__init__()
        self.transfers, self.sizes = transfers, sizes
        k = len(transfers)
        self.gain = nn.Parameter(torch.ones(k)) if "direct" in transfers else None
        self.generator = nn.Parameter(torch.ones(k, len(sizes))) if "generate" in transfers else None

    def keeps_graph(self, level: int) -> bool:
        return self.transfers[level] == "backprop"

    def read_weights(self, weights: list) -> list:
        """The weights each level is read with: theta_l + gamma_l theta_{l+1} for "direct", theta_l otherwise."""
        if self.gain is None:
            return weights
        out = list(weights)
        for lv, t in enumerate(self.transfers):
            if t == "direct":
                out[lv] = weights[lv] + self.gain[lv].to(weights[lv].dtype) * weights[lv + 1]
        return out

    def generate(self, weights: list, accs: list, slow, end: int, chunk_sizes) -> tuple[list, list]:
        """Restart every "generate" level whose slower neighbour closed a chunk at ``end`` (slowest first, so a
        generated level can generate the next faster one in turn). ``slow(l)``: level l's slow weights, flat."""
        if self.generator is None:
            return weights, accs
        weights, accs = list(weights), list(accs)
        for lv in range(len(self.transfers) - 2, -1, -1):
            if self.transfers[lv] != "generate" or end % chunk_sizes[lv + 1]:
                continue
            change = weights[lv + 1] - slow(lv + 1).to(weights[lv + 1].dtype)
            gains = torch.repeat_interleave(
                self.generator[lv].to(change.dtype), torch.tensor(self.sizes, device=change.device)
            )
            weights[lv] = slow(lv).to(change.dtype) + gains * change
            accs[lv] = torch.zeros_like(accs[lv])
        return weights, accs

    def describe(self, level: int) -> tuple[str, str] | None:
        """(rule, equation) text for ``nested_learning.nsam``; None for the default "init"."""
        t = self.transfers[level]
        return {
            "init": None,
            "backprop": ("outer gradient through its updates", "Sec 3.3"),
            "direct": (f"read with theta + gamma theta_{level + 2}", "Eq 24-27"),
            "generate": (f"restarts from G(theta_{level + 2}) at level {level + 2}'s boundaries", "Eq 29-30"),
        }[t]
