"""Trainer: exact resume, crash-safe checkpoints, non-finite losses, DDP equals one process."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from nested_learning.models import build_model
from nested_learning.training import TrainConfig, Trainer, TrainingDiverged
from nested_learning.training import checkpoint as ckpt

VOCAB = 64


def _tokens(n=20000, seed=0):
    # A learnable stream: a noisy repeating pattern, so the loss can fall.
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(VOCAB, dtype=np.uint16), n // VOCAB + 1)[:n]
    noise = rng.integers(0, VOCAB, n).astype(np.uint16)
    return np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)


def _config(tmp_path, **kw):
    base = dict(model="transformer", size="tiny", model_overrides=dict(vocab_size=VOCAB, dim=32, n_layers=1),
                seq_len=16, batch_size=4, max_steps=6, warmup_steps=2, eval_every=0, eval_batches=2,
                eval_batch_size=4, out_dir=str(tmp_path / "run"), tensorboard=False, progress=False, lr=1e-2)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(config):
    tokens = _tokens()
    torch.manual_seed(config.seed)
    model = build_model(config.model, config.size, **config.model_overrides)
    return Trainer(config, model=model, train_tokens=tokens, val_tokens=_tokens(2000, 1))


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_exact_resume(tmp_path):
    straight = _trainer(_config(tmp_path / "a", max_steps=8))
    straight.train()
    first = _trainer(_config(tmp_path / "b", max_steps=8, save_every=3))
    first.train(until=3)  # interrupted after 3 steps; the checkpoint of step 3 is on disk
    resumed = _trainer(_config(tmp_path / "b", max_steps=8, save_every=3, resume=True))
    assert resumed.step == 3
    resumed.train()
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]


def test_interrupted_checkpoint_write_leaves_previous_loadable(tmp_path, monkeypatch):
    t = _trainer(_config(tmp_path, max_steps=2, save_every=2))
    t.train()
    good = ckpt.latest_checkpoint(t.out_dir)
    saved = _weights(t)

    def crash(*a, **k):
        raise KeyboardInterrupt("power cut")

    t.step = 4
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        t.save()
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(t.out_dir) == good
    fresh = build_model("transformer", "tiny", vocab_size=VOCAB, dim=32, n_layers=1)
    state = ckpt.load_checkpoint(good, fresh)
    assert state["step"] == 2
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())


def test_non_finite_losses_are_skipped_then_training_stops(tmp_path):
    t = _trainer(_config(tmp_path, max_steps=20, save_every=1, max_bad_steps=3))
    real_forward = t.model.forward

    def poisoned(*a, **k):
        out = real_forward(*a, **k)
        if t.step >= 2:
            out.loss = out.loss * float("nan")
        return out

    t.model.forward = poisoned
    with pytest.raises(TrainingDiverged, match="3 non-finite steps"):
        t.train()
    skipped = [r["skipped"] for r in t.history]
    assert skipped == [0, 0, 1, 1, 1]
    # The last good checkpoint (step 2, before the bad steps) is intact and loadable.
    good = ckpt.latest_checkpoint(t.out_dir)
    assert good is not None and good.name == "step_00000002"
    ckpt.load_checkpoint(good, build_model("transformer", "tiny", vocab_size=VOCAB, dim=32, n_layers=1))


def test_a_forward_that_overflows_inside_a_memory_is_a_skipped_step(tmp_path):
    """A memory layer that meets a value its own model made non-finite raises NonFiniteError; the trainer counts that
    step as non-finite (skipped, weights untouched) instead of stopping, and stops after max_bad_steps of them."""
    from nested_learning.ops._validation import NonFiniteError, check_finite

    t = _trainer(_config(tmp_path, max_steps=20, max_bad_steps=2))
    real_forward = t.model.forward
    calls = []

    def overflowing(*a, **k):
        calls.append(t.step)
        if t.model.training and t.step in (1, 3, 4):
            check_finite("x", torch.tensor([float("nan")]))
        return real_forward(*a, **k)

    t.model.forward = overflowing
    t.train(until=3)
    assert [r["skipped"] for r in t.history] == [0, 1, 0]
    before = _weights(t)
    with pytest.raises(TrainingDiverged, match="2 non-finite steps"):
        t.train()
    assert all(torch.equal(before[k], v) for k, v in _weights(t).items())
    with pytest.raises(ValueError, match="must be finite"):  # still a ValueError for other callers
        check_finite("x", torch.tensor([float("inf")]))
    assert issubclass(NonFiniteError, ValueError)


def test_loss_falls(tmp_path):
    t = _trainer(_config(tmp_path, max_steps=40, eval_every=40))
    summary = t.train()
    first = np.mean([r["loss"] for r in t.history[:5]])
    last = np.mean([r["loss"] for r in t.history[-5:]])
    assert last < first - 1.0
    assert summary["val_loss"] < np.log(VOCAB) - 1.0


@pytest.mark.parametrize("model", ["transformer", "hope"])
def test_bf16_precision_trains_under_autocast_with_fp32_weights(tmp_path, model, monkeypatch):
    overrides = dict(vocab_size=VOCAB, dim=32, n_layers=1)
    if model == "hope":
        overrides.update(n_heads=2, chunk_sizes=(4, 8), titans_chunk_size=4)
    t = _trainer(_config(tmp_path, model=model, model_overrides=overrides, precision="bf16", max_steps=30,
                         eval_every=30))
    forwards = []
    forward = type(t.model).forward
    monkeypatch.setattr(type(t.model), "forward", lambda self, *a, **k: forwards.append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16) or forward(
        self, *a, **k))
    summary = t.train()
    assert forwards and all(forwards)  # every forward, training and evaluation, under bf16 autocast
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    first = np.mean([r["loss"] for r in t.history[:5]])
    last = np.mean([r["loss"] for r in t.history[-5:]])
    assert np.isfinite(summary["val_loss"]) and last < first - 0.5


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, result_path):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = _config(out_dir, batch_size=2, max_steps=2, optimizer="sgd", lr=1.0, grad_clip=0.0,
                     weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0)
    t = _trainer(config)
    t.train()
    if rank == 0:
        torch.save(_weights(t), result_path)
    from nested_learning.training.distributed import cleanup

    cleanup(t.dist)


def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    port = _free_port()
    mp.spawn(_ddp_worker, args=(2, port, tmp_path / "ddp", tmp_path / "ddp.pt"), nprocs=2, join=True)
    single = _trainer(_config(tmp_path / "one", batch_size=4, max_steps=2, optimizer="sgd", lr=1.0, grad_clip=0.0,
                              weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0))
    before = _weights(single)
    single.train()
    ddp = torch.load(tmp_path / "ddp.pt")
    one = _weights(single)
    # Plain SGD with lr 1: the weight change is minus the summed gradients, so equal weights mean equal gradients.
    assert any(not torch.equal(before[k], one[k]) for k in one)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=1e-6, rtol=1e-5)
