"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer, with sharded checkpoints and exact resume.

Sharding units. ``fully_shard`` all-gathers a unit's weights in a pre-forward hook of the unit's ``__call__`` and
frees them after, and it registers backward hooks on the unit's outputs. A model lists the submodules that are safe
to shard on their own in ``fsdp_units()`` (the blocks of a Transformer++, Titans or DeltaNet stack, each called as a
module once per forward); the root is always a unit and holds everything else. A model without ``fsdp_units`` -- HOPE
and HOPE-attention, whose forward runs its blocks' parts segment by segment and differentiates the segment loss
inside the forward (``torch.autograd.grad`` for the CMS test-time updates, Eq 71) -- is one unit: its weights are
gathered once per forward and stay gathered through the inner gradients, whose backward hooks FSDP must not see.
Weights, gradients and optimizer state are still sharded at rest, 1/world per rank.

Optimizers. The shards are flat row blocks of every weight, so only element-wise optimizers (``FSDP_OPTIMIZERS``)
compute the same update as on the whole tensor; Muon and M3 orthogonalise whole matrices and are refused.

Checkpoints. Every rank writes its shards of the weights and optimizer state through ``torch.distributed.checkpoint``
into ``step_<N>/sharded/`` (a temporary directory renamed when complete, as for single-file checkpoints); rank 0 adds
``trainer_state.pt`` (step, scheduler, RNG, data position, config). Loading reshards, so a run can resume on another
number of ranks; ``eval``, ``generate`` and ``export`` read such a checkpoint in one process.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nested_learning.training import checkpoint as ckpt
from nested_learning.training.distributed import DistInfo

FSDP_OPTIMIZERS = ("adamw", "adam", "sgd")


class FullyShardedDataParallel:
    name = "fsdp"

    def __init__(self, info: DistInfo, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        self.info, self.device = info, device
        self.mesh = init_device_mesh(device.type, (info.world_size,))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard ``model`` in place (its ``fsdp_units()`` first, then the root) and return it."""
        from torch.distributed.fsdp import fully_shard

        units = list(getattr(model, "fsdp_units", lambda: [])())
        for unit in units:
            fully_shard(unit, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)
        # FSDP warns when a unit returns a view (the stream state's pending ids, logits slices); nothing writes
        # into those in place, which is what the warning guards against.
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        return model

    def no_sync(self, model: torch.nn.Module):
        return _NoSync(model)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def save_checkpoint(self, out_dir: Path, step: int, model: torch.nn.Module, optimizer, trainer_state: dict,
                        keep: int) -> Path | None:
        """All ranks write their shards; rank 0 prepares, completes and publishes the directory."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        out_dir = Path(out_dir)
        tmp = out_dir / f".tmp_step_{step:08d}_fsdp"
        if self.info.is_main:
            tmp = ckpt.prepare_checkpoint(out_dir, step, tag="fsdp")
        dist.barrier()
        weights, optim = get_state_dict(model, optimizer)
        dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(tmp / ckpt.SHARDED))
        path = None
        if self.info.is_main:
            state = {k: v for k, v in trainer_state.items() if k != "optimizer"}
            torch.save(state, tmp / "trainer_state.pt")
            path = ckpt.publish_checkpoint(out_dir, step, tmp, keep)
        dist.barrier()
        return path

    def load_checkpoint(self, path: Path, model: torch.nn.Module, optimizer, device) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(path)
        if not ckpt.is_sharded(path):
            raise ValueError(f"checkpoint {path} is not sharded (written with parallel=ddp or by one process): "
                             "resume it with parallel=ddp")
        try:
            state = torch.load(path / "trainer_state.pt", map_location=device, weights_only=False)
        except Exception as err:  # truncated zip, unpickling errors, missing file
            raise ValueError(f"checkpoint {path} is damaged or incomplete: {err}") from err
        weights, optim = get_state_dict(model, optimizer)
        loaded = {"model": weights, "optim": optim}
        dcp.load(loaded, checkpoint_id=str(path / ckpt.SHARDED))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        return state


class _NoSync:
    """FSDP2's gradient accumulation: no reduce-scatter until the last micro-batch."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False
