"""NeuralMemory with ``grad_at="call_start"``: a call's whole chunks all at once (``neural_memory_call_start``)
against the chunk-by-chunk reference ``_segment`` (``fused=False``)."""

import pytest
import torch

import nested_learning.memory.neural_memory as nm
from nested_learning.memory import NeuralMemory
from nested_learning.memory.memories import MLPMemory


def _pair(**kw):
    """The batched form and the reference with the same weights, fp64, with varied gates."""
    torch.manual_seed(5)
    fast = NeuralMemory(8, n_heads=2, chunk_size=4, max_lr=0.5, grad_at="call_start", **kw).double()
    with torch.no_grad():
        fast.to_gates.weight.normal_(0, 1.0)
        fast.to_gates.bias.zero_()
    ref = NeuralMemory(8, n_heads=2, chunk_size=4, max_lr=0.5, grad_at="call_start", fused=False, **kw).double()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _stream(layer, x, cuts):
    state, ys = None, []
    for a, b in zip([0, *cuts], [*cuts, x.shape[1]]):
        y, state = layer(x[:, a:b], state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("memory", ["mlp", "linear"])
@pytest.mark.parametrize("retention", ["initial", "zero"])
@pytest.mark.parametrize("grad_clip", [None, 0.5])
@pytest.mark.parametrize("cuts", [[], [6, 13], [8]])
def test_batched_chunks_equal_the_chunk_by_chunk_reference(memory, retention, grad_clip, cuts):
    """Outputs, final fast weights, momenta and chunk weights, and the gradients of the input and of every slow
    weight (second order through the inner updates) agree, whether calls start on a chunk boundary or inside one."""
    fast, ref = _pair(memory=memory, retention=retention, grad_clip=grad_clip)
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


def test_a_calls_whole_chunks_run_at_once(monkeypatch):
    """A call that starts 2 tokens into a chunk: its first piece (2 tokens) and its tail (3) take ``_segment``,
    its 3 whole chunks one batched call; the reference takes ``_segment`` for every piece."""
    calls, segments = [], []
    batched, segment = nm.call_start_chunks, NeuralMemory._segment
    monkeypatch.setattr(nm, "call_start_chunks", lambda *a: calls.append(a[5].shape[1]) or batched(*a))
    monkeypatch.setattr(NeuralMemory, "_segment", lambda self, *a: segments.append(a[3].shape[1]) or segment(self, *a))
    fast, ref = _pair()
    _, state = fast(torch.randn(1, 2, 8, dtype=torch.float64))
    fast(torch.randn(1, 2 + 12 + 3, 8, dtype=torch.float64), state)
    assert calls == [12] and segments == [2, 2, 3]
    segments.clear()
    _, state = ref(torch.randn(1, 2, 8, dtype=torch.float64))
    ref(torch.randn(1, 2 + 12 + 3, 8, dtype=torch.float64), state)
    assert calls == [12] and segments == [2, 2, 4, 4, 4, 3]


def test_which_memories_take_the_batched_form():
    assert NeuralMemory(8, n_heads=2, grad_at="call_start")._batched_call_start()
    assert NeuralMemory(8, n_heads=2, grad_at="call_start", memory="linear")._batched_call_start()
    assert not NeuralMemory(8, n_heads=2, grad_at="call_start", fused=False)._batched_call_start()
    assert not NeuralMemory(8, n_heads=2)._batched_call_start()

    class Scaled(MLPMemory):  # a memory of its own: its forward_with may not take extra leading dimensions
        def forward_with(self, linear, x):
            return 2 * super().forward_with(linear, x)

    custom = NeuralMemory(8, n_heads=2, grad_at="call_start", memory=Scaled(4, 8, n_heads=2))
    assert not custom._batched_call_start()


@pytest.mark.parametrize("n", [1, 4])
def test_state_scan_equals_its_reference(n):
    """The scan's hand-written node against autograd through the loop: values and first derivatives, and the
    second derivatives it takes through the reference under create_graph (fp64 gradcheck)."""
    from nested_learning.memory.neural_memory_call_start import state_scan, state_scan_reference

    torch.manual_seed(n)
    f, b, e = (torch.rand(3, n, dtype=torch.float64, requires_grad=True) for _ in range(3))
    writes = torch.randn(3, n, 2, 5, dtype=torch.float64, requires_grad=True)
    X0 = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    inputs = (f, b, e, writes, X0)
    out, ref = state_scan(*inputs), state_scan_reference(*inputs)
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-13)
    g = [torch.randn_like(r) for r in ref]
    got, want = torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(state_scan, inputs)
    assert torch.autograd.gradgradcheck(state_scan, inputs)
    with torch.no_grad():
        for a, r in zip(state_scan(*inputs), ref):
            torch.testing.assert_close(a, r, rtol=0, atol=1e-13)
