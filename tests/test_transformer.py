import pytest
import torch

from nested_learning.models import TransformerPP, build_model


def tiny(**kw):
    cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, max_seq_len=64)
    cfg.update(kw)
    return TransformerPP(**cfg)


def test_causal_changing_token_t_changes_no_earlier_logit():
    m = tiny().eval()
    x = torch.randint(0, 97, (2, 20))
    base = m(x).logits
    for t in (0, 7, 19):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 97
        out = m(x2).logits
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-4)


def test_streaming_equals_one_shot():
    m = tiny().double().eval()
    x = torch.randint(0, 97, (2, 30))
    full = m(x).logits
    for split in (1, 13, 29):
        a = m(x[:, :split])
        b = m(x[:, split:], state=a.state)
        assert torch.allclose(torch.cat([a.logits, b.logits], 1), full, atol=1e-10)


def test_loss_is_next_token_cross_entropy():
    m = tiny()
    x = torch.randint(0, 97, (2, 10))
    out = m(x, labels=x)
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 97), x.reshape(-1))
    assert torch.allclose(out.loss, ref)


def test_tied_embeddings_and_preset():
    m = build_model("transformer", "tiny", vocab_size=101)
    assert m.head.weight is m.embed.weight
    assert m.config.vocab_size == 101


@pytest.mark.parametrize(
    "bad, exc",
    [
        (torch.tensor([[1, 2, 97]]), ValueError),  # id outside the vocabulary
        (torch.tensor([[-1, 2]]), ValueError),
        (torch.zeros(2, 3), TypeError),  # float ids
        (torch.zeros(3, dtype=torch.long), ValueError),  # wrong rank
        (torch.zeros(1, 65, dtype=torch.long), ValueError),  # longer than max_seq_len
    ],
)
def test_bad_input_is_a_clear_error(bad, exc):
    with pytest.raises(exc):
        tiny()(bad)


def test_stream_longer_than_limit_raises():
    m = tiny()
    out = m(torch.zeros(1, 60, dtype=torch.long))
    with pytest.raises(ValueError, match="limit"):
        m(torch.zeros(1, 5, dtype=torch.long), state=out.state)


def test_generate_continues_from_state_and_is_deterministic_at_zero_temperature():
    m = tiny().eval()
    prompt = torch.randint(0, 97, (1, 5))
    ids = m.generate(prompt, 6, temperature=0)
    assert ids.shape == (1, 11) and torch.equal(ids[:, :5], prompt)
    # Greedy decoding equals the argmax of a full forward pass at every step.
    logits = m(ids[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), ids[:, 5:])


def test_unknown_model_and_preset():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("gpt5")
    with pytest.raises(ValueError, match="preset"):
        TransformerPP.from_preset("huge")
