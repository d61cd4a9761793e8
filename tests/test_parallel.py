"""Data parallelism with HOPE's CMS test-time updates on: 2 processes (gloo on CPU) take the step 1 process takes on
the same global batch, with DDP and with FSDP2; a run resumed from a sharded FSDP checkpoint continues exactly, and
the sharded checkpoint reads back in one process."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_training import VOCAB, _tokens

from nested_learning.models import build_model
from nested_learning.training import TrainConfig, Trainer
from nested_learning.training import checkpoint as ckpt

HOPE = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, chunk_sizes=[4, 8])
TRANSFORMER = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2)


def _config(out_dir, model="hope", **kw):
    base = dict(model=model, size="tiny", model_overrides=HOPE if model == "hope" else TRANSFORMER, seq_len=16,
                batch_size=2, max_steps=3, warmup_steps=0, eval_every=0, eval_batches=1, eval_batch_size=2,
                out_dir=str(out_dir), tensorboard=False, progress=False, lr=0.5, optimizer="sgd",
                weight_decay=0.0, grad_clip=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(config):
    torch.manual_seed(0)
    model = build_model(config.model, config.size, **config.model_overrides)
    return Trainer(config, model=model, train_tokens=_tokens(), val_tokens=_tokens(2000, 1))


def _full_weights(trainer):
    """Whole tensors on every rank: FSDP holds DTensor shards."""
    out = {}
    for k, v in trainer.model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = {}
    for parallel in ("ddp", "fsdp"):
        t = _trainer(_config(out_dir / parallel, parallel=parallel))
        assert t.model.test_time_updates  # the CMS levels learn in context during training
        t.train()
        results[parallel] = _full_weights(t)
    t = _trainer(_config(out_dir / "fsdp_transformer", model="transformer", parallel="fsdp"))  # one unit per block
    t.train()
    results["fsdp_transformer"] = _full_weights(t)
    adam = dict(parallel="fsdp", optimizer="adamw", lr=1e-2, grad_clip=1.0, save_every=2)  # sharded optimizer state
    t = _trainer(_config(out_dir / "straight", **adam))
    t.train()
    results["straight"] = _full_weights(t)
    first = _trainer(_config(out_dir / "resumed", **adam))
    first.train(until=2)  # interrupted after step 2, whose sharded checkpoint is on disk
    resumed = _trainer(_config(out_dir / "resumed", resume=True, **adam))
    assert resumed.step == 2
    resumed.train()
    results["resumed"] = _full_weights(resumed)
    results["resumed_history"] = [r["loss"] for r in resumed.history]
    if rank == 0:
        torch.save(results, out_dir / "results.pt")
    from nested_learning.training.distributed import cleanup

    cleanup(resumed.dist)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_with_ddp_and_fsdp_and_fsdp_resumes_exactly(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    got = torch.load(tmp_path / "results.pt")
    one = _trainer(_config(tmp_path / "one", batch_size=4))
    before = _full_weights(one)
    one.train()
    ref = _full_weights(one)
    assert any(not torch.equal(before[k], ref[k]) for k in ref)
    for name in ("ddp", "fsdp"):
        for k in ref:  # SGD: weights move by the gradients, averaged over ranks in another order (rounding)
            torch.testing.assert_close(got[name][k], ref[k], rtol=1e-5, atol=1e-5, msg=f"{name} {k}")
    one_t = _trainer(_config(tmp_path / "one_t", model="transformer", batch_size=4))
    one_t.train()
    ref_t = _full_weights(one_t)
    for k in ref_t:
        torch.testing.assert_close(got["fsdp_transformer"][k], ref_t[k], rtol=1e-5, atol=1e-5)
    # resumed from the sharded checkpoint of step 2: bit-identical to the run that was not interrupted
    assert all(torch.equal(got["resumed"][k], got["straight"][k]) for k in ref)
    assert len(got["resumed_history"]) == 3

    # the sharded checkpoint reads back in one process (eval, generate, export)
    path = ckpt.latest_checkpoint(tmp_path / "resumed")
    assert ckpt.is_sharded(path) and ckpt.is_intact(path)
    model = build_model("hope", "tiny", **HOPE)
    state = ckpt.load_checkpoint(path, model)
    assert state["step"] == 3 and "optimizer" not in state
    assert all(torch.equal(v, got["straight"][k]) for k, v in model.state_dict().items())
    # and a plain run refuses to resume it, saying why
    with pytest.raises(ValueError, match="sharded"):
        _trainer(_config(tmp_path / "resumed", max_steps=4, resume=True, optimizer="adamw"))


def test_parallel_settings_are_checked():
    with pytest.raises(ValueError, match="'parallel' must be one of"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ValueError, match="element-wise optimizer"):
        TrainConfig(parallel="fsdp", optimizer="muon")
