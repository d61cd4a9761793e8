"""The paper's experiments on a Hope-ified pretrained LM (Sec 7.3): streaming perplexity, class-incremental
continual learning (Fig 6) and needle-in-a-haystack (Table 1), each beside the frozen model, the original model,
the baselines and chance.

    nested-learning report --preset pretrained [--out_dir docs/results/pretrained] [--seeds 0,1,2]
        [--stream_windows 64,256,1024] [--niah_lengths 1024,2048,4096,8000 --niah_tasks s_niah_1 --niah_n 2]
        [--suites continual --methods ewc --ewc_lambda 1e5 --benchmarks clinc --n_tasks 5 --classes_per_task 4]

One JSON (``pretrained_report.json``), one markdown report (``REPORT_pretrained.md``) and plots under ``plots/``.
Every suite's result is also kept under ``runs/`` as it finishes (each stream window, NIAH length and
continual-learning run on its own, a continual-learning run method by method) and reused on a rerun (``--no_resume``
to redo); the NIAH table shows every cell saved under ``runs/``, so seeds and lengths run one at a time add up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from nested_learning.evaluation.continual import ALL_METHODS, CLConfig, run_continual
from nested_learning.evaluation.harness import write_json
from nested_learning.evaluation.pretrained_stream import (
    PretrainedStreamConfig,
    held_out_documents,
    original_with_window,
    run_pretrained_stream,
    summarise_stream,
)

# the Hope-ified model of the report: the MLPs of the top half of the layers become two levels (C = 64, 256), copies
# of the pretrained MLP (half the layers: half the cost of the inner gradients on 2 CPU cores; all 30 layers gave
# 52.8 against 54.0 perplexity on one document, docs/equations.md)
DEFAULT_HOPE = {"chunk_sizes": (64, 256), "scheme": "copies", "inner_lr": 0.1, "grad_clip": None,
                "layers": tuple(range(15, 30))}


@dataclasses.dataclass
class PretrainedReportConfig:
    model: str = "smollm2-135m"
    hope: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_HOPE))
    window: int = 256
    seeds: tuple = (0, 1, 2)
    suites: tuple = ("stream", "continual", "niah")
    stream: PretrainedStreamConfig = dataclasses.field(default_factory=PretrainedStreamConfig)
    text_file: str | None = None
    benchmarks: tuple = ("clinc", "banking", "dbpedia")
    continual: CLConfig = dataclasses.field(default_factory=lambda: CLConfig(
        n_tasks=3, classes_per_task=3, train_per_class=5, test_per_class=3, methods=ALL_METHODS, epochs=2,
        batch_size=8, lr=5e-5, ewc_lambda=1000.0, fisher_samples=12, icl_shots=1, max_text_tokens=32,
        score_updates=False))
    niah_tasks: tuple = ("s_niah_1", "s_niah_2", "s_niah_3", "mk_niah", "mq_niah", "mv_niah")
    niah_lengths: tuple = (1024,)
    niah_n: int = 2
    niah_seeds: tuple = (0,)
    progress: bool = True


PRESETS = {"pretrained": PretrainedReportConfig}


def build_models(cfg: PretrainedReportConfig, checkpoint: str | None = None):
    """(Hope-ified model with updates off, the original with the same window, tokenizer). ``checkpoint``: a trainer
    run of a Hope-ified model (continual pre-training) to evaluate instead of a fresh Hope-ification."""
    from nested_learning.models import hopeify, load_pretrained

    if checkpoint is not None:
        from nested_learning.cli import _load_run
        from nested_learning.evaluation.pretrained_stream import with_window

        hope, config = _load_run(checkpoint)
        cfg.model, cfg.hope = config.size, {k: v for k, v in config.model_overrides.items() if k != "window"}
        hf, tok = load_pretrained(cfg.model)
        with_window(hope, cfg.window).set_test_time_updates(False)
        return hope, original_with_window(hf, tok, cfg.window), tok
    hf, tok = load_pretrained(cfg.model)
    hope = hopeify(hf, tokenizer=tok, window=cfg.window, **cfg.hope)
    hope.set_test_time_updates(False)
    return hope, original_with_window(hf, tok, cfg.window), tok


# ------------------------------------------------------------------------------------------------ NIAH
def niah(hope, original, cfg: PretrainedReportConfig, seed: int, lengths=None) -> dict:
    """Exact match and recall per task and length (``lengths``, default ``cfg.niah_lengths``): Hope with CMS
    updates on, frozen, the original model with the same window, and the original reading the whole haystack (its
    full window: the reference no window limits)."""
    from nested_learning.data.niah import make_instance
    from nested_learning.evaluation.long_context import greedy_answer, score
    from nested_learning.evaluation.pretrained_stream import with_window
    from nested_learning.progress import progress

    out = {}
    full = int(original.hf_config.max_position_embeddings)
    models = {"cms_on": (hope, True, cfg.window), "cms_frozen": (hope, False, cfg.window),
              "original": (original, False, cfg.window), "original_full_window": (original, False, full)}
    jobs = [(t, n) for t in cfg.niah_tasks for n in (cfg.niah_lengths if lengths is None else lengths)]
    bar = progress(jobs, desc=f"NIAH seed {seed}", disable=not cfg.progress)
    for task, length in bar:
        bar.set_postfix_str(f"{task} at {length} tokens")
        insts = [make_instance(task, length, seed, i, "test", tokenizer=hope.tokenizer) for i in range(cfg.niah_n)]
        for name, (m, learn, window) in models.items():
            with_window(m, window)
            m.set_test_time_updates(learn)
            res = [score(i, greedy_answer(m, i.input_ids, len(i.answer_ids), 512), hope.tokenizer) for i in insts]
            out[f"{task}|{length}|{name}"] = {"exact_match": float(np.mean([r[0] for r in res])),
                                               "recall": float(np.mean([r[1] for r in res])),
                                               "sample": res[0][2]}
    hope.set_test_time_updates(False)
    with_window(original, cfg.window)
    return out


# ------------------------------------------------------------------------------------------------ runner
def run(cfg: PretrainedReportConfig, out_dir: str | Path, resume: bool = True, models=None,
        checkpoint: str | None = None) -> dict:
    out = Path(out_dir)
    runs = out / "runs"
    hope, original, tok = models or build_models(cfg, checkpoint)

    def cached(name: str, fn, valid=lambda saved: True):
        """The saved result ``runs/<name>.json`` if it exists and is ``valid``, else ``fn()`` timed and saved."""
        path = runs / f"{name}.json"
        if resume and path.is_file():
            saved = json.loads(path.read_text())
            if valid(saved):
                return saved
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = time.perf_counter() - t0
        write_json(path, result)
        return result

    results: dict = {"config": _jsonable(dataclasses.asdict(cfg))}
    if "stream" in cfg.suites:
        docs = held_out_documents(tok, cfg.stream.n_docs, cfg.stream.min_tokens, cfg.stream.max_tokens,
                                  cfg.text_file)
        results["stream"] = _stream(cfg, docs, runs, resume, cached, hope, original)
    if "continual" in cfg.suites:
        cl_cfg = dataclasses.replace(cfg.continual, progress=cfg.progress)
        results["continual"] = {
            f"{b}_seed{s}": _continual_run(hope, dataclasses.replace(cl_cfg, benchmark=b), s, runs, resume)
            for b in cfg.benchmarks for s in cfg.seeds
        }
    if "niah" in cfg.suites:
        results["niah"] = {f"seed{s}": _niah_seed(cfg, s, runs, resume, cached, hope, original)
                           for s in cfg.niah_seeds}
        _add_cached_niah(results["niah"], runs)
    write_json(out / "pretrained_report.json", results)
    from nested_learning.evaluation.pretrained_tables import write_report

    write_report(results, out)
    return results


def _continual_run(hope, cl_cfg: CLConfig, seed: int, runs: Path, resume: bool) -> dict:
    """One benchmark and seed (``runs/continual_<benchmark>_seed<s>.json``): the methods a saved run with the same
    stream settings already holds are reused, only the missing ones are computed and merged into the file."""
    path = runs / f"continual_{cl_cfg.benchmark}_seed{seed}.json"
    stream_keys = ("n_tasks", "classes_per_task", "train_per_class", "test_per_class", "max_text_tokens")
    saved = json.loads(path.read_text()) if resume and path.is_file() else None
    if saved is not None and any(saved["config"].get(k) != getattr(cl_cfg, k) for k in stream_keys):
        saved = None  # another stream: computed anew
    missing = tuple(m for m in cl_cfg.methods if saved is None or m not in saved["methods"])
    if not missing:
        return saved
    t0 = time.perf_counter()
    result = run_continual(hope, dataclasses.replace(cl_cfg, methods=missing), seed)
    if saved is not None:
        saved["methods"].update(result["methods"])
        saved["config"]["methods"] = list(dict.fromkeys([*saved["config"]["methods"], *missing]))
        result = saved
    result["seconds"] = result.get("seconds", 0.0) + time.perf_counter() - t0
    write_json(path, result)
    return result


def _stream(cfg, docs, runs: Path, resume: bool, cached, hope, original) -> dict:
    """Streaming perplexity at every window of ``cfg.stream.windows``, each window cached on its own
    (``stream_w{W}``, with the documents' source) so that a rerun with more windows computes only the new ones;
    windows that an earlier all-windows file (``stream``) holds with the same settings and source are reused."""
    stream_cfg = dataclasses.replace(cfg.stream, progress=cfg.progress)
    source = cfg.text_file or "corpus test split"
    settings = _jsonable({k: v for k, v in dataclasses.asdict(cfg.stream).items() if k not in ("windows", "progress")})
    legacy = runs / "stream.json"
    old = json.loads(legacy.read_text()) if resume and legacy.is_file() else None
    same = (old is not None and old.get("source", "corpus test split") == source
            and all(old["config"].get(k) == v for k, v in settings.items()))
    rows, seconds = [], 0.0
    for window in cfg.stream.windows:
        held = [r for r in old["rows"] if r["window"] == window] if same else []
        if held and {r["condition"] for r in held} >= set(cfg.stream.conditions):
            rows += held
            continue
        part = cached(
            f"stream_w{window}",
            lambda w=window: dict(run_pretrained_stream(hope, docs, dataclasses.replace(stream_cfg, windows=(w,)),
                                                        original), source=source),
            valid=lambda saved: saved.get("source") == source
            and all(saved["config"].get(k) == v for k, v in settings.items()),
        )
        rows += part["rows"]
        seconds += part.get("seconds", 0.0)
    result = summarise_stream(rows, stream_cfg)
    result.update(source=source, seconds=seconds)
    return result


def _niah_seed(cfg, seed, runs: Path, resume: bool, cached, hope, original) -> dict:
    """One seed's NIAH cells for every length, each length cached on its own (``niah_seed{s}_len{L}``) so that a
    rerun with more lengths computes only the new ones; cells of an earlier all-lengths file (``niah_seed{s}``)
    are reused where they cover a length and every asked task (with all the tasks they hold)."""
    legacy = runs / f"niah_seed{seed}.json"
    old = json.loads(legacy.read_text()) if resume and legacy.is_file() else {}
    merged, seconds = {}, 0.0
    for length in cfg.niah_lengths:
        keys = [k for k in old if k != "seconds" and k.split("|")[1] == str(length)]
        if {k.split("|")[0] for k in keys} >= set(cfg.niah_tasks):
            cells = {k: old[k] for k in keys}
        else:
            cells = cached(f"niah_seed{seed}_len{length}", lambda n=length: niah(hope, original, cfg, seed, (n,)))
            seconds += cells.get("seconds", 0.0)
        merged.update({k: v for k, v in cells.items() if k != "seconds"})
    merged["seconds"] = seconds
    return merged


def _add_cached_niah(niah: dict, runs: Path) -> None:
    """Every NIAH cell saved under ``runs/`` that ``niah`` lacks (other seeds and lengths of earlier runs into the
    same directory), so that runs made a seed or a length at a time add up in one table."""
    for path in sorted(runs.glob("niah_seed*.json")):
        match = re.fullmatch(r"niah_seed(\d+)(?:_len\d+)?\.json", path.name)
        if not match:
            continue
        cells = niah.setdefault(f"seed{match.group(1)}", {"seconds": 0.0})
        for key, value in json.loads(path.read_text()).items():
            if key != "seconds" and key not in cells:
                cells[key] = value


def _ints(text: str) -> tuple:
    return tuple(int(x) for x in text.split(",") if x)


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, range)) else str(v)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The paper's experiments on a Hope-ified pretrained LM.")
    p.add_argument("--preset", default="pretrained", choices=sorted(PRESETS))
    p.add_argument("--out_dir", default="results/pretrained")
    p.add_argument("--model", default=None, help="a pretrained name or checkpoint directory (default smollm2-135m)")
    p.add_argument("--suites", default=None, help="comma-separated subset of stream,continual,niah")
    p.add_argument("--benchmarks", default=None, help="comma-separated continual-learning sets")
    p.add_argument("--seeds", default=None, help="comma-separated seeds")
    p.add_argument("--methods", default=None, help="comma-separated continual-learning methods (default: all of "
                   + ",".join(ALL_METHODS) + ")")
    p.add_argument("--n_tasks", type=int, default=None, help="continual-learning tasks in sequence (default 3)")
    p.add_argument("--classes_per_task", type=int, default=None, help="new classes per task (default 3)")
    p.add_argument("--ewc_lambda", type=float, default=None, help="EWC penalty weight (default 1000)")
    p.add_argument("--window", type=int, default=None, help="attention window in tokens")
    p.add_argument("--text", default=None, help="a text file to read for streaming perplexity instead of the corpus")
    p.add_argument("--checkpoint", default=None, help="a trainer run of a Hope-ified model (continual pre-training)")
    p.add_argument("--stream_windows", default=None, help="comma-separated attention windows of the streaming "
                   "perplexity (default: --window)")
    p.add_argument("--niah_tasks", default=None, help="comma-separated NIAH tasks (default: all six)")
    p.add_argument("--niah_lengths", default=None, help="comma-separated haystack lengths in tokens (default 1024)")
    p.add_argument("--niah_n", type=int, default=None, help="NIAH instances per task, length and seed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no_resume", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]()
    if args.model:
        cfg.model = args.model
    if args.suites:
        cfg.suites = tuple(s for s in args.suites.split(",") if s)
    if args.benchmarks:
        cfg.benchmarks = tuple(b for b in args.benchmarks.split(",") if b)
    if args.seeds:
        cfg.seeds = cfg.niah_seeds = _ints(args.seeds)
    if args.window:
        cfg.window = args.window
    if args.methods:
        methods = tuple(m for m in args.methods.split(",") if m)
        if not methods or set(methods) - set(ALL_METHODS):
            p.error(f"--methods must name methods of {ALL_METHODS}, got {args.methods!r}")
        cfg.continual = dataclasses.replace(cfg.continual, methods=methods)
    for key in ("n_tasks", "classes_per_task"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                p.error(f"--{key} must be a positive integer, got {value}")
            cfg.continual = dataclasses.replace(cfg.continual, **{key: value})
    if args.ewc_lambda is not None:
        cfg.continual = dataclasses.replace(cfg.continual, ewc_lambda=args.ewc_lambda)
    cfg.stream.windows = _ints(args.stream_windows) if args.stream_windows else (cfg.window,)
    if args.niah_tasks:
        from nested_learning.data.niah import NIAH_TASKS

        cfg.niah_tasks = tuple(t for t in args.niah_tasks.split(",") if t)
        if not cfg.niah_tasks or set(cfg.niah_tasks) - set(NIAH_TASKS):
            p.error(f"--niah_tasks must name tasks of {NIAH_TASKS}, got {args.niah_tasks!r}")
    if args.niah_lengths:
        cfg.niah_lengths = _ints(args.niah_lengths)
    if args.niah_n:
        cfg.niah_n = args.niah_n
    if min(cfg.niah_lengths, default=1) < 1:
        p.error(f"--niah_lengths must be positive, got {args.niah_lengths!r}")
    cfg.text_file = args.text
    run(cfg, args.out_dir, resume=not args.no_resume, checkpoint=args.checkpoint)
    print(f"wrote {Path(args.out_dir) / 'REPORT_pretrained.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
