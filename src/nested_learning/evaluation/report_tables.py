"""The report's Markdown tables and figures, built from the per-run JSON records (mean ± std over seeds).

A record is ``{"suite", "key", "model", "seed", "result"}`` (``key`` is the suite plus the benchmark for continual
learning). Failed runs are listed, not hidden; a cell a model cannot run (a context length beyond its limit) is
"n/a".
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from nested_learning.data.niah import NIAH_TASKS
from nested_learning.data.synthetic import FORMAL_TASKS, MAD_TASKS
from nested_learning.evaluation import plots

# The paper's numbers as summarised in the project's sources (shared/seeds/003): large pre-trained backbones,
# shown for orientation only; they are not comparable with the tiny CPU runs of this report.
PAPER_CL = {"clinc": "HOPE 93.4, InCA 69.2, ICL 63.7, EWC 60.1", "banking": "HOPE 85.2, InCA 63.9, ICL 58.1, EWC 55.7",
            "dbpedia": "HOPE 82.1, InCA 42.6, ICL 38.2, EWC 36.8"}
PAPER_NIAH = "at 16K: S-NIAH-1 HOPE 100 / Transformer 79.8; S-NIAH-3 HOPE 24.8 / Transformer 40.8 / Titans 21.2; " \
             "MK-NIAH-1 HOPE 14.8 / Transformer 61.4 / Titans 8.2"


def mean_std(values) -> tuple[float, float] | None:
    """Mean and std of the defined values (None: not applicable); a NaN (a diverged run) stays visible as NaN."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals)) if len(vals) > 1 else 0.0


def fmt(ms, digits: int = 3, na: str = "n/a") -> str:
    if ms is None:
        return na
    m, s = ms
    if math.isnan(m):
        return "NaN"
    return f"{m:.{digits}f}" if s == 0 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _by(records, suite_key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r["key"] == suite_key:
            out[r["model"]].append(r["result"])
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------------- sections
def lm_section(records, plot_dir: Path) -> str:
    runs = _by(records, "lm")
    if not runs:
        return ""
    rows = []
    for model, rs in runs.items():
        s = [r["streaming_ppl"] for r in rs]
        rows.append([model, f"{rs[0]['parameters'] / 1e6:.2f} M", str(len(rs)), fmt(mean_std(r["val_ppl"] for r in rs), 1),
                     *(fmt(mean_std(x.get(k) for x in s), 1) for k in ("carried", "reset", "updates_on", "updates_off")),
                     f"{np.mean([r['tokens_per_s'] for r in rs]):,.0f}"])
    cfg = next(iter(runs.values()))[0]
    plots.plot_loss_curves({m: rs[0]["history"] for m, rs in runs.items()}, plot_dir / "lm_loss.png",
                           title="LM pre-training loss (seed of the first run)")
    return "\n".join([
        "## Language modelling", "",
        f"{cfg['config']['steps']} steps of {cfg['config']['batch_size']} x {cfg['config']['seq_len']} tokens, size "
        f"`{cfg['config']['size']}` (overrides {cfg['backbone']['overrides'] or 'none'}). Streaming perplexity over "
        f"{cfg['stream_config']['n_docs']} test documents of up to {cfg['stream_config']['max_tokens']} tokens read "
        f"in chunks of {cfg['stream_config']['chunk']}: *carried* keeps the state across chunks, *reset* starts each "
        "chunk afresh, *updates on/off* switch test-time memory updates (models that have them).", "",
        _table(["model", "params", "seeds", "val ppl", "stream: carried", "reset", "updates on", "updates off",
                "train tok/s"], rows),
        "", "![LM loss](plots/lm_loss.png)", ""])


def continual_section(records, plot_dir: Path, benchmarks) -> str:
    parts = ["## Continual learning (class-incremental)", "",
             "Average accuracy after the last task, forgetting and backward transfer (definitions in "
             "`evaluation/continual_metrics.py`). Prediction: the label name of highest likelihood after "
             "`<text> =>`, among the classes seen so far.", ""]
    found = False
    for bench in benchmarks:
        runs = _by(records, f"continual_{bench}")
        if not runs:
            continue
        found = True
        cfg = next(iter(runs.values()))[0]["config"]
        parts += [f"### {bench}", "",
                  f"{cfg['n_tasks']} tasks x {cfg['classes_per_task']} classes, {cfg['train_per_class']} training and "
                  f"{cfg['test_per_class']} test examples per class. Paper (Fig 6): {PAPER_CL.get(bench, '-')}.", ""]
        rows, mats, curves = [], {}, {}
        for model, rs in runs.items():
            for method in rs[0]["methods"]:
                ms = [r["methods"][method] for r in rs if method in r["methods"]]
                rows.append([model, method, str(len(ms)), fmt(mean_std(m["average_accuracy"] for m in ms)),
                             fmt(mean_std(m["forgetting"] for m in ms)),
                             fmt(mean_std(m["backward_transfer"] for m in ms)),
                             fmt(mean_std(m["average_incremental_accuracy"] for m in ms))])
                mats[f"{model}/{method}"] = ms[0]["matrix"]
                curve = np.array([m["seen_accuracy_curve"] for m in ms], dtype=float)
                curves[f"{model}/{method}"] = (list(range(1, curve.shape[1] + 1)), curve.mean(0).tolist(),
                                               curve.std(0).tolist() if len(ms) > 1 else None)
        parts += [_table(["model", "method", "seeds", "avg acc", "forgetting", "BWT", "avg incremental acc"], rows), ""]
        plots.plot_accuracy_matrices(mats, plot_dir / f"cl_{bench}_matrices.png", title=f"{bench}: R[i, j]",
                                     ncols=len(next(iter(runs.values()))[0]["methods"]))
        plots.plot_lines(curves, plot_dir / f"cl_{bench}_curve.png", "tasks learned", "accuracy on seen tasks",
                         f"{bench}: accuracy on the tasks seen so far")
        parts += [f"![{bench} matrices](plots/cl_{bench}_matrices.png)", "",
                  f"![{bench} curve](plots/cl_{bench}_curve.png)", ""]
    return "\n".join(parts) if found else ""


def niah_section(records, plot_dir: Path) -> str:
    runs = _by(records, "niah")
    if not runs:
        return ""
    cfg = next(iter(runs.values()))[0]["config"]
    lengths = [str(n) for n in cfg["eval_lengths"]]
    parts = ["## Long context: needle in a haystack", "",
             f"Trained at {cfg['train_length']} tokens ({cfg['train_steps']} steps on NIAH + LM), evaluated at "
             f"{', '.join(lengths)} tokens, {cfg['n_eval']} instances per cell; exact match of the greedy answer. "
             f"Paper (Table 1) {PAPER_NIAH}.", ""]
    series = {}
    for model, rs in runs.items():
        rows = []
        for task in [t for t in NIAH_TASKS if t in rs[0]["exact_match"]]:
            rows.append([task] + [fmt(mean_std(r["exact_match"][task].get(n) for r in rs), 2) for n in lengths])
        avg = [mean_std(v for r in rs for t in r["exact_match"] for v in [r["exact_match"][t].get(n)]) for n in lengths]
        rows.append(["**mean**"] + [fmt(a, 2) for a in avg])
        rec = [mean_std(v for r in rs for t in r["recall"] for v in [r["recall"][t].get(n)]) for n in lengths]
        rows.append(["mean recall (RULER)"] + [fmt(a, 2) for a in rec])
        series[model] = ([int(n) for n in lengths], [a[0] if a else None for a in avg], None)
        parts += [f"### {model} (context limit: {rs[0].get('context_limit') or 'none'})", "",
                  _table(["task"] + lengths, rows), ""]
    plots.plot_lines(series, plot_dir / "niah_length.png", "context length (tokens)", "exact match (mean of tasks)",
                     "NIAH accuracy against context length", logx=True)
    return "\n".join(parts + ["![NIAH](plots/niah_length.png)", ""])


def synthetic_section(records, plot_dir: Path) -> str:
    runs = _by(records, "synthetic")
    if not runs:
        return ""
    cfg = next(iter(runs.values()))[0]["config"]
    parts = ["## Synthetic tasks", "",
             f"A fresh model per task ({cfg['overrides']}), {cfg['steps']} steps of {cfg['batch_size']} fresh "
             f"examples, scored on {cfg['n_test']} held-out ones: answer-token accuracy (mean ± std over seeds).", ""]
    for title, family, png in (("MAD (Table 4)", MAD_TASKS, "mad.png"), ("Formal languages (Table 5)", FORMAL_TASKS,
                                                                         "formal.png")):
        tasks = [t for t in family if t in cfg["tasks"]]
        if not tasks:
            continue
        rows, bars = [], {t: {} for t in tasks}
        for model, rs in runs.items():
            cells = []
            for t in tasks:
                ms = mean_std(r["tasks"][t]["token_accuracy"] for r in rs if t in r["tasks"])
                cells.append(fmt(ms))
                if ms:
                    bars[t][model] = ms
            rows.append([model, str(len(rs))] + cells)
        plots.plot_grouped_bars(bars, plot_dir / png, "answer-token accuracy", title)
        parts += [f"### {title}", "", _table(["model", "seeds"] + tasks, rows), "", f"![{title}](plots/{png})", ""]
    return "\n".join(parts)


def render(preset, records: list[dict], failures: list[dict], out_dir: Path, seconds: dict) -> str:
    """The whole REPORT.md text; figures are written to ``out_dir/plots``."""
    plot_dir = out_dir / "plots"
    head = [f"# Nested Learning: experiment report (preset `{preset.name}`)", "",
            "Tiny models trained for minutes on two CPU cores: the numbers test the pipeline and compare models "
            "under one budget; they are not the paper's scale. Seeds per suite: "
            + ", ".join(f"{k} {list(v)}" for k, v in preset.seeds.items()) + ".", ""]
    time_rows = [[k, f"{v:.0f}"] for k, v in sorted(seconds.items())]
    body = [lm_section(records, plot_dir), continual_section(records, plot_dir, preset.benchmarks),
            niah_section(records, plot_dir), synthetic_section(records, plot_dir)]
    tail = ["## Run time", "", _table(["suite/model", "seconds (reused runs: as recorded when made)"], time_rows), ""]
    if failures:
        tail += ["## Failed runs", "", _table(["suite", "model", "seed", "error"],
                                              [[f["key"], f["model"], str(f["seed"]), f["error"][:200]] for f in failures]), ""]
    return "\n".join(head + [b for b in body if b] + tail)
