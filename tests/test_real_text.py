"""The baseline learns from the real corpus: the validation loss falls by over 2 nats within 50 steps."""

import math

import pytest
import torch

from nested_learning.data import load_tokens
from nested_learning.models import build_model
from nested_learning.training import TrainConfig, Trainer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NESTED_LEARNING_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_tokens("train", max_docs=400), load_tokens("val", max_docs=400)


def test_transformer_loss_falls_on_real_text(corpus, tmp_path):
    train, val = corpus
    config = TrainConfig(model="transformer", size="tiny", model_overrides={"dim": 64, "n_layers": 1},
                         seq_len=64, batch_size=8, max_steps=50, warmup_steps=5, lr=1e-2, eval_every=50,
                         eval_batches=8, eval_batch_size=8, out_dir=str(tmp_path), tensorboard=False,
                         progress=False)
    torch.manual_seed(0)
    model = build_model("transformer", "tiny", dim=64, n_layers=1)
    trainer = Trainer(config, model=model, train_tokens=train, val_tokens=val)
    start = trainer.evaluate()
    summary = trainer.train()
    assert start > math.log(20000)  # an untrained model is near-uniform over the 50,257 tokens
    assert summary["val_loss"] < start - 2.0
