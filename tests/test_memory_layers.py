"""The layer contract for every memory layer: streaming at any split equals one shot, causality, memory carries
information past the conv window, state detach / flatten round trip, fp32 states, gradients to initial memories."""

import pytest
import torch

from nested_learning.memory import DeltaNetLayer, LinearAttentionLayer, NeuralMemory, SelfModifyingTitans

DIM, T = 8, 13

LAYERS = {
    "smt-l2-c3": lambda: SelfModifyingTitans(DIM, n_heads=2, chunk_size=3, objective="l2"),
    "smt-dot-c4": lambda: SelfModifyingTitans(DIM, n_heads=2, chunk_size=4, objective="dot", gate=False),
    "smt-l2-c1": lambda: SelfModifyingTitans(DIM, n_heads=2, chunk_size=1),
    "smt-mlp-l2-c3": lambda: SelfModifyingTitans(DIM, n_heads=2, chunk_size=3, memory="mlp"),
    "smt-mlp-dot-c4": lambda: SelfModifyingTitans(
        DIM, n_heads=2, chunk_size=4, memory="mlp", objective="dot"
    ),
    "neural-mlp-c3": lambda: NeuralMemory(DIM, n_heads=2, chunk_size=3, memory="mlp"),
    "neural-linear-c4": lambda: NeuralMemory(DIM, n_heads=2, chunk_size=4, memory="linear", conv_size=0),
    "deltanet-c4": lambda: DeltaNetLayer(DIM, n_heads=2, chunk_size=4),
    "linattn-elu": lambda: LinearAttentionLayer(DIM, n_heads=2, chunk_size=4),
    "linattn-l2-decay-conv": lambda: LinearAttentionLayer(
        DIM, n_heads=2, chunk_size=4, feature_map="l2", decay=True, conv_size=4
    ),
}


def _make(name):
    torch.manual_seed(0)
    return LAYERS[name]().double()


def _stream(layer, x, splits):
    state, ys = None, []
    for a, b in zip([0, *splits], [*splits, x.shape[1]]):
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("name", list(LAYERS))
def test_streaming_equals_one_shot(name):
    layer = _make(name)
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    with torch.no_grad():
        full, final = layer(x)
        for splits in ([1], [5], [7], [2, 3, 4, 9], list(range(1, T))):
            y, state = _stream(layer, x, splits)
            torch.testing.assert_close(y, full, rtol=0, atol=1e-10, msg=f"splits {splits}")
            for a, b in zip(state.flatten().values(), final.flatten().values()):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(LAYERS))
def test_causal_and_carries_information(name):
    layer = _make(name)
    x = torch.randn(1, T, DIM, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)[0]
        x2 = x.clone()
        x2[:, 6] += 1.0
        y2 = layer(x2)[0]
        torch.testing.assert_close(y2[:, :6], y[:, :6], rtol=0, atol=1e-12)
        assert (y2[:, 6:] - y[:, 6:]).abs().max() > 1e-6
        # the first token reaches the last output only through the memory (conv window is 4)
        x3 = x.clone()
        x3[:, 0] += 1.0
        assert (layer(x3)[0][:, -1] - y[:, -1]).abs().max() > 1e-6


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_detach_flatten_round_trip(name):
    layer = _make(name)
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    y_a, state = layer(x[:, :5])
    detached = state.detach()
    flat = detached.flatten()
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in flat.values())
    restored = state.unflatten({k: v.clone() for k, v in flat.items()})
    assert type(restored) is type(state)
    with torch.no_grad():
        y_b, s_b = layer(x[:, 5:], restored)
        y_c, s_c = layer(x[:, 5:], detached)
    torch.testing.assert_close(y_b, y_c, rtol=0, atol=0)
    full = layer(x)[0]
    torch.testing.assert_close(torch.cat([y_a, y_b], 1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(LAYERS))
def test_states_are_fp32_for_low_precision_inputs(name):
    layer = _make(name).to(torch.bfloat16)
    x = torch.randn(1, 6, DIM, dtype=torch.bfloat16)
    y, state = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    memories = {k: v for k, v in state.flatten().items() if v.is_floating_point()}  # convolution caches too
    assert memories and all(v.dtype == torch.float32 for v in memories.values())


def _memory_tensors(state) -> list:
    """The state's memory tensors with their graph (``flatten()`` detaches; the conv cache holds raw inputs)."""
    import dataclasses

    from nested_learning.memory.state import _map

    found = []
    for f in dataclasses.fields(state):
        if f.name != "conv":
            _map(getattr(state, f.name), lambda t: found.append(t) or t)
    return [t for t in found if t.is_floating_point()]


@pytest.mark.parametrize(
    "name", ["smt-l2-c3", "smt-dot-c4", "smt-mlp-l2-c3", "neural-mlp-c3", "neural-linear-c4"]
)
def test_gradients_reach_initial_memories(name):
    """Eq 72-73: the slow initial memories are learned through the whole in-context trajectory. A loss on the last
    output and the final memories: its gradient w.r.t. the initial memories (and every other weight) equals a central
    finite difference along a random direction (fp64)."""
    layer = _make(name)
    x = torch.randn(2, T, DIM, dtype=torch.float64)

    def total():
        y, state = layer(x)
        memories = _memory_tensors(state)
        assert memories and all(t.requires_grad for t in memories)
        return y[:, -1].pow(2).sum() + sum(t.pow(2).sum() for t in memories)

    initial = [n for n, _ in layer.named_parameters()
               if n.startswith(("memories.initial", "memories.w", "memories.g1", "memory.initial"))]
    assert initial
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad(total(), params)
    gen = torch.Generator().manual_seed(0)
    for n, p, g in zip(names, params, grads):
        d = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                p.add_(sign * 1e-6 * d)
            losses.append(total().item())
            with torch.no_grad():
                p.sub_(sign * 1e-6 * d)
        numeric, analytic = (losses[0] - losses[1]) / 2e-6, float((g * d).sum())
        if n in initial:
            assert abs(analytic) > 1e-4, n
        assert abs(analytic - numeric) <= 1e-5 * abs(analytic) + 1e-7, (n, analytic, numeric)
