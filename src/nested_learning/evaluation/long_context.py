"""Long context: needle-in-a-haystack accuracy against context length (paper Table 1, RULER-style tasks of
:mod:`nested_learning.data.niah`).

Protocol. A backbone pre-trained on the corpus is fine-tuned at a SHORT context (``train_length`` tokens) on a mix
of NIAH instances of all six tasks (loss on the answer tokens only; haystacks from the train split) and language
modelling batches (so it stays a language model), then evaluated at every length of ``eval_lengths`` on instances
whose haystacks come from the test split: length generalisation, as the paper's models are trained at a shorter
context than they are tested at. The prompt is read in chunks carrying the state; the answer is decoded greedily for
as many tokens as the reference has. Metrics per (task, length): ``exact_match`` (the decoded text equals the
answer) and ``recall`` (RULER's string-match score: the fraction of asked values present in the output).

A model whose context limit (``max_seq_len``) is below a length gets ``None`` there ("n/a" in the report), never
an error.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from nested_learning.data.niah import NIAH_TASKS, NIAHInstance, make_instance
from nested_learning.evaluation.harness import context_limit, has_test_time_switch, prefill
from nested_learning.evaluation.train_loop import fit
from nested_learning.progress import progress


@dataclasses.dataclass
class NIAHConfig:
    tasks: tuple = NIAH_TASKS
    train_length: int = 256
    train_steps: int = 150
    batch_size: int = 4
    lr: float = 1e-3
    lm_weight: float = 0.5  # weight of the language-modelling loss mixed into every step
    train_max_docs: int | None = 2000  # haystack source for training: the first N train documents
    eval_lengths: tuple = (1024, 2048, 4096, 8192, 16384)
    n_eval: int = 4
    chunk: int = 1024
    progress: bool = True


def training_instance(cfg: NIAHConfig, seed: int, index: int) -> NIAHInstance:
    task = cfg.tasks[index % len(cfg.tasks)]
    # a seed stream of its own (never the evaluation's), train-split haystacks
    return make_instance(task, cfg.train_length, seed + 10_000, index, "train", cfg.train_max_docs)


def answer_batch(instances: list[NIAHInstance], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``: prompt + answer, loss on the answer tokens only."""
    T = max(len(i.input_ids) + len(i.answer_ids) for i in instances)
    x = torch.full((len(instances), T), pad_id, dtype=torch.long)
    y = torch.full((len(instances), T), -100, dtype=torch.long)
    for b, inst in enumerate(instances):
        ids = inst.input_ids + inst.answer_ids
        x[b, : len(ids)] = torch.tensor(ids)
        y[b, len(inst.input_ids) - 1 : len(ids) - 1] = torch.tensor(inst.answer_ids)
    return x, y


def finetune(model: torch.nn.Module, cfg: NIAHConfig, seed: int = 0) -> list[dict]:
    """Short-context training on NIAH instances mixed with LM batches; returns the NIAH loss history."""
    from nested_learning.data import TokenBatcher, get_tokenizer, load_tokens

    eot = get_tokenizer().eot_id
    lm = TokenBatcher(load_tokens("train", cfg.train_max_docs), cfg.batch_size, cfg.train_length, seed=seed + 5)

    def next_batch(step: int):
        lo = step * cfg.batch_size
        return answer_batch([training_instance(cfg, seed, lo + b) for b in range(cfg.batch_size)], eot)

    def lm_loss(step: int):
        x, y = lm.batch_at(step)
        return cfg.lm_weight * model(x, labels=y).loss

    return fit(model, next_batch, cfg.train_steps, lr=cfg.lr, extra_loss=lm_loss if cfg.lm_weight else None,
               desc="niah train", progress=cfg.progress)


@torch.no_grad()
def greedy_answer(model: torch.nn.Module, ids: list[int], n_new: int, chunk: int = 1024) -> list[int]:
    """Greedy continuation of ``n_new`` tokens after ``ids`` (the prompt is read in chunks, carrying the state)."""
    logits, state = prefill(model, torch.tensor([ids]), chunk=chunk)
    out = []
    for i in range(n_new):
        nxt = int(logits[0].argmax())
        out.append(nxt)
        if i + 1 < n_new:
            step = model(torch.tensor([[nxt]]), state=state)
            logits, state = step.logits[:, -1].float(), step.state
    return out


def score(inst: NIAHInstance, generated: list[int], tokenizer=None) -> tuple[bool, float, str]:
    """(exact match, recall of the asked values, decoded text) of a generated answer."""
    from nested_learning.data import get_tokenizer

    text = (tokenizer or get_tokenizer()).decode(generated)
    return text.strip() == inst.answer, float(np.mean([v in text for v in inst.values])), text


def evaluate(model: torch.nn.Module, cfg: NIAHConfig, seed: int = 0) -> dict:
    """``{"exact_match": {task: {length: acc | None}}, "recall": ..., "samples": [...]}``."""
    model.eval()
    limit = context_limit(model)
    em = {t: {} for t in cfg.tasks}
    recall = {t: {} for t in cfg.tasks}
    samples = []
    cells = [(t, n) for n in cfg.eval_lengths for t in cfg.tasks]
    bar = progress(cells, desc="niah eval", disable=not cfg.progress, leave=False)
    for task, length in bar:
        bar.set_postfix(task=task, length=length)
        key = str(length)
        em[task][key] = recall[task][key] = None
        tok = getattr(model, "tokenizer", None)
        instances = [make_instance(task, length, seed, i, "test", tokenizer=tok) for i in range(cfg.n_eval)]
        if limit is not None and length + max(len(i.answer_ids) for i in instances) > limit:
            continue  # n/a: the model cannot read this many tokens
        try:
            results = [score(i, greedy_answer(model, i.input_ids, len(i.answer_ids), cfg.chunk), tok)
                       for i in instances]
        except ValueError as err:  # a limit the model enforces but does not expose
            if "exceeds" not in str(err):
                raise
            continue
        em[task][key] = float(np.mean([r[0] for r in results]))
        recall[task][key] = float(np.mean([r[1] for r in results]))
        if length == min(cfg.eval_lengths):  # one sample output per task, to show what the model answers
            samples.append({"task": task, "length": length, "answer": instances[0].answer,
                            "output": results[0][2], "exact_match": results[0][0]})
    return {"exact_match": em, "recall": recall, "samples": samples}


def run_long_context(backbone: torch.nn.Module, cfg: NIAHConfig, seed: int = 0) -> dict:
    """Fine-tune a copy of ``backbone`` at short context, then evaluate at every length."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = copy.deepcopy(backbone)
    history = finetune(model, cfg, seed)
    t1 = time.perf_counter()
    result = evaluate(model, cfg, seed)
    result.update({
        "config": dataclasses.asdict(cfg), "seed": seed, "history": history, "context_limit": context_limit(model),
        "test_time_updates": bool(getattr(model, "test_time_updates", False)) if has_test_time_switch(model) else None,
        "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1,
    })
    return result


def main(argv: list[str] | None = None) -> int:
    """``long_context.py --model hope --context_length 16384 [--quick]``: evaluates 1K .. context_length."""
    from nested_learning.evaluation.backbone import add_backbone_args, backbone_from_args
    from nested_learning.evaluation.harness import write_json

    p = argparse.ArgumentParser(description="Needle-in-a-haystack accuracy against context length (Table 1).")
    p.add_argument("--context_length", type=int, default=16384, help="longest length; doubles from 1024 up to it")
    p.add_argument("--tasks", default=",".join(NIAH_TASKS))
    p.add_argument("--train_length", type=int, default=256)
    p.add_argument("--train_steps", type=int, default=150)
    p.add_argument("--n_eval", type=int, default=4, help="instances per (task, length)")
    add_backbone_args(p)
    args = p.parse_args(argv)
    lengths, n = [], 1024
    while n <= args.context_length:
        lengths.append(n)
        n *= 2
    cfg = NIAHConfig(tasks=tuple(t for t in args.tasks.split(",") if t), train_length=args.train_length,
                     train_steps=args.train_steps, n_eval=args.n_eval,
                     eval_lengths=tuple(lengths or [args.context_length]), progress=not args.quick)
    if args.quick:
        cfg = dataclasses.replace(cfg, train_length=160, train_steps=2, batch_size=2, train_max_docs=200,
                                  eval_lengths=(192, 256), n_eval=1, chunk=128)
    out = Path(args.out or f"results/long_context_{args.model}.json")
    backbone, meta = backbone_from_args(args, out.parent / f"runs/backbone_{args.model}")
    result = run_long_context(backbone, cfg, args.seed)
    result["backbone"] = meta
    write_json(out, result)
    for task in cfg.tasks:
        cells = "  ".join(f"{k}: {'n/a' if v is None else f'{v:.2f}'}" for k, v in result["exact_match"][task].items())
        print(f"{task:9s} {cells}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
