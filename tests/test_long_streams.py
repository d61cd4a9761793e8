"""Long streams stay bounded and live, trained or not: the memories' norms stay in a band around their initial values
(no growth to 1e19, no collapse to 0) and the memory still changes the output at the end of the stream.

The fast variants stream a few thousand tokens; the 100k-token ones are marked slow."""

import dataclasses
import math

import pytest
import torch

from nested_learning.models import build_model

PIECE = 512


def _memories(name, state):
    """The in-context memories of every layer: Titans' MLP weights, or self-modifying Titans' matrices and the CMS
    levels' fast weights."""
    if name == "titans":
        return [w for layer in state.layers for w in layer.weights]
    return [w for m in state.mixers for w in m.memory] + [w for c in state.cms for w in c.weights]


def _without_mixer_memories(name, state):
    if name == "titans":
        layers = [dataclasses.replace(s, weights=[torch.zeros_like(w) for w in s.weights],
                                      chunk_weights=[torch.zeros_like(w) for w in s.chunk_weights],
                                      momentum=[torch.zeros_like(w) for w in s.momentum]) for s in state.layers]
        return dataclasses.replace(state, layers=layers)
    mixers = [dataclasses.replace(m, memory=[torch.zeros_like(w) for w in m.memory],
                                  chunk_memory=[torch.zeros_like(w) for w in m.chunk_memory]) for m in state.mixers]
    return dataclasses.replace(state, mixers=mixers)


def _stream(name, n_tokens):
    torch.manual_seed(0)
    model = build_model(name, "tiny").eval()
    gen = torch.Generator().manual_seed(1)
    state, norms = None, []
    with torch.no_grad():
        initial = [float(w.norm()) for w in _memories(name, model.initial_state(1) if name != "titans" else
                                                      model(torch.zeros(1, 1, dtype=torch.long)).state)]
        for _ in range(n_tokens // PIECE):
            ids = torch.randint(0, model.vocab_size, (1, PIECE), generator=gen)
            out = model(ids, state=state)
            state = out.state
            norms.append([float(w.norm()) for w in _memories(name, state)])
        probe = torch.randint(0, model.vocab_size, (1, 64), generator=gen)
        with_memory = model(probe, state=state).logits
        without = model(probe, state=_without_mixer_memories(name, state)).logits
    return initial, norms, with_memory, without


def _check(name, n_tokens):
    initial, norms, with_memory, without = _stream(name, n_tokens)
    for step in norms:
        for n, n0 in zip(step, initial):
            assert math.isfinite(n), f"{name}: a memory became non-finite"
            # a band of two orders of magnitude around the initial norm: the failures this guards against went to
            # 1e19 / inf and to exactly 0
            if n0 == 0:  # a zero-initialised memory (the MLP gate memories' output layer) must stay bounded
                assert n < 100, f"{name}: a zero-initialised memory grew to {n:.3g}"
                continue
            assert n0 / 100 < n < 100 * n0, f"{name}: memory norm {n:.3g} left the band around {n0:.3g}"
    assert torch.isfinite(with_memory).all()
    change = (with_memory - without).abs().max().item()
    assert change > 1e-3, f"{name}: the memory no longer changes the output ({change:.2e})"


@pytest.mark.parametrize("name", ["hope", "titans"])
def test_untrained_memories_stay_bounded_and_live_on_a_short_stream(name):
    _check(name, 4096)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hope", "titans"])
def test_untrained_memories_stay_bounded_and_live_over_100k_tokens(name):
    _check(name, 100_352)
