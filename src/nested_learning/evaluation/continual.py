"""Class-incremental continual learning (paper Fig 6): tasks of new classes arrive in order; after each task the
learner is tested on every task so far, over the labels of all classes seen so far.

Every method starts from the same backbone (a copy of a language model pre-trained on the corpus) and predicts with
:class:`~nested_learning.evaluation.scoring.LabelScorer` (the label name of highest likelihood). They differ in
how the model and its context change as tasks arrive:

* ``finetune``: AdamW on the label tokens of the new task's examples (catastrophic forgetting baseline).
* ``ewc``: the same plus the EWC penalty (:mod:`nested_learning.evaluation.ewc`).
* ``icl``: no weight update; the context is ``icl_shots`` labelled examples of every class seen so far, the
  oldest dropped first when the model's context limit is reached.
* ``memory``: no optimiser step; the training examples of each task are streamed through the model, carrying its
  state, with test-time memory updates switched on for models that have them (HOPE's CMS learns here); tests are
  scored from the state at the end of the stream. For a model without test-time updates this is in-context
  learning with every example seen so far (a Transformer keeps them in its KV cache, up to its context limit).
* ``stream_frozen``: the same stream with test-time updates off: in-context learning over every example, as far
  as the model's own context reaches (a sliding attention window keeps the most recent ones), and the control
  that isolates what the memory updates add.
* ``zero_shot``: the backbone as it is, no context and no learning: the floor that every method's label names
  alone give (a pretrained model guesses many intents from their names).
* ``cms_only``: ``memory``'s stream, then every test is scored with the CMS levels as the stream left them but
  the mixers' states (attention's KV window, Titans' memories) and the pending tokens emptied: only what the levels
  learned is left, so it is compared with ``zero_shot``. Needs a model whose state is a
  :class:`~nested_learning.models.cms_lm.CMSLMState`.

``score_updates=False`` scores every test query from a snapshot of the state with the updates off, so no method
learns from the test queries.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from nested_learning.data.continual import BENCHMARKS, CLStream, make_stream
from nested_learning.evaluation import continual_metrics as cm
from nested_learning.evaluation.ewc import EWC
from nested_learning.evaluation.harness import context_limit, has_test_time_switch, prefill, test_time_updates
from nested_learning.evaluation.scoring import LabelScorer
from nested_learning.evaluation.train_loop import fit
from nested_learning.progress import progress

METHODS = ("finetune", "ewc", "icl", "memory")
ALL_METHODS = METHODS + ("stream_frozen", "zero_shot", "cms_only")
STREAMED = ("memory", "stream_frozen", "cms_only")


@dataclasses.dataclass
class CLConfig:
    benchmark: str = "clinc"
    n_tasks: int = 5
    classes_per_task: int | None = 5
    train_per_class: int = 16
    test_per_class: int = 8
    methods: tuple = METHODS
    epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-3
    ewc_lambda: float = 1000.0
    fisher_samples: int = 32
    icl_shots: int = 1
    max_text_tokens: int = 48
    score_updates: bool = True
    progress: bool = True


def run_method(backbone: torch.nn.Module, stream: CLStream, method: str, cfg: CLConfig, seed: int = 0) -> dict:
    """Learn ``stream`` with ``method`` from a copy of ``backbone``; returns R and its metrics."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = copy.deepcopy(backbone).eval()
    scorer = LabelScorer(model, stream.label_names, cfg.max_text_tokens)
    T = len(stream.tasks)
    R = np.full((T, T), np.nan)
    ewc = EWC(model, cfg.ewc_lambda) if method == "ewc" else None
    streams = method in STREAMED
    learner = _MemoryLearner(model, scorer, learn=method != "stream_frozen") if streams else None
    rng = np.random.default_rng([seed, 11])
    bar = progress(total=T, desc=f"{stream.benchmark}/{method}", disable=not cfg.progress, leave=False)
    for i, task in enumerate(stream.tasks):
        state = None
        if method in ("finetune", "ewc"):
            _finetune(model, scorer, task.train, cfg, rng, ewc, desc=f"task {i}")
            if ewc is not None:
                ewc.consolidate(scorer, task.train[: cfg.fisher_samples])
        elif method == "icl":
            state = _icl_state(model, scorer, stream, i, cfg.icl_shots, rng)
        elif streams:
            state = learner.learn(task.train)
            if method == "cms_only":
                state = levels_only(model, state)
        cands = stream.classes_up_to(i)
        scoring_updates = cfg.score_updates if method in ("memory", "cms_only") else None
        with test_time_updates(model, scoring_updates):
            for j in range(i + 1):
                R[i, j] = scorer.accuracy(stream.tasks[j].test, cands, state)
        bar.update(1)
    bar.close()
    return {
        "method": method,
        "matrix": cm.matrix_to_json(R),
        **cm.summarize(R),
        "seconds": time.perf_counter() - t0,
        "test_time_updates": bool(learner and learner.switch and learner.learn_on) if streams else None,
        "batched_scoring": scorer._tiling_ok,  # False: the model's state could not be tiled; scored one by one
        "memory_tokens_dropped": learner.dropped if learner else None,
    }


def levels_only(model: torch.nn.Module, state):
    """``state`` with every mixer state fresh and no pending tokens: the CMS levels' fast weights (and position)
    kept, the context forgotten."""
    from nested_learning.models.cms_lm import CMSLMState

    if not isinstance(state, CMSLMState):
        raise ValueError(f"cms_only needs a model with CMS levels (a CMSLMState), got {type(state).__name__}")
    fresh = model.initial_state(state.pending.shape[0], state.pending.device)
    return dataclasses.replace(state, mixers=fresh.mixers, pending=state.pending[:, :0])


def _finetune(model, scorer: LabelScorer, rows, cfg: CLConfig, rng, ewc, desc: str) -> None:
    n_batches = max(1, -(-len(rows) // cfg.batch_size))
    order = np.concatenate([rng.permutation(len(rows)) for _ in range(cfg.epochs)])

    def next_batch(step: int):
        idx = order[(step * cfg.batch_size) % len(order) :][: cfg.batch_size]
        return scorer.training_batch([rows[k] for k in idx])

    fit(model, next_batch, n_batches * cfg.epochs, lr=cfg.lr, warmup=0,
        penalty=ewc.penalty if ewc is not None else None, desc=desc, progress=cfg.progress)


def _icl_state(model, scorer: LabelScorer, stream: CLStream, i: int, shots: int, rng):
    """Prefill ``shots`` examples of each seen class (shuffled); the oldest are dropped to fit the context."""
    by_class: dict[str, list] = {}
    for task in stream.tasks[: i + 1]:
        for text, c in task.train:
            by_class.setdefault(c, []).append((text, c))
    rows = [r for c in stream.classes_up_to(i) for r in by_class[c][:shots]]
    rows = [rows[k] for k in rng.permutation(len(rows))]
    ids = scorer.context_ids(rows)
    limit = context_limit(model)
    if limit is not None:
        ids = ids[-_context_budget(limit):]
    return prefill(model, torch.tensor([ids]))[1] if ids else None


def _context_budget(limit: int) -> int:
    """Context tokens a model with stream limit ``limit`` may hold, leaving room for a query and its label."""
    return max(limit - 128, limit // 2)


class _MemoryLearner:
    """Streams each task's training examples through the model with test-time updates on, carrying the state."""

    def __init__(self, model, scorer: LabelScorer, learn: bool = True):
        self.model, self.scorer, self.learn_on = model, scorer, learn
        self.switch = has_test_time_switch(model)
        self.limit = context_limit(model)
        self.ids: list[int] = []
        self.state = None
        self.dropped = 0

    def learn(self, rows) -> object:
        new = self.scorer.context_ids(rows)
        self.ids += new
        with test_time_updates(self.model, self.learn_on):
            if self.limit is None or len(self.ids) <= _context_budget(self.limit):
                self.state = prefill(self.model, torch.tensor([new]), self.state)[1]
            else:
                # a bounded context (attention): keep the most recent examples, re-read from scratch
                keep = self.ids[-_context_budget(self.limit):]
                self.dropped = len(self.ids) - len(keep)
                self.state = prefill(self.model, torch.tensor([keep]))[1]
        return self.state


def run_continual(backbone: torch.nn.Module, cfg: CLConfig, seed: int = 0) -> dict:
    """Every method of ``cfg.methods`` on one benchmark stream (same classes and examples for all methods)."""
    stream = make_stream(cfg.benchmark, cfg.n_tasks, cfg.classes_per_task, cfg.train_per_class,
                         cfg.test_per_class, seed)
    results = {m: run_method(backbone, stream, m, cfg, seed) for m in cfg.methods}
    return {"benchmark": cfg.benchmark, "config": dataclasses.asdict(cfg), "seed": seed,
            "tasks": [t.classes for t in stream.tasks], "methods": results}


def main(argv: list[str] | None = None) -> int:
    """``continual_learning.py --model hope --benchmark clinc [--quick]``: writes results/continual_<bench>.json."""
    from nested_learning.evaluation.backbone import add_backbone_args, backbone_from_args
    from nested_learning.evaluation.harness import write_json

    p = argparse.ArgumentParser(description="Class-incremental continual learning (paper Fig 6).")
    p.add_argument("--benchmark", default="clinc", choices=sorted(BENCHMARKS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--n_tasks", type=int, default=5)
    p.add_argument("--classes_per_task", type=int, default=5, help="0: all classes")
    p.add_argument("--train_per_class", type=int, default=16)
    p.add_argument("--test_per_class", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ewc_lambda", type=float, default=1000.0)
    p.add_argument("--icl_shots", type=int, default=1)
    add_backbone_args(p)
    args = p.parse_args(argv)
    cfg = CLConfig(args.benchmark, args.n_tasks, args.classes_per_task or None, args.train_per_class,
                   args.test_per_class, tuple(m for m in args.methods.split(",") if m), args.epochs, lr=args.lr,
                   ewc_lambda=args.ewc_lambda, icl_shots=args.icl_shots, progress=not args.quick)
    if args.quick:
        cfg = dataclasses.replace(cfg, n_tasks=2, classes_per_task=2, train_per_class=2, test_per_class=2,
                                  epochs=1, fisher_samples=2, max_text_tokens=16)
    out = Path(args.out or f"results/continual_{args.benchmark}.json")
    backbone, meta = backbone_from_args(args, out.parent / f"runs/backbone_{args.model}")
    result = run_continual(backbone, cfg, args.seed)
    result["backbone"] = meta
    write_json(out, result)
    for m, r in result["methods"].items():
        print(f"{args.benchmark} {m:9s} avg acc {r['average_accuracy']:.3f}  forgetting {r['forgetting']}  "
              f"BWT {r['backward_transfer']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
