"""One model-agnostic trainer: any model that follows ``out = model(input_ids, labels=labels)`` trains here.

Features: optimizer by name (``nested_learning.optimizers.build_optimizer``), warmup + cosine schedule, gradient
clipping and accumulation, evaluation every N steps, a progress bar with loss and tokens/s, CSV and TensorBoard logs,
crash-safe checkpoints (every ``save_every`` steps and at the end of every run) with exact resume, DDP or FSDP2 under torchrun
(``parallel=``, ``training/parallel.py``), and non-finite losses skipped (training stops after
``max_bad_steps`` in a row, the last good checkpoint intact).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nested_learning import progress
from nested_learning.ops._validation import NonFiniteError
from nested_learning.training import checkpoint as ckpt
from nested_learning.training.config import TrainConfig
from nested_learning.training.cpu_memory import keep_freed_cpu_memory
from nested_learning.training.distributed import DistInfo, all_reduce_mean, barrier, init_distributed, unwrap
from nested_learning.training.parallel import build_parallel
from nested_learning.training.schedule import warmup_cosine

METRIC_FIELDS = ["step", "loss", "lr", "tokens_per_s", "val_loss", "skipped"]


class TrainingDiverged(RuntimeError):
    """Raised after ``max_bad_steps`` non-finite losses in a row."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device):
    """The context of a forward pass in ``precision`` ("fp32": none; "bf16": bf16 autocast on ``device``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokens: np.ndarray, batch_size: int, seq_len: int,
                  max_batches: int | None, device: torch.device, precision: str = "fp32") -> float:
    """Mean next-token loss (nats) over deterministic non-overlapping windows of ``tokens``."""
    from nested_learning.data import eval_batches

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, seq_len, max_batches):
        with autocast_for(precision, device):
            out = model(x.to(device), labels=y.to(device))
        total += float(out.loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError(f"evaluation split of {len(tokens)} tokens is too short for seq_len {seq_len}")
    return total / count


class Trainer:
    def __init__(self, config: TrainConfig, model: torch.nn.Module | None = None,
                 train_tokens: np.ndarray | None = None, val_tokens: np.ndarray | None = None):
        from nested_learning.data import TokenBatcher, load_tokens
        from nested_learning.models import build_model
        from nested_learning.optimizers import build_optimizer

        self.config = config
        if config.resume and not config.allow_fresh_start and ckpt.latest_checkpoint(config.out_dir) is None:
            raise ValueError(  # before the model and the corpus are loaded: fail fast
                f"resume=true but {config.out_dir!r} holds no checkpoint to resume from; set "
                "allow_fresh_start=true to start a new run there, or point out_dir at an earlier run"
            )
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
        self.dist: DistInfo = init_distributed(self.device)
        torch.manual_seed(config.seed)
        if model is None:
            model = build_model(config.model, config.size, **config.model_overrides)
        elif not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model.to(self.device)
        self.parallel = build_parallel(config.parallel, self.dist, self.device)
        self.ddp_model = self.parallel.wrap(self.model)
        if train_tokens is None or val_tokens is None:
            # Rank 0 builds the token cache once; the other ranks then read it instead of repeating the work.
            if not self.dist.is_main:
                barrier(self.dist)
            tok = getattr(model, "tokenizer", None)  # a pretrained model reads the corpus with its own tokenizer
            train_tokens = train_tokens if train_tokens is not None else load_tokens("train", config.max_docs, tok)
            val_tokens = val_tokens if val_tokens is not None else load_tokens("val", config.max_docs, tok)
            if self.dist.is_main:
                barrier(self.dist)
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self._warn_untrained_levels()
        self.batcher = TokenBatcher(self.train_tokens, config.batch_size, config.seq_len, seed=config.seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        opt_kwargs: dict[str, Any] = {}
        if config.optimizer in ("adamw", "adam"):
            opt_kwargs["betas"] = tuple(config.betas)
        opt_kwargs.update(config.optimizer_kwargs)
        self.optimizer = build_optimizer(config.optimizer, self.model, lr=config.lr,
                                         weight_decay=config.weight_decay, **opt_kwargs)
        self.scheduler = warmup_cosine(self.optimizer, config.warmup_steps, config.max_steps, config.min_lr_ratio)
        self.out_dir = Path(config.out_dir)
        self.step = 0
        self.bad_in_a_row = 0
        self.history: list[dict[str, float]] = []
        self._saved_step = -1
        if config.resume:
            self._resume()
        if self.dist.is_main:
            self._trim_metrics()

    def _warn_untrained_levels(self) -> None:
        # a memory level that never updates within a training window learns nothing in training but still acts at
        # test time with its initial rate: say which, by name, so that the run is not mistaken for a trained model
        check = getattr(self.model, "levels_without_training_signal", None)
        silent = check(self.config.seq_len) if callable(check) else []
        if silent and self.dist.is_main:
            warnings.warn(
                f"seq_len={self.config.seq_len}: {len(silent)} memory level(s) never step in a training window and "
                f"get no training signal: {', '.join(silent)}; raise seq_len above the largest chunk size or use "
                "smaller chunk_sizes",
                stacklevel=3,
            )

    # ----------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": ckpt.rng_state(),
            "data": self.batcher.state_dict(),
            "bad_in_a_row": self.bad_in_a_row,
            "history": self.history,
            "config": dataclasses.asdict(self.config),
        }

    def save(self) -> Path | None:
        path = self.parallel.save_checkpoint(self.out_dir, self.step, unwrap(self.model), self.optimizer,
                                             self._trainer_state(), keep=self.config.keep_checkpoints)
        self._saved_step = self.step
        barrier(self.dist)
        return path

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out_dir)
        if path is None:
            if self.config.allow_fresh_start:
                return
            raise ValueError(
                f"resume=true but {str(self.out_dir)!r} holds no checkpoint to resume from; set "
                "allow_fresh_start=true to start a new run there, or point out_dir at an earlier run"
            )
        state = self.parallel.load_checkpoint(path, unwrap(self.model), self.optimizer, self.device)
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.batcher.load_state_dict(state["data"])
        self.step, self.bad_in_a_row = state["step"], state["bad_in_a_row"]
        self.history = state["history"]
        self._saved_step = self.step

    def _trim_metrics(self) -> None:
        """Keep only the rows of ``metrics.csv`` up to the step this run starts from: the steps after the resumed
        checkpoint (logged before a crash) are trained again and would be logged twice."""
        path = self.out_dir / "metrics.csv"
        if not path.exists():
            return
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= self.step]
        if len(kept) == len(rows):
            return
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in METRIC_FIELDS} for r in kept)
        tmp.replace(path)

    # ----------------------------------------------------------------- logging
    def _open_logs(self):
        if not self.dist.is_main:
            return None, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = None
        if self.config.tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        return writer, self.out_dir / "metrics.csv"

    def _log(self, row: dict[str, float], writer, csv_path: Path | None) -> None:
        self.history.append(row)
        if csv_path is None:
            return
        fields = METRIC_FIELDS
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in fields})
        if writer is not None:
            for k, v in row.items():
                if k != "step" and v is not None and not (isinstance(v, float) and math.isnan(v)):
                    writer.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, row["step"])

    # ----------------------------------------------------------------- training
    def evaluate(self) -> float:
        c = self.config
        return evaluate_loss(self.model, self.val_tokens, c.eval_batch_size, c.seq_len, c.eval_batches, self.device,
                             c.precision)

    def _train_step(self) -> tuple[float, bool]:
        """One optimizer step (with accumulation); returns (mean loss, whether the step was applied)."""
        c = self.config
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        try:
            for micro in range(c.grad_accum):
                x, y = self.batcher.next_batch()
                x, y = x.to(self.device), y.to(self.device)
                sync = self.dist.enabled and micro < c.grad_accum - 1
                with self.parallel.no_sync(self.ddp_model) if sync else contextlib.nullcontext():
                    with autocast_for(c.precision, self.device):  # the backward runs outside, as autocast wants
                        loss = self.ddp_model(x, labels=y).loss / c.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
        except NonFiniteError:
            # a memory layer met a value that overflowed inside this forward pass: the same as a NaN loss. Under
            # data parallelism the other ranks would wait for this one's gradients, so there it stays an error.
            if self.dist.enabled:
                raise
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return float("nan"), False
        loss_value = float(all_reduce_mean(loss_sum, self.dist))
        grad_norm = self.parallel.clip_grad_norm(self.model.parameters(), c.grad_clip if c.grad_clip > 0 else 1e30)
        finite = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss_value, finite

    def train(self, until: int | None = None) -> dict[str, Any]:
        """Train to ``max_steps`` (or stop after step ``until``, as an interrupted run would; the schedule still
        follows ``max_steps``, so resuming continues exactly)."""
        c = self.config
        last = c.max_steps if until is None else min(until, c.max_steps)
        writer, csv_path = self._open_logs()
        tokens_per_step = c.batch_size * c.seq_len * c.grad_accum * self.dist.world_size
        bar = progress.progress(total=c.max_steps, initial=self.step, disable=not (c.progress and self.dist.is_main),
                                desc=f"train {c.model}")
        t_start, steps_timed = time.perf_counter(), 0
        val_loss = float("nan")
        try:
            while self.step < last:
                t0 = time.perf_counter()
                loss, applied = self._train_step()
                self.step += 1
                steps_timed += 1
                tps = tokens_per_step / max(time.perf_counter() - t0, 1e-9)
                row: dict[str, Any] = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                                       "tokens_per_s": tps, "skipped": int(not applied)}
                if applied:
                    self.bad_in_a_row = 0
                else:
                    self.bad_in_a_row += 1
                    progress.write(f"step {self.step}: non-finite loss or gradient ({loss}); step skipped")
                    if self.bad_in_a_row >= c.max_bad_steps:
                        self._log(row, writer, csv_path)
                        kept = (f"the checkpoint of step {self._saved_step} in {self.out_dir} is intact"
                                if self._saved_step >= 0 else "no checkpoint had been written yet")
                        raise TrainingDiverged(
                            f"{self.bad_in_a_row} non-finite steps in a row at step {self.step}; training stopped "
                            f"({kept}). With lr={c.lr:g} and grad_clip={c.grad_clip:g} the weights or the loss "
                            "became non-finite: a smaller lr usually helps."
                        )
                if c.eval_every and (self.step % c.eval_every == 0 or self.step == c.max_steps):
                    val_loss = self.evaluate()
                    row["val_loss"] = val_loss
                self._log(row, writer, csv_path)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                if c.save_every and self.step % c.save_every == 0 and applied:
                    self.save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        elapsed = time.perf_counter() - t_start
        if self.step != self._saved_step:  # every run ends with a checkpoint (a step is never written twice)
            self.save()
        if math.isnan(val_loss):
            val_loss = self.evaluate()
        return {
            "steps": self.step,
            "val_loss": val_loss,
            "val_ppl": math.exp(min(val_loss, 50)),
            "tokens_per_s": tokens_per_step * steps_timed / max(elapsed, 1e-9),
            "train_seconds": elapsed,
            "history": self.history,
        }
