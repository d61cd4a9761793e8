"""Tables and plots of the pretrained report (``evaluation/pretrained_report.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nested_learning.evaluation.continual import ALL_METHODS

CL_NAMES = {"finetune": "fine-tuning", "ewc": "EWC", "icl": "ICL (1 shot / class, window)",
            "stream_frozen": "all examples streamed, CMS frozen", "memory": "Hope: streamed, CMS learning",
            "zero_shot": "original model, no context (zero-shot)",
            "cms_only": "Hope: CMS learned from the stream, window emptied"}


def _mean_sd(xs) -> str:
    xs = [x for x in xs if x is not None and not np.isnan(x)]
    if not xs:
        return "-"
    return f"{np.mean(xs):.3f} ± {np.std(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def stream_table(stream: dict) -> list[str]:
    ppl, cfg = stream["perplexity"], stream["config"]
    lines = ["| window | " + " | ".join(cfg["conditions"]) + " |", "|---" * (len(cfg["conditions"]) + 1) + "|"]
    for w in cfg["windows"]:
        cells = [f"{ppl[f'{c}@{w}']:.2f}" if f"{c}@{w}" in ppl else "-" for c in cfg["conditions"]]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    docs = sorted({r["doc"] for r in stream["rows"]})
    tokens = sum(r["tokens"] for r in stream["rows"] if r["condition"] == cfg["conditions"][0]) // max(
        len(cfg["windows"]), 1)
    lines += ["", f"{len(docs)} documents, {tokens} scored tokens per condition, read in pieces of {cfg['piece']} "
              f"tokens; dynamic evaluation: SGD at lr {cfg['dynamic_lr']} on the MLP weights after each piece."]
    return lines


def continual_table(cl: dict) -> list[str]:
    by_bench: dict = {}
    for run in cl.values():
        by_bench.setdefault(run["benchmark"], []).append(run)
    lines = ["| benchmark | method | average accuracy | forgetting | backward transfer | chance (last task) |",
             "|---|---|---:|---:|---:|---:|"]
    for bench, runs in by_bench.items():
        n_classes = sum(len(t) for t in runs[0]["tasks"])
        for m in ALL_METHODS:
            rs = [r["methods"][m] for r in runs if m in r["methods"]]
            if not rs:
                continue
            lines.append(f"| {bench} | {CL_NAMES.get(m, m)} | {_mean_sd([r['average_accuracy'] for r in rs])} | "
                         f"{_mean_sd([r['forgetting'] for r in rs])} | {_mean_sd([r['backward_transfer'] for r in rs])}"
                         f" | {1 / n_classes:.3f} |")
    seeds = sorted({r["seed"] for r in cl.values()})
    lines += ["", f"Mean ± standard deviation over seeds {seeds} (each seed draws other classes and examples)."]
    return lines


def _niah_cells(niah: dict):
    """(task, length, condition, recall) of every NIAH cell of every seed (keys "task|length|condition")."""
    for run in niah.values():
        for key, v in run.items():
            if key != "seconds":
                task, length, cond = key.split("|")
                yield task, int(length), cond, v["recall"]


def niah_table(niah: dict) -> list[str]:
    cells: dict = {}
    for task, length, cond, recall in _niah_cells(niah):
        cells.setdefault((task, length), {}).setdefault(cond, []).append(recall)
    conds = ["original_full_window", "original", "cms_frozen", "cms_on"]
    lines = ["| task | length | seeds | " + " | ".join(f"{c} recall" for c in conds) + " |",
             "|---|---:|---:|" + "---:|" * len(conds)]
    for (task, length), v in sorted(cells.items()):
        seeds = max(len(x) for x in v.values())
        lines.append(f"| {task} | {length} | {seeds} | " + " | ".join(_mean_sd(v.get(c, [])) for c in conds) + " |")
    return lines


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    (out / "plots").mkdir(parents=True, exist_ok=True)
    if "stream" in results:
        ppl, cfg = results["stream"]["perplexity"], results["stream"]["config"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        width = 0.8 / len(cfg["conditions"])
        for i, c in enumerate(cfg["conditions"]):
            ys = [ppl.get(f"{c}@{w}", np.nan) for w in cfg["windows"]]
            bars = ax.bar(np.arange(len(cfg["windows"])) + i * width, ys, width, label=c)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(np.arange(len(cfg["windows"])) + 0.4 - width / 2, [f"window {w}" for w in cfg["windows"]])
        ax.set_ylabel("perplexity (lower is better)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "plots" / "pretrained_stream.png", dpi=120)
        plt.close(fig)
        made.append("plots/pretrained_stream.png")
    if "continual" in results:
        by_bench: dict = {}
        for run in results["continual"].values():
            by_bench.setdefault(run["benchmark"], []).append(run)
        fig, ax = plt.subplots(figsize=(7, 3.4))
        methods = [m for m in ALL_METHODS if all(m in r["methods"] for rs in by_bench.values() for r in rs)]
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            means = [np.mean([r["methods"][m]["average_accuracy"] for r in runs]) for runs in by_bench.values()]
            sds = [np.std([r["methods"][m]["average_accuracy"] for r in runs]) for runs in by_bench.values()]
            bars = ax.bar(np.arange(len(by_bench)) + i * width, means, width, yerr=sds, label=CL_NAMES[m])
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        for j, runs in enumerate(by_bench.values()):
            chance = 1 / sum(len(t) for t in runs[0]["tasks"])
            ax.hlines(chance, j - width / 2, j + 0.8, colors="k", linestyles="dotted")
        ax.set_xticks(np.arange(len(by_bench)) + 0.4 - width / 2, list(by_bench))
        ax.set_ylabel("average accuracy")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "plots" / "pretrained_continual.png", dpi=120)
        plt.close(fig)
        made.append("plots/pretrained_continual.png")
    if "niah" in results:
        path = _niah_plot(results["niah"], out, plt)
        if path:
            made.append(path)
    return made


def _niah_plot(niah: dict, out: Path, plt) -> str | None:
    """Recall against haystack length per condition, mean over the tasks measured at every length and seeds."""
    cells: dict = {}
    for task, length, cond, recall in _niah_cells(niah):
        cells.setdefault(cond, {}).setdefault(length, {}).setdefault(task, []).append(recall)
    lengths = sorted({n for by_len in cells.values() for n in by_len})
    if len(lengths) < 2:
        return None
    tasks = set.intersection(*(set(by_task) for by_len in cells.values() for by_task in by_len.values()))
    if not tasks:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    # distinct markers and dashes: conditions that score the same (the windowed ones often do) stay visible
    styles = {"original_full_window": ("o", "-"), "original": ("s", "--"), "cms_frozen": ("^", ":"),
              "cms_on": ("x", "-.")}
    for cond, (marker, dash) in styles.items():
        if cond in cells:
            ys = [np.mean([np.mean(cells[cond][n][t]) for t in tasks]) if n in cells[cond] else np.nan
                  for n in lengths]
            ax.plot(lengths, ys, marker=marker, linestyle=dash, markersize=7, label=cond)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("haystack length (tokens)")
    ax.set_ylabel("recall, mean over " + ", ".join(sorted(tasks)))
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "plots" / "pretrained_niah.png", dpi=120)
    plt.close(fig)
    return "plots/pretrained_niah.png"


def write_report(results: dict, out: Path) -> Path:
    cfg = results["config"]
    lines = [f"# Hope-ified {cfg['model']}: the paper's experiments", "",
             f"Hope-ification: {cfg['hope']}; attention window {cfg['window']} tokens.", ""]
    if "stream" in results:
        lines += ["## Streaming perplexity (held-out documents)", "", *stream_table(results["stream"]), ""]
    if "continual" in results:
        lines += ["## Class-incremental continual learning (Fig 6)", "", *continual_table(results["continual"]), ""]
    if "niah" in results:
        lines += ["## Needle in a haystack (Table 1)", "", *niah_table(results["niah"]), "",
                  "Recall of the asked values in the greedy answer, mean over seeds."]
    for p in plots(results, out):
        lines += ["", f"![{p}]({p})"]
    path = out / "REPORT_pretrained.md"
    path.write_text("\n".join(lines) + "\n")
    return path
