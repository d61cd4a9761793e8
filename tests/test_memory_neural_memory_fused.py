"""NeuralMemory's fast path for whole chunks (``neural_memory_fused``) against its reference ``_segment`` form."""

import pytest
import torch

import nested_learning.memory.neural_memory as nm
from nested_learning.memory import NeuralMemory
from nested_learning.memory.memories import MLPMemory


def _pair(**kw):
    """Two layers with the same weights: the fast path and the reference, fp64, with varied gates."""
    torch.manual_seed(3)
    fast = NeuralMemory(8, n_heads=2, chunk_size=4, max_lr=0.5, **kw).double()
    with torch.no_grad():
        fast.to_gates.weight.normal_(0, 1.0)
        fast.to_gates.bias.zero_()
    ref = NeuralMemory(8, n_heads=2, chunk_size=4, max_lr=0.5, fused=False, **kw).double()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _stream(layer, x, cuts):
    """The layer over x in calls split at ``cuts``; returns the concatenated outputs and the last state."""
    state, ys = None, []
    for a, b in zip([0, *cuts], [*cuts, x.shape[1]]):
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("retention", ["initial", "zero"])
@pytest.mark.parametrize("grad_clip", [None, 0.5])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("cuts", [[], [6, 13], [8]])
def test_fast_path_equals_reference(retention, grad_clip, activation, cuts):
    """Outputs, final fast weights and momenta, and gradients of the input and of every slow weight (through the
    inner updates, second order) agree, whether calls start on a chunk boundary or inside a chunk."""
    fast, ref = _pair(retention=retention, grad_clip=grad_clip)
    if activation != "gelu":
        for layer in (fast, ref):
            layer.memory = MLPMemory(4, 8, n_heads=2, activation=activation).double()
        ref.memory.load_state_dict(fast.memory.state_dict())
    x = torch.randn(2, 19, 8, dtype=torch.float64, requires_grad=True)
    (yf, sf), (yr, sr) = _stream(fast, x, cuts), _stream(ref, x, cuts)
    torch.testing.assert_close(yf, yr, rtol=0, atol=1e-10)
    for a, b in zip([*sf.weights, *sf.momentum, *sf.chunk_weights], [*sr.weights, *sr.momentum, *sr.chunk_weights]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert sf.pos == sr.pos
    w = torch.randn_like(yf)
    gf = torch.autograd.grad((yf * w).sum(), [x, *fast.parameters()])
    gr = torch.autograd.grad((yr * w).sum(), [x, *ref.parameters()])
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_whole_chunks_take_the_fast_path(monkeypatch):
    """A call that starts 2 tokens into a chunk: its first piece (2 tokens) and its tail (3) take ``_segment``,
    the 3 whole chunks between them take the chunk step (``mlp_chunk_step`` with its hand-written backward), once
    each."""
    calls = []

    def counting(*args):
        calls.append(args[6].shape[1])  # k: (N, n, dh)
        return step(*args)

    step = nm.mlp_chunk_step_hand_grad
    monkeypatch.setattr(nm, "mlp_chunk_step_hand_grad", counting)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # chunk by chunk (passive waiting: one node for the three, below)
    fast, _ = _pair()
    _, state = fast(torch.randn(1, 2, 8, dtype=torch.float64))
    assert calls == []
    fast(torch.randn(1, 2 + 12 + 3, 8, dtype=torch.float64), state)
    assert calls == [4, 4, 4]


def test_whole_chunks_take_one_node_under_passive_waiting(two_real_threads, monkeypatch):
    """Under passive waiting with two threads a training call's 3 whole chunks run as one node, in two parts."""
    loops = []
    loop = nm.mlp_chunk_loop
    monkeypatch.setattr(nm, "mlp_chunk_loop", lambda *a, **k: loops.append((a[0], a[9].shape[0])) or loop(*a, **k))
    fast, _ = _pair()
    _, state = fast(torch.randn(1, 2, 8, dtype=torch.float64))
    fast(torch.randn(1, 2 + 12 + 3, 8, dtype=torch.float64, requires_grad=True), state)
    assert loops == [(2, 3)]  # (parts, chunks)


def test_other_memories_and_call_start_gradients_keep_the_reference():
    assert NeuralMemory(8, n_heads=2)._fast_chunks()
    assert not NeuralMemory(8, n_heads=2, memory="linear")._fast_chunks()
    assert not NeuralMemory(8, n_heads=2, grad_at="call_start")._fast_chunks()
    assert not NeuralMemory(8, n_heads=2, fused=False)._fast_chunks()
    with pytest.raises(ValueError, match="compile_chunk_step needs"):
        NeuralMemory(8, n_heads=2, memory="linear").compile_chunk_step()


def test_compiled_chunk_step_equals_eager():
    """``compile_chunk_step`` (aot_eager: inductor's tracing and autograd without building C++ kernels) gives the
    eager outputs and gradients."""
    fast, ref = _pair()
    fast.compile_chunk_step("aot_eager")
    x = torch.randn(1, 14, 8, dtype=torch.float64, requires_grad=True)
    (yc, _), (yr, _) = _stream(fast, x, [5]), _stream(ref, x, [5])
    torch.testing.assert_close(yc, yr, rtol=0, atol=1e-10)
    gc = torch.autograd.grad(yc.sum(), [x, *fast.parameters()])
    gr = torch.autograd.grad(yr.sum(), [x, *ref.parameters()])
    for a, b in zip(gc, gr):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert fast.compile_backend == "aot_eager"


def test_failed_compilation_warns_and_runs_eagerly():
    fast, ref = _pair()
    fast.compile_chunk_step("no_such_backend")
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        y = fast(x)[0]
    torch.testing.assert_close(y, ref(x)[0], rtol=0, atol=1e-10)
    assert fast.compile_backend is None
