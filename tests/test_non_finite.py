"""Non-finite inputs raise a clear error instead of poisoning a stream (and, in the chunked forms, the positions before
them); alpha = 0 in the chunked ops gives the recurrent reference's finite result."""

import pytest
import torch
from test_ops_delta_rule import make_inputs

from nested_learning.memory import ContinuumMemorySystem, DeltaNetLayer, NeuralMemory, SelfModifyingTitans
from nested_learning.ops import delta_rule, linear_attention, newton_schulz


@pytest.mark.parametrize("op", ["delta_rule", "linear_attention"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("read", ["after", "before"])
def test_zero_alpha_chunked_matches_recurrent(op, dtype, read):
    q, k, v, eta, alpha, S = make_inputs(2, 45, 2, 6, 5, dtype=torch.float64)
    alpha[:, 3] = 0.0  # a full reset inside the first chunk
    alpha[1, 20:23] = 0.0  # several in a row, in another chunk
    args = [x.to(dtype) for x in (q, k, v, eta, alpha, S)]
    if op == "delta_rule":
        fn = delta_rule
    else:
        def fn(q, k, v, eta, alpha, S, **kw):
            return linear_attention(q, k, v, alpha, initial_state=S, **kw)
    o_ref, S_ref = fn(*args, mode="recurrent", read=read)
    o, S_out = fn(*args, chunk_size=16, mode="chunk", read=read)
    assert torch.isfinite(o).all() and torch.isfinite(S_out).all()
    if dtype == torch.float64:
        torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(S_out, S_ref, atol=1e-10, rtol=1e-10)
    else:
        assert (o - o_ref).abs().max() / o_ref.abs().max() < 1e-5
        assert (S_out - S_ref).abs().max() / S_ref.abs().max() < 1e-5


def test_zero_alpha_chunked_gradients_are_finite():
    q, k, v, eta, alpha, S = make_inputs(1, 20, 1, 4, 4, requires_grad=True)
    with torch.no_grad():
        alpha[:, 5] = 0.0
    o, _ = delta_rule(q, k, v, eta, alpha, S, chunk_size=8)
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, eta, alpha, S))


@pytest.mark.parametrize("name", ["q", "k", "v", "eta", "alpha", "initial_state"])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_delta_rule_rejects_non_finite_inputs(name, mode):
    inputs = dict(zip(["q", "k", "v", "eta", "alpha", "initial_state"], make_inputs(1, 10, 1, 4, 4)))
    inputs[name] = inputs[name].clone()
    inputs[name].view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=f"{name} must be finite, got nan"):
        delta_rule(**inputs, chunk_size=4, mode=mode)


def test_linear_attention_rejects_inf_and_negative_alpha():
    q, k, v, _, alpha, _ = make_inputs(1, 10, 1, 4, 4)
    with pytest.raises(ValueError, match="v must be finite, got inf"):
        linear_attention(q, k, v.index_fill(1, torch.tensor([2]), float("inf")), alpha)
    with pytest.raises(ValueError, match="alpha must be >= 0, got -0.5"):
        linear_attention(q, k, v, alpha.index_fill(1, torch.tensor([2]), -0.5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_newton_schulz_rejects_non_finite_input(bad):
    G = torch.randn(6, 4)
    G[2, 1] = bad
    with pytest.raises(ValueError, match=r"G must be finite, got .*inf|G must be finite, got nan"):
        newton_schulz(G)


LAYERS = {
    "self_modifying_titans": lambda: SelfModifyingTitans(16, n_heads=2, chunk_size=4),
    "neural_memory": lambda: NeuralMemory(16, n_heads=2, chunk_size=4),
    "cms": lambda: ContinuumMemorySystem(16, (4, 8), expansion=2),
    "deltanet": lambda: DeltaNetLayer(16, n_heads=2, chunk_size=4),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_memory_layers_reject_a_nan_token_and_keep_their_state(name):
    """A NaN at t=3 raises before anything is written: the caller's state is untouched and the stream continues
    with clean tokens exactly as if the bad call had never been made."""
    layer = LAYERS[name]()
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        _, state = layer(x[:, :8])
        bad = x[:, 8:].clone()
        bad[0, 3, 5] = float("nan")
        with pytest.raises(ValueError, match=r"x must be finite, got nan at index \(0, 3, 5\)"):
            layer(bad, state)
        y, _ = layer(x[:, 8:], state)
        y_straight, _ = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_straight[:, 8:], rtol=1e-5, atol=1e-6)
