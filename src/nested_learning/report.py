"""One report over every registered model: language modelling, continual learning, long context, synthetic tasks.

``run_report("quick")`` (about a minute, tiny everything) or ``run_report("small")`` (about 2 hours of runs on two shared CPU cores)
runs every suite of the preset (:mod:`nested_learning.evaluation.presets`) for every model of ``model_names()`` and
seed, writes one JSON per run and ``REPORT.md`` with tables and figures to ``out_dir``.

Resuming: a run is identified by (preset, suite, model, seed) and stored as
``out_dir/runs/<preset>/<suite>/<model>_seed<k>.json`` (written atomically); with ``resume=True`` a run whose JSON
exists is not run again, so an interrupted report continues where it stopped. The backbone a model's LM run
trains is kept beside it (``.../backbones/<model>_seed<k>.pt``) and reused by its continual-learning and NIAH runs.
A run that raises is recorded in ``.../failed/`` and listed in the report; the other runs go on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from pathlib import Path

from nested_learning import progress as prog
from nested_learning.evaluation.presets import ReportPreset, get_preset


def _jobs(preset: ReportPreset, models: list[str]) -> list[tuple[str, str, str, int]]:
    """(key, suite, model, seed) in run order: a model's LM runs first, since they make its backbones."""
    jobs = []
    for model in models:
        for suite in preset.suites:
            keys = [f"continual_{b}" for b in preset.benchmarks] if suite == "continual" else [suite]
            for key in keys:
                jobs += [(key, suite, model, seed) for seed in preset.seeds[suite]]
    return jobs


class _Runner:
    def __init__(self, preset: ReportPreset, out_dir: Path, resume: bool):
        self.preset, self.resume = preset, resume
        self.root = out_dir / "runs" / preset.name
        self.seconds: dict[str, float] = {}

    def path(self, key: str, model: str, seed: int) -> Path:
        return self.root / key / f"{model}_seed{seed}.json"

    def backbone_path(self, model: str, seed: int) -> Path:
        return self.root / "backbones" / f"{model}_seed{seed}.pt"

    def done(self, key: str, model: str, seed: int) -> bool:
        return self.resume and self.path(key, model, seed).is_file()

    def backbone(self, model: str, seed: int):
        """The model's LM-suite backbone for ``seed``, running that suite first if it is missing."""
        from nested_learning.evaluation.harness import load_backbone

        path = self.backbone_path(model, seed)
        if not path.is_file():
            self.run("lm", "lm", model, seed, force=True)
        return load_backbone(path)[0]

    def run(self, key: str, suite: str, model: str, seed: int, force: bool = False) -> None:
        from nested_learning.evaluation.harness import write_json

        if not force and self.done(key, model, seed) and (suite != "lm" or self.backbone_path(model, seed).is_file()):
            # reused: count the time the run took when it was made
            recorded = json.loads(self.path(key, model, seed).read_text()).get("seconds", 0.0)
            self.seconds[f"{key}/{model}"] = self.seconds.get(f"{key}/{model}", 0.0) + recorded
            return
        t0 = time.perf_counter()
        p = self.preset
        if suite == "lm":
            from nested_learning.evaluation.language_modeling import run_lm_suite

            result = run_lm_suite(model, p.pretrain, p.stream, seed, self.root / "train" / f"{model}_seed{seed}",
                                  self.backbone_path(model, seed))
        elif suite == "continual":
            from nested_learning.evaluation.continual import run_continual

            cfg = dataclasses.replace(p.continual, benchmark=key.split("_", 1)[1])
            result = run_continual(self.backbone(model, seed), cfg, seed)
        elif suite == "niah":
            from nested_learning.evaluation.long_context import run_long_context

            result = run_long_context(self.backbone(model, seed), p.niah, seed)
        elif suite == "synthetic":
            from nested_learning.evaluation.synthetic_suite import run_synthetic

            result = run_synthetic(model, p.synthetic, seed)
        else:
            raise ValueError(f"unknown suite {suite!r}")
        elapsed = time.perf_counter() - t0
        self.seconds[f"{key}/{model}"] = self.seconds.get(f"{key}/{model}", 0.0) + elapsed
        write_json(self.path(key, model, seed), {"preset": p.name, "key": key, "suite": suite, "model": model,
                                                 "seed": seed, "seconds": elapsed, "result": result})

    def records(self, jobs) -> tuple[list[dict], list[dict]]:
        done, failed = [], []
        for key, _, model, seed in jobs:
            path = self.path(key, model, seed)
            if path.is_file():
                done.append(json.loads(path.read_text()))
            elif (self.root / "failed" / f"{key}_{model}_seed{seed}.json").is_file():
                failed.append(json.loads((self.root / "failed" / f"{key}_{model}_seed{seed}.json").read_text()))
        return done, failed


def run_report(preset: str, out_dir: str | Path = "results", seeds=None, models=None, resume: bool = True,
               config_file: str | Path | None = None, progress: bool = True, threads: int | None = None) -> Path:
    """Run every suite of ``preset`` for every model (default: all registered) and write ``out_dir/REPORT.md``.

    Args:
        preset: ``"quick"`` or ``"small"``.
        out_dir: where ``REPORT.md``, ``report_<preset>.json``, ``plots/`` and ``runs/`` go.
        seeds: one list of seeds for every suite (default: the preset's per-suite seeds).
        models: model names (default: ``model_names()``).
        resume: skip a (suite, model, seed) whose JSON already exists.
        config_file: YAML overrides of the preset's fields.
        threads: torch threads (default: the preset's; 0 leaves torch's setting). On a two-core machine shared
            with other jobs, 1 thread was faster than 2 even for the large output-layer products.
    Returns the path of ``REPORT.md``.
    """
    import torch

    from nested_learning.evaluation.harness import write_json
    from nested_learning.evaluation.report_tables import render
    from nested_learning.models import model_names

    p = get_preset(preset, config_file)
    if seeds is not None:
        p = dataclasses.replace(p, seeds={s: tuple(seeds) for s in p.suites})
    if threads is not None:
        p = dataclasses.replace(p, threads=threads)
    if p.threads > 0:
        torch.set_num_threads(p.threads)
    models = list(models) if models else model_names()
    unknown = sorted(set(models) - set(model_names()))
    if unknown:
        raise ValueError(f"unknown models {unknown}; registered: {model_names()}")
    out = Path(out_dir)
    runner = _Runner(p, out, resume)
    jobs = _jobs(p, models)
    t0 = time.perf_counter()
    bar = prog.progress(jobs, desc=f"report {preset}", disable=not progress)
    for key, suite, model, seed in bar:
        bar.set_postfix(run=f"{key}/{model}/seed{seed}")
        fail_path = runner.root / "failed" / f"{key}_{model}_seed{seed}.json"
        try:
            runner.run(key, suite, model, seed)
            fail_path.unlink(missing_ok=True)
        except Exception as err:  # one broken model must not cost the whole report
            write_json(fail_path, {"key": key, "model": model, "seed": seed, "error": f"{type(err).__name__}: {err}",
                                   "traceback": traceback.format_exc()})
            prog.write(f"{key}/{model}/seed{seed} failed: {type(err).__name__}: {err}")
    records, failed = runner.records(jobs)
    runner.seconds["all runs (sum)"] = sum(runner.seconds.values())
    runner.seconds["this call"] = time.perf_counter() - t0
    text = render(p, records, failed, out, runner.seconds)
    report = out / "REPORT.md"
    report.write_text(text)
    write_json(out / f"report_{p.name}.json", {"preset": p.name, "models": models, "seconds": runner.seconds,
                                               "runs": records, "failed": failed})
    return report


def main(argv: list[str] | None = None) -> int:
    """``nested-learning report --preset quick|small [--out_dir results] [--models a,b] [--seeds 0,1]``; the preset
    ``pretrained`` runs the experiments on a Hope-ified pretrained LM (``evaluation/pretrained_report.py``)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="quick")
    if first.parse_known_args(argv)[0].preset == "pretrained":
        from nested_learning.evaluation.pretrained_report import main as pretrained_main

        return pretrained_main(argv)
    p = argparse.ArgumentParser(description="Run every experiment suite for every model and write REPORT.md.")
    p.add_argument("--preset", default="quick", choices=["quick", "small", "pretrained"])
    p.add_argument("--out_dir", default="results")
    p.add_argument("--models", default=None, help="comma-separated (default: every registered model)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds for every suite (default: the preset's)")
    p.add_argument("--config", default=None, help="YAML overrides of the preset")
    p.add_argument("--no_resume", action="store_true", help="run again even where results exist")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    args = p.parse_args(argv)
    path = run_report(args.preset, args.out_dir,
                      seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
                      models=[m for m in args.models.split(",") if m] if args.models else None,
                      resume=not args.no_resume, config_file=args.config, threads=args.threads)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
