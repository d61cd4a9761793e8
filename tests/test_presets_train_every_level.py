"""Every CMS level of the shipped training presets steps inside a training window, so its rate gets a gradient."""

import pytest
import torch

from nested_learning.demo import DEMO_BASE
from nested_learning.evaluation.harness import build
from nested_learning.evaluation.presets import get_preset


def _windows():
    out = {"demo": (DEMO_BASE.size, {}, DEMO_BASE.seq_len)}
    for name in ("quick", "small"):
        pre = get_preset(name).pretrain
        out[f"report {name}"] = (pre.size, dict(pre.overrides), pre.seq_len)
    return out


@pytest.mark.parametrize("family", ["hope", "hope_attention"])
@pytest.mark.parametrize("preset", sorted(_windows()))
def test_every_level_rate_gets_a_gradient(preset, family):
    size, overrides, seq_len = _windows()[preset]
    model, _ = build(family, size, {**overrides, "vocab_size": 97})
    assert model.levels_without_training_signal(seq_len) == []
    ids = torch.randint(0, 97, (1, seq_len), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    for i, cms in enumerate(model.cms_layers()):
        grad = cms.lr_logit.grad
        assert grad is not None and (grad != 0).all(), f"{preset} {family} layer {i}: {grad}"


def test_a_level_as_long_as_the_window_gets_no_gradient():
    """The reason for the presets: at seq_len = C_max the slowest level steps after the last token only."""
    model, _ = build("hope", "tiny", {"vocab_size": 97, "n_layers": 1, "dim": 32, "chunk_sizes": (8, 16)})
    assert model.levels_without_training_signal(16) == ["layer 0 CMS level 2 (chunk 16)"]
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    grad = model.cms_layers()[0].lr_logit.grad
    assert grad[0] != 0 and grad[1] == 0
