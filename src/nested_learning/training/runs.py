"""A trained model back from its run: the config saved in the checkpoint names the model, the weights fill it.

Used by ``nested-learning eval``, ``generate`` and ``export``; accepts a run directory (its newest intact checkpoint)
or one ``step_*`` directory, single-file or sharded (FSDP).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nested_learning.training.checkpoint import is_checkpoint_dir, latest_checkpoint, load_checkpoint
from nested_learning.training.config import TrainConfig, apply_overrides


def load_run(checkpoint: str | Path):
    """``(model in eval mode, TrainConfig, step directory)``; a ``ValueError`` names a missing or damaged one."""
    from nested_learning.models import build_model

    path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"--checkpoint {str(path)!r} does not exist")
    if not is_checkpoint_dir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"--checkpoint {str(path)!r}: no intact checkpoint found there")
        path = found
    try:
        meta = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as err:  # truncated zip, unpickling error, missing file
        raise ValueError(f"--checkpoint {str(path)!r} is damaged or incomplete: {err}") from err
    config = apply_overrides(TrainConfig(), meta["config"])
    model = build_model(config.model, config.size, **config.model_overrides)
    load_checkpoint(path, model)
    return model.eval(), config, path
