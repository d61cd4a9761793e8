"""Several models on the synthetic tasks at one training budget, several seeds: a table of mean ± std accuracy.

    python -m nested_learning.evaluation.synthetic_compare --models transformer,hope --seeds 0,1,2 \\
        --tasks in_context_recall --steps 1000 --lr 3e-4 --dim 128 --out_dir docs/results/synthetic_budget

Each (model, seed) run is written to ``out_dir/runs/<model>_seed<s>.json`` as it finishes (the JSON of
``synthetic_suite``) and skipped when it exists, so an interrupted comparison resumes and runs made by hand with
``python -m nested_learning.evaluation.synthetic_suite ... --out out_dir/runs/<model>_seed<s>.json`` count too;
a run whose settings differ from the ones asked is run again. ``out_dir/SUMMARY.md`` and ``summary.json`` hold the
table. The budget matters: at the small report's lr 3e-3 a two-layer Transformer++ never solves in-context recall,
at 3e-4 and width 128 it does (docs/results/experiments.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from nested_learning.data.synthetic import FORMAL_TASKS, MAD_TASKS
from nested_learning.evaluation.harness import write_json
from nested_learning.evaluation.synthetic_suite import SyntheticConfig, run_synthetic


def _same_settings(saved: dict, cfg: SyntheticConfig) -> bool:
    want = json.loads(json.dumps(dataclasses.asdict(cfg), default=list))
    have = saved.get("config", {})
    keys = ("steps", "batch_size", "lr", "n_test", "size", "overrides")
    return all(have.get(k) == want[k] for k in keys) and set(cfg.tasks) <= set(saved.get("tasks", {}))


def compare(models, seeds, cfg: SyntheticConfig, out_dir: str | Path) -> dict:
    """Run (or reuse) every model and seed; returns and writes the summary."""
    out = Path(out_dir)
    runs: dict = {}
    for model in models:
        for seed in seeds:
            path = out / "runs" / f"{model}_seed{seed}.json"
            saved = json.loads(path.read_text()) if path.is_file() else None
            if saved is None or not _same_settings(saved, cfg):
                saved = run_synthetic(model, cfg, seed)
                write_json(path, saved)
            runs[(model, seed)] = saved
    table = {
        model: {
            task: {
                "token_accuracy": [runs[(model, s)]["tasks"][task]["token_accuracy"] for s in seeds],
                "exact_match": [runs[(model, s)]["tasks"][task]["exact_match"] for s in seeds],
                "seconds": [runs[(model, s)]["tasks"][task].get("seconds") for s in seeds],
            }
            for task in cfg.tasks
        }
        for model in models
    }
    summary = {"config": json.loads(json.dumps(dataclasses.asdict(cfg), default=list)), "seeds": list(seeds),
               "results": table}
    write_json(out / "summary.json", summary)
    (out / "SUMMARY.md").write_text(summary_markdown(summary) + "\n")
    return summary


def summary_markdown(summary: dict) -> str:
    cfg, seeds = summary["config"], summary["seeds"]
    tasks = list(cfg["tasks"])
    lines = [f"Answer-token accuracy, mean ± std over seeds {seeds}; {cfg['steps']} steps of {cfg['batch_size']} "
             f"examples, lr {cfg['lr']}, model size {cfg['size']} with {cfg['overrides']}, {cfg['n_test']} test "
             "examples per task. Seconds: mean training-and-scoring time of one run.", "",
             "| model | " + " | ".join(tasks) + " | seconds |", "|---|" + "---:|" * (len(tasks) + 1)]
    for model, by_task in summary["results"].items():
        cells = []
        for task in tasks:
            acc = by_task[task]["token_accuracy"]
            cells.append(f"{np.mean(acc):.3f} ± {np.std(acc):.3f}" if len(acc) > 1 else f"{acc[0]:.3f}")
        secs = [s for t in tasks for s in by_task[t]["seconds"] if s is not None]
        per_run = f"{np.mean(secs) * len(tasks):.0f}" if secs else "-"
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {per_run} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from nested_learning.models import model_names

    p = argparse.ArgumentParser(description="Models on the synthetic tasks at one budget, several seeds.")
    p.add_argument("--models", default="transformer,hope")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--tasks", default="in_context_recall")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--out_dir", default="results/synthetic_compare")
    p.add_argument("--quick", action="store_true", help="2 steps, width 32, one layer (a smoke test)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    tasks = tuple(t for t in args.tasks.split(",") if t)
    if not models or set(models) - set(model_names()):
        p.error(f"--models must name registered models {model_names()}, got {args.models!r}")
    if not tasks or set(tasks) - set(MAD_TASKS + FORMAL_TASKS):
        p.error(f"--tasks must name tasks of {MAD_TASKS + FORMAL_TASKS}, got {args.tasks!r}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cfg = SyntheticConfig(tasks=tasks, steps=args.steps, lr=args.lr, overrides={"dim": args.dim, "n_layers": 2})
    if args.quick:
        cfg = dataclasses.replace(cfg, steps=2, batch_size=4, n_test=8, overrides={"dim": 32, "n_layers": 1},
                                  progress=False)
    summary = compare(models, seeds, cfg, args.out_dir)
    print(summary_markdown(summary))
    print(f"wrote {Path(args.out_dir) / 'SUMMARY.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
