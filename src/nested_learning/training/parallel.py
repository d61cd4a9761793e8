"""How the trainer runs on several processes, chosen by ``parallel=ddp|fsdp``: one object per strategy.

The trainer asks a strategy for five things and knows nothing else of the parallelism (torchtitan's split):

    wrap(model)                         the module to call in training (DDP wrapper, or the model sharded in place)
    no_sync(model)                      a context in which backward does not synchronise gradients (accumulation)
    clip_grad_norm(params, max_norm)    the global gradient norm (a plain tensor), gradients clipped to it
    save_checkpoint(...) / load_checkpoint(...)   the checkpoint format that fits the strategy

``ddp`` (the default, and what a single process uses): every rank holds the whole model, DDP averages gradients,
rank 0 writes one ``model.safetensors``. ``fsdp`` (``training/fsdp.py``): FSDP2's ``fully_shard``, every rank
holds 1/world of the weights, gradients and optimizer state; checkpoints are sharded through
``torch.distributed.checkpoint``. Both average gradients over ranks, so K ranks with ``batch_size=b`` take the step
one process takes with ``batch_size=K*b``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from nested_learning.training import checkpoint as ckpt
from nested_learning.training.distributed import DistInfo

PARALLELISMS = ("ddp", "fsdp")


class DataParallel:
    """One process, or DDP under torchrun: the whole model on every rank."""

    name = "ddp"

    def __init__(self, info: DistInfo, device: torch.device):
        self.info, self.device = info, device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.info.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[self.info.local_rank] if self.device.type == "cuda" else None)

    def no_sync(self, model: torch.nn.Module):
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def save_checkpoint(self, out_dir: Path, step: int, model: torch.nn.Module, optimizer, trainer_state: dict,
                        keep: int) -> Path | None:
        """Rank 0 writes the whole model; ``trainer_state`` holds ``optimizer.state_dict()``."""
        if not self.info.is_main:
            return None
        return ckpt.save_checkpoint(out_dir, step, model, trainer_state, keep=keep)

    def load_checkpoint(self, path: Path, model: torch.nn.Module, optimizer, device) -> dict[str, Any]:
        """Weights and optimizer from ``path``; returns the trainer state saved beside them."""
        if ckpt.is_sharded(path):
            raise ValueError(f"checkpoint {path} is sharded (written with parallel=fsdp): resume it with "
                             "parallel=fsdp under torchrun, or export/evaluate it (those read sharded checkpoints)")
        state = ckpt.load_checkpoint(path, model, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        return state


def build_parallel(name: str, info: DistInfo, device: torch.device):
    """The strategy ``name`` (one of ``PARALLELISMS``). A single process runs unwrapped whatever the name: FSDP
    over one rank would shard nothing, so its checkpoints keep the single-file format."""
    if name not in PARALLELISMS:
        raise ValueError(f"parallel must be one of {PARALLELISMS}, got {name!r}")
    if name == "fsdp" and info.enabled:
        from nested_learning.training.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(info, device)
    return DataParallel(info, device)
