"""Crash-safe checkpoints: weights in safetensors, optimizer / scheduler / RNG / data position beside them.

A checkpoint is a directory ``step_<N>/`` written first under a temporary name and renamed when complete; the file
``latest`` (itself replaced atomically) names the newest complete one. A crash mid-save therefore leaves at most a
stray temporary directory (removed by the next save), and the previous checkpoint stays loadable. Readers fall back
to the newest intact checkpoint when the one ``latest`` names is missing or truncated.

A sharded checkpoint (``parallel=fsdp``, ``training/fsdp.py``) holds ``sharded/`` (``torch.distributed.checkpoint``:
every rank's shards of the weights and optimizer state) instead of ``model.safetensors``; the same readers accept it,
and :func:`load_checkpoint` reassembles its weights in one process.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("step_", 1)[1].split("_")[0])
    except (IndexError, ValueError):
        return -1


def _remove_strays(out_dir: Path) -> None:
    """Delete what killed saves left behind: ``.tmp_step_*`` directories, and ``.old_step_*`` copies whose
    replacement is in place."""
    for stray in out_dir.glob(".tmp_step_*"):
        shutil.rmtree(stray, ignore_errors=True)
    for old in out_dir.glob(".old_step_*"):
        if is_intact(out_dir / f"step_{_step_of(old):08d}"):
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out_dir: str | Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``out_dir/step_<step>/`` atomically, point ``latest`` at it, keep the newest ``keep`` checkpoints.

    A checkpoint is never deleted before its replacement is complete and named: saving a step that is already on
    disk first moves the old copy aside (``.old_step_*``, still a fallback of :func:`find_checkpoint`), renames the
    new one in, repoints ``latest``, and only then removes the old copy.
    """
    tmp = prepare_checkpoint(out_dir, step, tag=str(os.getpid()))
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    return publish_checkpoint(out_dir, step, tmp, keep)


def prepare_checkpoint(out_dir: str | Path, step: int, tag: str) -> Path:
    """Remove strays and create the temporary directory ``.tmp_step_<step>_<tag>`` that a save fills."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_strays(out_dir)
    tmp = out_dir / f".tmp_step_{step:08d}_{tag}"
    tmp.mkdir()
    return tmp


def publish_checkpoint(out_dir: str | Path, step: int, tmp: Path, keep: int = 2) -> Path:
    """Rename the complete ``tmp`` to ``step_<step>``, repoint ``latest``, keep the newest ``keep``."""
    out_dir = Path(out_dir)
    final = out_dir / f"step_{step:08d}"
    aside = None
    if final.exists():
        aside = out_dir / f".old_step_{step:08d}_{os.getpid()}"
        if aside.exists():  # an older copy of the same step, left by a killed save; final is the current one
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    _write_atomic(out_dir / LATEST, final.name)
    _remove_strays(out_dir)
    if keep > 0:
        for old in sorted(out_dir.glob("step_*"), key=_step_of)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


SHARDED = "sharded"  # the torch.distributed.checkpoint directory of an FSDP checkpoint (weights and optimizer)


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded (FSDP) checkpoint rather than a single ``model.safetensors``."""
    return (Path(path) / SHARDED).is_dir()


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether ``path`` is one checkpoint (a ``step_*`` directory) rather than a run directory."""
    path = Path(path)
    return (path / "model.safetensors").exists() or is_sharded(path)


def is_intact(path: str | Path) -> bool:
    """Whether ``path`` holds a complete checkpoint: its files present and readable to their end (for a sharded
    one, the metadata that ``torch.distributed.checkpoint`` writes last)."""
    path = Path(path)
    try:
        if is_sharded(path):
            from torch.distributed.checkpoint import FileSystemReader

            FileSystemReader(str(path / SHARDED)).read_metadata()
        else:
            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                f.keys()
        torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # a truncated or missing file fails in many ways (OSError, SafetensorError, zip errors)
        return False
    return True


def checkpoint_candidates(out_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, the one ``latest`` names first, then the others newest first."""
    out_dir = Path(out_dir)
    pointer = out_dir / LATEST
    named = out_dir / pointer.read_text().strip() if pointer.exists() else None
    others = sorted([*out_dir.glob("step_*"), *out_dir.glob(".old_step_*")], key=_step_of, reverse=True)
    return ([named] if named is not None else []) + [p for p in others if p != named]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest intact one when that one is missing or damaged."""
    for path in checkpoint_candidates(out_dir):
        if is_intact(path):
            return path
    return None


def load_checkpoint(path: str | Path, model: torch.nn.Module, map_location: str | torch.device = "cpu") -> dict:
    """Load weights into ``model`` (strictly) and return the trainer state saved beside them."""
    path = Path(path)
    try:
        state = torch.load(path / "trainer_state.pt", map_location=map_location, weights_only=False)
    except Exception as err:  # truncated zip, unpickling errors, missing file
        raise ValueError(f"checkpoint {path} is damaged or incomplete: {err}") from err
    if is_sharded(path):
        load_sharded_weights(path, model)
        return state
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True,
                                         device=str(map_location))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"checkpoint {path} is damaged or incomplete: {err}") from err
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    return state


def load_sharded_weights(path: str | Path, model: torch.nn.Module) -> None:
    """The weights of a sharded (FSDP) checkpoint into a plain, unsharded ``model`` in one process (eval, generate,
    export): ``torch.distributed.checkpoint`` reassembles the shards of any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    weights = get_model_state_dict(model)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*load in a single process.*")
            dcp.load({"model": weights}, checkpoint_id=str(Path(path) / SHARDED),
                     no_dist=not torch.distributed.is_initialized())
    except Exception as err:  # missing or mismatched keys, truncated shards
        raise ValueError(f"sharded checkpoint {path} does not fit the model or is damaged: {err}") from err
    set_model_state_dict(model, weights)
