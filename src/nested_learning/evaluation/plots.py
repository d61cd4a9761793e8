"""Plots for reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(histories: dict[str, list[dict]], path: str | Path, title: str = "Training loss") -> Path:
    """One line per run of train loss against tokens seen; validation points as markers."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, rows) in enumerate(histories.items()):
        color = f"C{i}"
        steps = [r["step"] for r in rows if "loss" in r]
        losses = [r["loss"] for r in rows if "loss" in r]
        ax.plot(steps, _smooth(losses), color=color, label=f"{name} (train)")
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{name} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_matrices(matrices: dict[str, list[list[float | None]]], path: str | Path,
                           title: str = "Accuracy matrix", ncols: int = 4) -> Path:
    """One heatmap per entry of ``R[i, j]`` (row: after task i; column: test task j), ``ncols`` per row of the
    grid (e.g. one row per model, one column per method); undefined cells blank."""
    import numpy as np

    n = max(len(matrices), 1)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.7 * ncols + 0.8, 2.6 * nrows + 0.4), squeeze=False)
    im = None
    for k, ax in enumerate(axes.flat):
        if k >= len(matrices):
            ax.axis("off")
            continue
        name, rows = list(matrices.items())[k]
        R = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(R):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(R.shape[1]))
        ax.set_yticks(range(R.shape[0]))
        if k % ncols == 0:
            ax.set_ylabel("after task i")
        if k // ncols == nrows - 1:
            ax.set_xlabel("test task j")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_lines(series: dict[str, tuple[list, list, list | None]], path: str | Path, xlabel: str, ylabel: str,
               title: str, logx: bool = False, ylim: tuple | None = (-0.02, 1.02)) -> Path:
    """``series[name] = (x, mean, std or None)``; gaps (None) in ``mean`` are left out of the line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, (xs, ys, err)) in enumerate(series.items()):
        pts = [(x, y, e) for x, y, e in zip(xs, ys, err or [0] * len(ys)) if y is not None]
        if not pts:
            continue
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e if err else None, marker="o", capsize=3, color=f"C{i % 10}", label=name)
    if logx:
        xs_all = sorted({x for xs, _, _ in series.values() for x in xs})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x) for x in xs_all])
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_grouped_bars(values: dict[str, dict[str, tuple[float, float]]], path: str | Path, ylabel: str,
                      title: str) -> Path:
    """``values[group][member] = (mean, std)``: one group of bars per key (e.g. task), one bar per member (model)."""
    import numpy as np

    groups = list(values)
    members = sorted({m for g in values.values() for m in g})
    width = 0.8 / max(len(members), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.0))
    for k, m in enumerate(members):
        xs = np.arange(len(groups)) + k * width
        ys = [values[g].get(m, (np.nan, 0))[0] for g in groups]
        es = [values[g].get(m, (np.nan, 0))[1] for g in groups]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=m, color=f"C{k % 10}")
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)
