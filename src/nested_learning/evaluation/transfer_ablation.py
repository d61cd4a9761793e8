"""Ablation of the four knowledge transfers between CMS levels (Eq 24-30, 72-73) in a small HOPE.

For each transfer and seed: pre-train HOPE on the corpus (the trainer, as every suite), then measure

* streaming perplexity over long held-out documents (:mod:`language_modeling`: state carried, CMS updates on /
  off, and reset at every chunk);
* class-incremental continual learning with the ``memory`` method (:mod:`continual`): the tasks' examples are
  streamed through the model and only the in-context levels learn, which is where a transfer between levels acts.

"direct" and "generate" apply to every level but the slowest (which has no slower level); "init" and "backprop"
to every level. ``--quick`` runs a seconds-long version (the entry-point test).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from nested_learning.data.continual import make_stream
from nested_learning.evaluation.backbone import PretrainConfig, pretrain
from nested_learning.evaluation.continual import CLConfig, run_method
from nested_learning.evaluation.harness import write_json
from nested_learning.evaluation.language_modeling import StreamConfig, long_documents, streaming_perplexities
from nested_learning.memory.cms_transfer import TRANSFERS


def level_transfers(transfer: str, n_levels: int) -> tuple[str, ...]:
    if transfer in ("direct", "generate"):
        return (transfer,) * (n_levels - 1) + ("init",)
    return (transfer,) * n_levels


@dataclasses.dataclass
class AblationConfig:
    transfers: tuple = TRANSFERS
    seeds: tuple = (0, 1, 2)
    model: dict = dataclasses.field(default_factory=lambda: dict(
        dim=64, n_layers=1, n_heads=4, chunk_sizes=(8, 32), titans_chunk_size=8))
    pretrain: PretrainConfig = dataclasses.field(default_factory=lambda: PretrainConfig(
        steps=120, seq_len=64, batch_size=4, lr=3e-3, max_docs=2000, eval_batches=4, progress=False))
    stream: StreamConfig = dataclasses.field(default_factory=lambda: StreamConfig(
        n_docs=2, min_tokens=512, max_tokens=512, chunk=128))
    continual: CLConfig = dataclasses.field(default_factory=lambda: CLConfig(
        benchmark="clinc", n_tasks=3, classes_per_task=3, train_per_class=4, test_per_class=3,
        methods=("memory",), max_text_tokens=24, progress=False))


def quick_config() -> AblationConfig:
    return AblationConfig(
        seeds=(0,), model=dict(dim=16, n_layers=1, n_heads=2, chunk_sizes=(4, 8), titans_chunk_size=4),
        pretrain=PretrainConfig(steps=2, seq_len=16, batch_size=2, max_docs=100, eval_batches=1, progress=False),
        stream=StreamConfig(n_docs=1, min_tokens=64, max_tokens=64, chunk=32),
        continual=CLConfig(n_tasks=2, classes_per_task=2, train_per_class=2, test_per_class=2, methods=("memory",),
                           max_text_tokens=12, progress=False),
    )


def run_one(transfer: str, seed: int, cfg: AblationConfig, run_dir: Path) -> dict:
    t0 = time.perf_counter()
    n_levels = len(cfg.model["chunk_sizes"])
    overrides = {**cfg.model, "cms_transfer": level_transfers(transfer, n_levels)}
    pre = dataclasses.replace(cfg.pretrain, overrides=overrides)
    model, summary, _ = pretrain("hope", pre, seed, run_dir / f"{transfer}_{seed}")
    streaming = streaming_perplexities(model, long_documents(cfg.stream), cfg.stream.chunk)
    stream = make_stream(cfg.continual.benchmark, cfg.continual.n_tasks, cfg.continual.classes_per_task,
                         cfg.continual.train_per_class, cfg.continual.test_per_class, seed)
    cl = run_method(model, stream, "memory", cfg.continual, seed)
    return {"transfer": transfer, "seed": seed, "val_ppl": summary["val_ppl"], "streaming_ppl": streaming,
            "continual": {k: cl[k] for k in ("average_accuracy", "forgetting", "backward_transfer", "matrix")},
            "seconds": time.perf_counter() - t0}


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every reported number, per transfer."""
    out = {}
    for t in dict.fromkeys(r["transfer"] for r in runs):
        rows = [r for r in runs if r["transfer"] == t]
        metrics = {
            "val_ppl": [r["val_ppl"] for r in rows],
            "stream_ppl_updates_on": [r["streaming_ppl"]["updates_on"] for r in rows],
            "stream_ppl_updates_off": [r["streaming_ppl"]["updates_off"] for r in rows],
            "stream_ppl_reset": [r["streaming_ppl"]["reset"] for r in rows],
            "cl_average_accuracy": [r["continual"]["average_accuracy"] for r in rows],
            "cl_forgetting": [r["continual"]["forgetting"] for r in rows],
        }
        out[t] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                  for k, v in metrics.items() if all(x is not None and math.isfinite(x) for x in v)}
    return out


def markdown_table(summary: dict) -> str:
    cols = [("val_ppl", "val ppl"), ("stream_ppl_updates_on", "stream ppl (updates on)"),
            ("stream_ppl_updates_off", "stream ppl (updates off)"), ("stream_ppl_reset", "stream ppl (reset)"),
            ("cl_average_accuracy", "CL avg acc"), ("cl_forgetting", "CL forgetting")]
    lines = ["| transfer | " + " | ".join(c for _, c in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for t, m in summary.items():
        cells = [f"{m[k]['mean']:.3g} ± {m[k]['std']:.2g}" if k in m else "-" for k, _ in cols]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``transfer_ablation.py [--seeds 0,1,2] [--steps N] [--quick] [--out results/transfer_ablation.json]``."""
    p = argparse.ArgumentParser(description="Ablation of the CMS knowledge transfers (Eq 24-30) in a small HOPE.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--transfers", default=",".join(TRANSFERS))
    p.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the config's)")
    p.add_argument("--out", default="results/transfer_ablation.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    cfg = quick_config() if args.quick else AblationConfig()
    cfg = dataclasses.replace(cfg, transfers=tuple(args.transfers.split(",")),
                              seeds=cfg.seeds if args.quick else tuple(int(s) for s in args.seeds.split(",")))
    if args.steps is not None:
        cfg.pretrain = dataclasses.replace(cfg.pretrain, steps=args.steps)
    out = Path(args.out)
    runs = []
    for seed in cfg.seeds:
        for t in cfg.transfers:
            runs.append(run_one(t, seed, cfg, out.parent / "runs" / "transfer_ablation"))
            r = runs[-1]
            print(f"{t:9s} seed {seed}: val ppl {r['val_ppl']:.1f}, stream ppl on {r['streaming_ppl']['updates_on']:.1f}"
                  f", CL acc {r['continual']['average_accuracy']:.3f} ({r['seconds']:.0f} s)", flush=True)
    summary = summarize(runs)
    config = dataclasses.asdict(cfg)
    write_json(out, {"config": config, "runs": runs, "summary": summary})
    print(markdown_table(summary))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
