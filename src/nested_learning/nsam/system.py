"""A nested system of associative memories (Def 3-4, Eq 19-20), its levels ordered by frequency.

    theta^(k)_{i,t+1} = argmin_Phi <Phi k_t^(i), -grad L_i^(k)(theta^(k)_{it}; k_t^(i), v_t^(i))>
                                   + ||Phi - theta^(k)_{it}||^2 / (2 eta^(k)_{i,t+1})              Eq 20 (Def 4)

Level k holds the problems that share a frequency; A > B (A is ordered before B) when A updates more often, and
among problems of the same frequency when B reads A's output (its context flow depends on A). Level 1 is the
fastest (attention's KV cache at frequency infinity), the last the slowest (weights frozen after training, 0).
"""

from __future__ import annotations

import dataclasses
import math
import re

from .memory import AssociativeMemory, Frequency


@dataclasses.dataclass(frozen=True)
class Level:
    index: int  # 1 = the highest frequency
    frequency: Frequency
    memories: tuple[AssociativeMemory, ...]


def _rank(f: Frequency, tokens_per_step: int | None) -> tuple[int, float]:
    """Sort key, smaller first: infinity, then finite rates (per token; optimizer steps after every stream level
    when the tokens of a step are not known, since a step spans at least one training sequence), then 0."""
    if f.rate == math.inf:
        return (0, 0.0)
    if f.rate == 0:
        return (3, 0.0)
    rate = f.per_token(tokens_per_step)
    return (2, -f.rate) if rate is None else (1, -rate)


def _by_dependency(memories: list[AssociativeMemory]) -> list[AssociativeMemory]:
    """Stable topological order: a memory comes after the memories it reads (ties keep the given order)."""
    names = {m.component for m in memories}
    done: set[str] = set()
    out, pending = [], list(memories)
    while pending:
        ready = [i for i, m in enumerate(pending) if all(r in done or r not in names for r in m.reads)]
        m = pending.pop(ready[0] if ready else 0)  # no ready one: a cycle, keep the given order
        out.append(m)
        done.add(m.component)
    return out


@dataclasses.dataclass
class NestedSystem:
    """A model (and its optimizer) read as associative memories. ``levels()`` orders them by >."""

    name: str
    memories: list[AssociativeMemory]
    tokens_per_step: int | None = None

    def levels(self) -> list[Level]:
        groups: dict[tuple[int, float], list[AssociativeMemory]] = {}
        for m in self.memories:
            groups.setdefault(_rank(m.frequency, self.tokens_per_step), []).append(m)
        return [
            Level(i + 1, members[0].frequency, tuple(_by_dependency(members)))
            for i, (_, members) in enumerate(sorted(groups.items(), key=lambda kv: kv[0]))
        ]

    COLUMNS = ("level", "component", "frequency", "context flow", "objective", "update rule", "equation")

    def rows(self) -> list[tuple[str, ...]]:
        """One row per memory; the same memory in every layer (``blocks.0.x``, ``blocks.1.x``) is one row
        ``blocks.*.x`` when all its other fields agree."""
        rows: list[tuple[str, ...]] = []
        seen: dict[tuple, int] = {}
        for level in self.levels():
            for m in level.memories:
                pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", m.component)
                row = (
                    str(level.index), pattern, str(m.frequency), f"{m.context}: {m.keys} -> {m.values}",
                    m.objective, m.update, m.equation,
                )
                if row in seen:
                    continue
                seen[row] = len(rows)
                rows.append(row)
        return rows

    def markdown(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|")

        lines = ["| " + " | ".join(self.COLUMNS) + " |", "|" + " --- |" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows()]
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = [self.COLUMNS, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.COLUMNS))]
        lines = [self.name]
        for j, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)
