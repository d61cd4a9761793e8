"""NeuralMemory's fast paths for whole chunks against the reference ``_segment`` form: ``neural_memory_fused`` (Eq 90
gradients) and ``neural_memory_call_start`` (``grad_at="call_start"``, a call's whole chunks at once)."""

import pytest
import torch

import nested_learning.memory.neural_memory as nm
from nested_learning.memory import NeuralMemory
from nested_learning.memory.memories import MLPMemory
from nested_learning.memory.neural_memory_call_start import state_scan, state_scan_reference


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
    _assert_streams_agree(fast, ref, cuts)


def _assert_streams_agree(fast, ref, cuts):
    """Outputs, final fast weights, momenta and chunk weights, and the gradients of the input and of every slow
    weight of the two layers on one stream split at ``cuts``."""
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


def test_the_eq90_chunk_step_takes_mlp_memories_with_chunk_start_gradients():
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


@pytest.mark.parametrize("memory", ["mlp", "linear"])
@pytest.mark.parametrize("retention", ["initial", "zero"])
@pytest.mark.parametrize("grad_clip", [None, 0.5])
@pytest.mark.parametrize("cuts", [[], [6, 13], [8]])
def test_batched_call_start_chunks_equal_the_reference(memory, retention, grad_clip, cuts):
    """``grad_at="call_start"``: a call's whole chunks at once against chunk after chunk, second order included,
    whether calls start on a chunk boundary or inside one."""
    fast, ref = _pair(memory=memory, retention=retention, grad_clip=grad_clip, grad_at="call_start")
    _assert_streams_agree(fast, ref, cuts)


def test_a_calls_whole_chunks_run_at_once(monkeypatch):
    """A call that starts 2 tokens into a chunk: its first piece (2 tokens) and its tail (3) take ``_segment``,
    its 3 whole chunks one batched call; the reference takes ``_segment`` for every piece."""
    calls, segments = [], []
    batched, segment = nm.call_start_chunks, NeuralMemory._segment
    monkeypatch.setattr(nm, "call_start_chunks", lambda *a: calls.append(a[5].shape[1]) or batched(*a))
    monkeypatch.setattr(NeuralMemory, "_segment", lambda self, *a: segments.append(a[3].shape[1]) or segment(self, *a))
    fast, ref = _pair(grad_at="call_start")
    _, state = fast(torch.randn(1, 2, 8, dtype=torch.float64))
    fast(torch.randn(1, 2 + 12 + 3, 8, dtype=torch.float64), state)
    assert calls == [12] and segments == [2, 2, 3]
    segments.clear()
    _, state = ref(torch.randn(1, 2, 8, dtype=torch.float64))
    ref(torch.randn(1, 2 + 12 + 3, 8, dtype=torch.float64), state)
    assert calls == [12] and segments == [2, 2, 4, 4, 4, 3]


def test_a_long_call_runs_its_whole_chunks_in_bounded_groups(monkeypatch):
    """The batched form holds every chunk's start memory at once: a call's whole chunks run in groups within
    ``GROUP_BYTES`` (here two chunks), with the reference's results."""
    import nested_learning.memory.neural_memory_call_start as call_start

    calls = []
    batched = nm.call_start_chunks
    monkeypatch.setattr(nm, "call_start_chunks", lambda *a: calls.append(a[5].shape[1]) or batched(*a))
    fast, ref = _pair(grad_at="call_start")
    per_chunk = 2 * 8 * sum(w.numel() for w in fast.initial_state(2, dtype=torch.float64).weights)  # fp64 [W; S]
    monkeypatch.setattr(call_start, "GROUP_BYTES", 2 * per_chunk)
    _assert_streams_agree(fast, ref, [])  # 19 tokens: 4 whole chunks of 4, then 3
    assert calls == [8, 8]


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
