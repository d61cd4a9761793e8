"""Every model in bf16: with bf16 parameters a stream continues from the state its previous call returned (the state
keeps the dtypes of the model's initial state: fp32 memories and convolution caches) and a split stream gives the
one-call logits to bf16 rounding; under bf16 autocast a training step runs and gives finite fp32 gradients."""

import pytest
import torch

from nested_learning.models.registry import build_model

NAMES = ["hope", "hope-independent", "hope_attention", "titans", "deltanet", "transformer"]
V = 64


def model(name):
    """A registry model; "hope-independent": HOPE whose CMS levels are read side by side through a learned gate."""
    torch.manual_seed(0)
    if name == "hope-independent":
        return build_model("hope", "tiny", vocab_size=V, cms_variant="independent")
    return build_model(name, "tiny", vocab_size=V)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_parameters_stream_from_the_returned_state(name):
    m = model(name).to(torch.bfloat16)
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(x).logits.float()
        first = m(x[:, :19])
        second = m(x[:, 19:], state=first.state)
        again = m(x[:, 19:], state=first.state)  # the same state twice: the call does not change it
    split = torch.cat([first.logits, second.logits], dim=1).float()
    assert torch.isfinite(split).all()
    torch.testing.assert_close(split, full, rtol=0, atol=0.05 * float(full.abs().max()))
    torch.testing.assert_close(again.logits, second.logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_under_bf16_autocast_gives_finite_fp32_gradients(name):
    m = model(name)
    x = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x, labels=x).loss
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
