"""Checkpoints a user can rely on: every run ends with one, resume never silently starts over, no crash window in the
writer, damaged checkpoints fall back to the newest intact one, no stray temporaries, no duplicate metric rows."""

import csv
import os
import shutil

import pytest
import torch
from test_training import VOCAB, _config, _trainer, _weights

from nested_learning.cli import _load_run
from nested_learning.models import build_model
from nested_learning.training import TrainConfig
from nested_learning.training import checkpoint as ckpt


def _fresh():
    return build_model("transformer", "tiny", vocab_size=VOCAB, dim=32, n_layers=1)


def test_a_run_saves_at_its_end_and_periodically_by_default(tmp_path):
    assert TrainConfig().save_every > 0
    config = _config(tmp_path, max_steps=3)
    assert config.save_every == TrainConfig.save_every  # the default, as `train ... max_steps=3` would get
    _trainer(config).train()
    found = ckpt.latest_checkpoint(config.out_dir)
    assert found is not None and found.name == "step_00000003"
    model, loaded = _load_run(config.out_dir)  # what `nested-learning eval --checkpoint <out_dir>` does
    assert loaded.max_steps == 3


def test_periodic_and_final_saves_write_each_step_once(tmp_path, monkeypatch):
    saved = []
    real = ckpt.save_checkpoint

    def recording(out_dir, step, *a, **k):
        saved.append(step)
        return real(out_dir, step, *a, **k)

    monkeypatch.setattr(ckpt, "save_checkpoint", recording)
    _trainer(_config(tmp_path, max_steps=4, save_every=2)).train()
    assert saved == [2, 4]


def test_resume_without_a_checkpoint_is_an_error_unless_a_fresh_start_is_allowed(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint to resume from.*allow_fresh_start"):
        _trainer(_config(tmp_path, resume=True))
    t = _trainer(_config(tmp_path, resume=True, allow_fresh_start=True))
    assert t.step == 0


def test_resaving_a_step_never_leaves_latest_pointing_at_nothing(tmp_path, monkeypatch):
    t = _trainer(_config(tmp_path, max_steps=2, save_every=2))
    t.train()
    weights = _weights(t)
    real_replace = os.replace

    def crash_on_rename_in(src, dst):
        if os.path.basename(str(src)).startswith(".tmp_step_"):
            raise KeyboardInterrupt("killed between moving the old copy aside and renaming the new one in")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_rename_in)
    with pytest.raises(KeyboardInterrupt):
        t.save()  # step 2 again
    monkeypatch.undo()
    found = ckpt.latest_checkpoint(t.out_dir)
    assert found is not None
    fresh = _fresh()
    assert ckpt.load_checkpoint(found, fresh)["step"] == 2
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())
    resumed = _trainer(_config(tmp_path, max_steps=2, save_every=2, resume=True))
    assert resumed.step == 2
    # the next save puts things in order: step_2 is back, no temporaries are left
    resumed.save()
    assert (t.out_dir / "step_00000002").is_dir()
    assert not list(t.out_dir.glob(".tmp_step_*")) and not list(t.out_dir.glob(".old_step_*"))


@pytest.mark.parametrize("damage", ["truncate_weights", "truncate_state", "delete"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage):
    t = _trainer(_config(tmp_path, max_steps=4, save_every=2))
    t.train()
    newest = t.out_dir / "step_00000004"
    if damage == "delete":
        shutil.rmtree(newest)
    else:
        f = newest / ("model.safetensors" if damage == "truncate_weights" else "trainer_state.pt")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        with pytest.raises(ValueError, match="step_00000004.*damaged or incomplete"):
            ckpt.load_checkpoint(newest, _fresh())
    found = ckpt.latest_checkpoint(t.out_dir)
    assert found is not None and found.name == "step_00000002"
    assert _trainer(_config(tmp_path, max_steps=4, save_every=2, resume=True)).step == 2
    _load_run(str(t.out_dir))


def test_killed_saves_leave_no_stray_temporaries_after_the_next_save(tmp_path, monkeypatch):
    t = _trainer(_config(tmp_path, max_steps=2, save_every=2))
    t.train()

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    t.step = 3
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        t.save()
    monkeypatch.undo()
    (t.out_dir / ".tmp_step_00000009_12345").mkdir()  # left by another, killed process
    assert len(list(t.out_dir.glob(".tmp_step_*"))) == 2
    t.save()
    assert not list(t.out_dir.glob(".tmp_step_*"))
    assert ckpt.latest_checkpoint(t.out_dir).name == "step_00000003"


def _metric_steps(path):
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_no_duplicate_metric_rows_after_a_resume(tmp_path, monkeypatch):
    straight = _trainer(_config(tmp_path / "a", max_steps=6, save_every=2))
    straight.train()
    t = _trainer(_config(tmp_path / "b", max_steps=6, save_every=2))
    real_step = t._train_step

    def killed_at_step_4():
        if t.step == 3:
            raise KeyboardInterrupt("killed during step 4")
        return real_step()

    monkeypatch.setattr(t, "_train_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert _metric_steps(t.out_dir / "metrics.csv") == [1, 2, 3]  # step 3 was logged, its checkpoint not written
    resumed = _trainer(_config(tmp_path / "b", max_steps=6, save_every=2, resume=True))
    assert resumed.step == 2
    resumed.train()
    assert _metric_steps(resumed.out_dir / "metrics.csv") == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
