"""The neural memory's run of chunks as one node split across threads (``memory/neural_memory_chunk_loop.py``) against
a loop of the reference ``mlp_chunk_step``, and inside ``NeuralMemory`` against the chunk-by-chunk node."""

import pytest
import torch
from test_memory_neural_memory_chunk_grad import _step_inputs

from nested_learning.memory import NeuralMemory
from nested_learning.memory import neural_memory as nm
from nested_learning.memory import neural_memory_chunk_loop as cl


def _loop_inputs(initial: bool, n_chunks=3, N=4, seed=0):
    """The six states of one step and the 11 per-chunk tensors of ``n_chunks`` steps stacked chunk-major, leaves."""
    steps = [_step_inputs(initial, N=N, seed=seed + c) for c in range(n_chunks)]
    per_chunk = [torch.stack([s[6 + i].detach() for s in steps]).requires_grad_() for i in range(cl.N_PER_CHUNK)]
    return steps[0][:6] + per_chunk


def _grads(outs, inputs, create_graph=False):
    gen = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, live, create_graph=create_graph)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("clip", [None, 0.3])
@pytest.mark.parametrize("initial", [True, False])
def test_the_loop_equals_the_reference_loop(two_real_threads, parts, clip, initial):
    inputs = _loop_inputs(initial)
    outs = cl.mlp_chunk_loop(parts, "gelu", clip, *inputs)
    assert "MLPChunkLoop" in type(outs[0].grad_fn).__name__
    ref = cl.chunk_loop_reference("gelu", clip, *inputs)
    # without clipping these random memories blow up over the chunks (reads ~1e19): relative agreement is the measure
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(outs, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_second_order_gradients_equal_the_reference(two_real_threads):
    inputs = _loop_inputs(True, n_chunks=2, seed=3)
    live = [t for t in inputs if t is not None]
    second = []
    for run in (lambda: cl.mlp_chunk_loop(2, "silu", 0.3, *inputs), lambda: cl.chunk_loop_reference("silu", 0.3, *inputs)):
        g = _grads(run(), inputs, create_graph=True)
        second.append(torch.autograd.grad(sum(x.square().sum() for x in g), live, allow_unused=True,
                                          materialize_grads=True))
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_the_loop_hands_its_backend_to_both_passes(two_real_threads, monkeypatch):
    """``compile`` reaches the forward's and the backward's compilation, as in the chunk-by-chunk node (whose
    compiled forms are tested in test_memory_neural_memory_fused.py; compiling here would spend the shared compiled
    functions' recompilation budget on other shapes)."""
    seen = []
    monkeypatch.setattr(cl, "compiled_values", lambda fn, backend: seen.append(("forward", backend)) or fn)
    eager_call = cl.call_compiled_or_eager
    monkeypatch.setattr(
        cl, "call_compiled_or_eager", lambda fn, backend, *a: seen.append(("backward", backend)) or eager_call(fn, None, *a)
    )
    inputs = _loop_inputs(False, n_chunks=2, seed=5)
    outs = cl.mlp_chunk_loop(2, "gelu", 0.3, *inputs, compile="inductor")
    _grads(outs, inputs)
    assert ("forward", "inductor") in seen and ("backward", "inductor") in seen


@pytest.mark.parametrize("retention", ["initial", "zero"])
def test_neural_memory_takes_the_loop_and_equals_the_chunk_by_chunk_node(two_real_threads, monkeypatch, retention):
    torch.manual_seed(0)
    layer = NeuralMemory(32, n_heads=4, chunk_size=8, expansion=2, retention=retention).double()
    x = torch.randn(2, 50, 32, dtype=torch.float64, requires_grad=True)
    calls = []
    monkeypatch.setattr(nm, "mlp_chunk_loop", lambda *a, **k: calls.append(a[0]) or cl.mlp_chunk_loop(*a, **k))
    results = []
    for loop in (True, False):
        if not loop:
            monkeypatch.setattr(layer, "_loop_parts", lambda *a: 1)
        y, state = layer(x)
        outs = (y, *state.weights, *state.momentum)
        results.append((*outs, *_grads(outs, [x, *layer.parameters()])))
    assert calls == [2]  # the loop ran, in two parts; the second pass went chunk by chunk
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_when_the_loop_splits(monkeypatch):
    layer = NeuralMemory(32, n_heads=4, chunk_size=8, expansion=2)
    q = torch.zeros(8, 16, 8)
    live = [torch.zeros(2, requires_grad=True)]
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert layer._loop_parts(2, 8, q, live, []) == 2
    assert layer._loop_parts(1, 8, q, live, []) == 1  # one chunk: the chunk-by-chunk node splits it itself
    assert layer._loop_parts(2, 8, q, [torch.zeros(2)], []) == 1  # nothing to differentiate
    with torch.no_grad():
        assert layer._loop_parts(2, 8, q, live, []) == 1
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert layer._loop_parts(2, 8, q, live, []) == 1
