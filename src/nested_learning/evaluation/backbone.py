"""A language model briefly pre-trained on the corpus with the trainer: the backbone that continual learning and
long-context fine-tuning start from, and the run that the language-modelling suite measures.

Training goes through :class:`nested_learning.training.Trainer` (same optimiser, schedule and logging as every
other run); the weights are saved with their build recipe (:func:`~nested_learning.evaluation.harness.save_backbone`)
so a later suite or a resumed report reuses them instead of training again.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from nested_learning.evaluation.harness import build, load_backbone, save_backbone


@dataclasses.dataclass
class PretrainConfig:
    size: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)
    steps: int = 200
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 20
    optimizer: str = "adamw"
    max_docs: int | None = None  # None: the whole corpus
    eval_batches: int = 10
    progress: bool = True


def pretrain(name: str, cfg: PretrainConfig, seed: int = 0, run_dir: str | Path | None = None):
    """Train model ``name`` on the LM corpus; returns ``(model, trainer summary, meta)``.

    ``meta`` (name, size, overrides actually used, seed, steps) is what :func:`load_backbone` needs to rebuild it.
    """
    from nested_learning.data import load_tokens
    from nested_learning.training import TrainConfig, Trainer

    model, used = build(name, cfg.size, cfg.overrides, seed)
    config = TrainConfig(
        model=name, size=cfg.size, model_overrides=used, max_docs=cfg.max_docs, seq_len=cfg.seq_len,
        batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, max_steps=cfg.steps,
        warmup_steps=min(cfg.warmup_steps, max(cfg.steps // 5, 1)), eval_every=max(cfg.steps // 4, 1),
        eval_batches=cfg.eval_batches, eval_batch_size=cfg.batch_size, out_dir=str(run_dir or "runs/backbone"),
        tensorboard=False, progress=cfg.progress, seed=seed,
    )
    trainer = Trainer(config, model=model, train_tokens=load_tokens("train", cfg.max_docs),
                      val_tokens=load_tokens("val", cfg.max_docs))
    summary = trainer.train()
    meta = {"name": name, "size": cfg.size, "overrides": used, "seed": seed, "steps": cfg.steps,
            "optimizer": cfg.optimizer}
    return model.eval(), summary, meta


# ------------------------------------------------------------------------------------------- command line
QUICK_OVERRIDES = {"dim": 32, "n_layers": 1, "n_heads": 2}


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the experiment scripts that start from a backbone."""
    p.add_argument("--model", default="hope", help="a registered model name")
    p.add_argument("--size", default="tiny")
    p.add_argument("--backbone", default=None, help="a saved backbone (.pt) to start from instead of pre-training")
    p.add_argument("--pretrain_steps", type=int, default=200, help="LM pre-training steps when no --backbone")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--max_docs", type=int, default=None, help="use only the first N corpus documents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON result path")
    p.add_argument("--quick", action="store_true", help="a tiny model and tiny data: finishes in seconds")


def quick_pretrain_config() -> PretrainConfig:
    return PretrainConfig(overrides=dict(QUICK_OVERRIDES), steps=2, seq_len=32, batch_size=2, max_docs=200,
                          eval_batches=1, progress=False)


def backbone_from_args(args, run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """Load ``--backbone`` or pre-train one as the options say (``--quick``: 2 steps of a 1-layer model); the
    trainer's logs go to ``run_dir``."""
    if args.backbone:
        return load_backbone(args.backbone)
    if args.quick:
        cfg = quick_pretrain_config()
    else:
        cfg = PretrainConfig(size=args.size, steps=args.pretrain_steps, optimizer=args.optimizer,
                             max_docs=args.max_docs)
    model, _, meta = pretrain(args.model, cfg, args.seed, run_dir=run_dir)
    return model, meta


def save(model: torch.nn.Module, meta: dict, path: str | Path) -> Path:
    return save_backbone(model, path, meta)
