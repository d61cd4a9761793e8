"""``nested-learning`` (also ``python -m nested_learning``): train, eval, generate, demo, levels, report and experiments.

Configs are YAML files (see ``configs/``) mapped onto :class:`TrainConfig`; any ``key=value`` after the options
overrides a field, and an unknown key or a bad value is an error that names it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nested-learning", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (single process, or DDP under torchrun)")
    t.add_argument("--config", help="YAML config file (keys of TrainConfig)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=transformer max_steps=100")

    e = sub.add_parser("eval", help="validation/test perplexity of a checkpoint")
    e.add_argument("--checkpoint", required=True, help="run directory (uses its latest checkpoint) or step_* dir")
    e.add_argument("--split", default="val", choices=["val", "test"])
    e.add_argument("--batches", type=int, default=50)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", default="The")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--seed", type=int, default=0)

    x = sub.add_parser("export", help="a checkpoint as a transformers model directory (AutoModelForCausalLM)")
    x.add_argument("--checkpoint", required=True, help="run directory (uses its latest checkpoint) or step_* dir")
    x.add_argument("--out", required=True, help="directory to write (config.json, model.safetensors, tokenizer)")

    d = sub.add_parser("demo", help="the main job: train small models on the corpus and write a report")
    d.add_argument("--models", default=None, help="comma-separated model names (default: the demo's list; none: skip)")
    d.add_argument("--pretrained", default=None, help="the pretrained model to Hope-ify (default smollm2-135m; none: skip)")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--out-dir", default=None)
    d.add_argument("--max-docs", type=int, default=None, help="use only the first N documents (quick runs)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    lv = sub.add_parser("levels", help="a model (and optimizer) read as levels of associative memories")
    lv.add_argument("--model", default="hope", help="registered model name, or 'all'")
    lv.add_argument("--optimizer", default=None, help="registered optimizer name, or 'all'")
    lv.add_argument("--size", default="tiny")
    lv.add_argument("--markdown", action="store_true", help="markdown tables instead of aligned text")
    lv.add_argument("overrides", nargs="*", help="model config overrides, e.g. chunk_sizes=[8,32]")
    for name, (_, help_text) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def _load_run(checkpoint: str):
    from nested_learning.training.runs import load_run

    model, config, _ = load_run(checkpoint)
    return model, config


# Subcommands whose arguments belong to an experiment's own parser: ``nested-learning report --preset quick``.
PASSTHROUGH = {
    "report": ("nested_learning.report", "every suite for every model: results/REPORT.md with plots"),
    "train-lm": ("nested_learning.evaluation.language_modeling", "experiments/train_lm.py"),
    "continual": ("nested_learning.evaluation.continual", "experiments/continual_learning.py"),
    "long-context": ("nested_learning.evaluation.long_context", "experiments/long_context.py"),
    "synthetic": ("nested_learning.evaluation.synthetic_suite", "MAD and formal-language suites"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from nested_learning.training.cpu_memory import keep_freed_cpu_memory

    keep_freed_cpu_memory()
    if argv and argv[0] in PASSTHROUGH:
        import importlib

        return importlib.import_module(PASSTHROUGH[argv[0]][0]).main(argv[1:])
    args = _build_parser().parse_args(argv)
    from nested_learning.training import TrainingDiverged

    try:
        return _run(args)
    except (ValueError, TypeError) as err:  # bad input: the message names it, a traceback would only hide it
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from nested_learning.training import load_config, parse_overrides

    if args.command == "train":
        from nested_learning.training import Trainer

        config = load_config(args.config, args.overrides)
        summary = Trainer(config).train()
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank has the same summary
            print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
        return 0

    if args.command == "eval":
        from nested_learning.data import load_tokens
        from nested_learning.training import evaluate_loss

        model, config = _load_run(args.checkpoint)
        tokens = load_tokens(args.split, config.max_docs, getattr(model, "tokenizer", None))
        loss = evaluate_loss(model, tokens, config.eval_batch_size, config.seq_len, args.batches,
                             next(model.parameters()).device, config.precision)
        print(json.dumps({"split": args.split, "loss": loss, "perplexity": math.exp(min(loss, 50))}))
        return 0

    if args.command == "generate":
        import torch

        from nested_learning.data import get_tokenizer

        if not args.prompt:
            raise ValueError("--prompt must not be empty: generation continues a prompt of at least one token")
        model, _ = _load_run(args.checkpoint)
        tok = getattr(model, "tokenizer", None) or get_tokenizer()
        ids = torch.tensor([tok.encode(args.prompt)])
        out = model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             generator=torch.Generator().manual_seed(args.seed))
        print(tok.decode(out[0].tolist()))
        return 0

    if args.command == "export":
        from nested_learning.hf.export import export_checkpoint

        out = export_checkpoint(args.checkpoint, args.out)
        print(f"exported {args.checkpoint} to {out}: load it with AutoModelForCausalLM.from_pretrained({str(out)!r}) "
              "after `import nested_learning.hf`, or with trust_remote_code=True")
        return 0

    if args.command == "demo":
        from nested_learning.demo import DemoConfig, run_demo

        demo = DemoConfig()
        if args.models:
            demo.models = tuple(m.strip() for m in args.models.split(",") if m.strip() and m.strip() != "none")
        if args.pretrained:
            demo.pretrained = None if args.pretrained == "none" else args.pretrained
        if args.steps is not None:
            demo.steps = args.steps
        if args.out_dir:
            demo.out_dir = args.out_dir
        demo.max_docs = args.max_docs
        run_demo(demo, parse_overrides(args.overrides))
        return 0
    if args.command == "levels":
        import ast

        from nested_learning.nsam.tables import levels_report

        overrides = {}
        for item in args.overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} is not key=value")
            try:
                overrides[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                overrides[key] = value
        print(levels_report(args.model, args.optimizer, args.size, overrides, args.markdown), end="")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
