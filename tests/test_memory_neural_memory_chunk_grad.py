"""The hand-written backward of NeuralMemory's whole-chunk step against autograd through ``mlp_chunk_step``."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.memory import neural_memory_chunk_grad as cg
from nested_learning.memory.memories import _ACTIVATIONS
from nested_learning.memory.neural_memory_fused import gate_terms, mlp_chunk_step


def _step_inputs(initial: bool, N=3, n=5, dh=4, hid=6, seed=0):
    """Inputs of one chunk step as ``NeuralMemory._whole_chunks`` builds them, fp64, all requiring gradients."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    W2t, S2t, W1t, S1t = r(N, dh, hid, s=0.5), r(N, dh, hid, s=0.3), r(N, hid, dh, s=0.5), r(N, hid, dh, s=0.3)
    W2st, W1st = (r(N, dh, hid), r(N, hid, dh)) if initial else (None, None)
    k, q, v = F.normalize(r(N, n, dh), dim=-1), F.normalize(r(N, n, dh), dim=-1), r(N, n, dh)
    theta = 0.5 * torch.sigmoid(r(N, n))
    coef, scales, c_last, f_last, b_last, e_last = gate_terms(theta, F.logsigmoid(r(N, n)), F.logsigmoid(r(N, n) + 2))
    inputs = [W2t, W1t, S2t, S1t, W2st, W1st, k, k - v, q, (q @ k.mT) * coef, (c_last * k.unsqueeze(1)).mT, coef,
              scales, c_last, f_last, b_last, e_last]
    return [None if t is None else t.detach().clone().requires_grad_() for t in inputs]


def _vjp(step, inputs, activation, clip, weights, create_graph=False):
    outs = step(*inputs, activation, clip)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    live = [t for t in inputs if t is not None]
    return outs, torch.autograd.grad(loss, live, create_graph=create_graph, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("activation", sorted(_ACTIVATIONS))
@pytest.mark.parametrize("clip", [None, 0.3, 8.0, 100.0])
@pytest.mark.parametrize("initial", [True, False])
def test_hand_backward_equals_autograd(activation, clip, initial):
    """Outputs and the gradient of every one of the 17 tensor inputs (weights, momenta, initial memory, q, k, v
    terms and every gate term) agree with autograd through ``mlp_chunk_step``; clip 0.3 clips every token, 8 some
    (per-token gradient norms here range from 1 to 86), 100 none."""
    inputs = _step_inputs(initial)
    with torch.no_grad():
        weights = [torch.randn_like(o) for o in mlp_chunk_step(*inputs, activation, clip)]
    outs_ref, g_ref = _vjp(mlp_chunk_step, inputs, activation, clip, weights)
    outs, g = _vjp(cg.mlp_chunk_step_hand_grad, inputs, activation, clip, weights)
    assert outs[0].grad_fn is not None and "MLPChunkStep" in type(outs[0].grad_fn).__name__
    for a, b in zip(outs, outs_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("split", [False, True])
def test_second_order_gradients_equal_autograd(request, split):
    """Under create_graph the step's backward is differentiable again: gradients of a function of the first
    gradients agree with the reference's; also with the batch split across two threads (passive waiting)."""
    if split:
        request.getfixturevalue("two_real_threads")
    inputs = _step_inputs(True, seed=1)
    with torch.no_grad():
        weights = [torch.randn_like(o) for o in mlp_chunk_step(*inputs, "gelu", 0.3)]
    live = [t for t in inputs if t is not None]
    second = []
    for step in (cg.mlp_chunk_step_hand_grad, mlp_chunk_step):
        _, g = _vjp(step, inputs, "gelu", 0.3, weights, create_graph=True)
        loss = sum(x.square().sum() for x in g)
        second.append(torch.autograd.grad(loss, live, allow_unused=True, materialize_grads=True))
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_without_gradients_it_is_the_plain_step(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # one part; the split: test_the_split_no_grad_step_is_the_plain_step
    inputs = [None if t is None else t.detach() for t in _step_inputs(True)]
    outs = cg.mlp_chunk_step_hand_grad(*inputs, "gelu", None)
    assert all(o.grad_fn is None for o in outs)
    for a, b in zip(outs, mlp_chunk_step(*inputs, "gelu", None)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("activation", sorted(_ACTIVATIONS))
def test_activation_derivatives(activation):
    z = torch.linspace(-4, 4, 81, dtype=torch.float64).requires_grad_()
    (d1,) = torch.autograd.grad(_ACTIVATIONS[activation](z).sum(), z, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), z, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(cg.activation_derivatives(activation, z.detach(), second=False), d1.detach())
    torch.testing.assert_close(cg.activation_derivatives(activation, z.detach(), second=True), d2)
    with pytest.raises(ValueError, match="unknown activation"):
        cg.activation_derivatives("softplus", z.detach(), second=False)


@pytest.mark.parametrize("policy, expect_switch", [("PASSIVE", True), ("ACTIVE", False)])
def test_step_runs_on_one_thread_only_when_threads_sleep(monkeypatch, policy, expect_switch):
    """Forward and backward each run their small ops on one thread under the passive OpenMP policy, and restore
    the caller's thread count."""
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    monkeypatch.setattr(cg, "side_by_side_parts", lambda device, n: 1)  # the batch in one part (see below)
    calls, count = [], [2]  # as on a 2-core machine, whatever this one has
    monkeypatch.setattr(torch, "set_num_threads", lambda m: calls.append(m) or count.__setitem__(0, m))
    monkeypatch.setattr(torch, "get_num_threads", lambda: count[0])
    inputs = _step_inputs(True)
    outs = cg.mlp_chunk_step_hand_grad(*inputs, "gelu", None)
    sum(o.sum() for o in outs).backward()
    assert calls == ([1, 2, 1, 2] if expect_switch else [])


def test_traced_by_torch_compile_it_is_the_reference_step(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    outs = cg.mlp_chunk_step_hand_grad(*_step_inputs(True), "gelu", None)
    assert "MLPChunkStep" not in type(outs[0].grad_fn).__name__


@pytest.mark.parametrize("clip", [None, 0.3])
@pytest.mark.parametrize("initial", [True, False])
def test_the_batch_split_across_threads_gives_the_same_step(monkeypatch, two_real_threads, clip, initial):
    """Under passive waiting at 2 threads the batch's memories are split in two parts, each forward and backward on
    a thread of its own: outputs and every input's gradient equal the one-part step's to rounding (the parts' smaller
    batched products may round differently)."""
    import threading

    inputs = _step_inputs(initial)
    assert inputs[0].shape[0] >= 2
    weights = [torch.randn_like(o) for o in mlp_chunk_step(*inputs, "gelu", clip)]
    threads, forward = set(), cg.forward_values

    def recording(*args):
        threads.add(threading.current_thread().name)
        return forward(*args)

    monkeypatch.setattr(cg, "forward_values", recording)
    split = _vjp(cg.mlp_chunk_step_hand_grad, inputs, "gelu", clip, weights)
    assert len(threads) == 2 and any(name.startswith("nested-learning-part") for name in threads)
    monkeypatch.setattr(cg, "side_by_side_parts", lambda device, n: 1)
    whole = _vjp(cg.mlp_chunk_step_hand_grad, inputs, "gelu", clip, weights)
    for a, b in zip([*split[0], *split[1]], [*whole[0], *whole[1]]):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_the_split_no_grad_step_is_the_plain_step(two_real_threads):
    inputs = [None if t is None else t.detach() for t in _step_inputs(True)]
    for a, b in zip(cg.mlp_chunk_step_hand_grad(*inputs, "gelu", None), mlp_chunk_step(*inputs, "gelu", None)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("split", [False, True])
def test_compiled_forward_and_backward_equal_the_eager_step(request, monkeypatch, split):
    """``compile=`` runs ``forward_values`` and ``backward_values`` through torch.compile (aot_eager: the
    compiler's tracing without building C++ kernels), still as the hand-written node and, under passive waiting at
    two threads, still split across them: outputs and every input's gradient equal the eager step's."""
    from nested_learning.memory import compiled_steps

    if split:
        request.getfixturevalue("two_real_threads")
    seen = []
    make = compiled_steps.compiled

    def recording(fn, backend):
        seen.append((fn.__name__, backend))
        return make(fn, backend)

    monkeypatch.setattr(compiled_steps, "compiled", recording)
    inputs = _step_inputs(True, N=4)
    weights = [torch.randn_like(o) for o in mlp_chunk_step(*inputs, "gelu", 0.3)]
    step = cg.mlp_chunk_step_hand_grad
    outs, g = _vjp(lambda *a: step(*a, compile="aot_eager"), inputs, "gelu", 0.3, weights)
    assert "MLPChunkStep" in type(outs[0].grad_fn).__name__
    assert {("forward_values", "aot_eager"), ("backward_values", "aot_eager")} <= set(seen)
    outs_ref, g_ref = _vjp(step, inputs, "gelu", 0.3, weights)
    for a, b in zip([*outs, *g], [*outs_ref, *g_ref]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_backward_that_fails_to_compile_warns_and_runs_eagerly():
    inputs = _step_inputs(False, seed=2)
    weights = [torch.randn_like(o) for o in mlp_chunk_step(*inputs, "gelu", None)]
    outs = cg.mlp_chunk_step_hand_grad(*inputs, "gelu", None)  # eager forward, as if it had compiled
    outs[0].grad_fn.compile = "no_such_backend"  # the node's backend for its backward
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    live = [t for t in inputs if t is not None]
    with pytest.warns(RuntimeWarning, match="backward .*running it eagerly"):
        g = torch.autograd.grad(loss, live)
    _, g_ref = _vjp(cg.mlp_chunk_step_hand_grad, inputs, "gelu", None, weights)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
