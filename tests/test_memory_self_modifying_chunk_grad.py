"""The hand-written backward of self-modifying Titans' fused chunk step against autograd through
``fused_chunk_step``."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.memory import self_modifying_chunk_grad as cg
from nested_learning.memory.self_modifying_memories import fused_chunk_step


def _inputs(initial: bool, same: bool, M=3, n=5, dh=4, hid=6, seed=0):
    """Chunk-start memories R_c, running memories R (the same tensors at a chunk boundary, else distinct), inputs,
    queries, initial memories and gate biases in the fused layout, fp64 leaves."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    R_c = (r(5, M, dh, hid, scale=0.5), r(3, M, hid, dh, scale=0.3), r(2, M, hid, 1, scale=0.5))
    R = R_c if same else tuple(t + r(*t.shape, scale=0.1) for t in R_c)
    R_0 = tuple(t + r(*t.shape, scale=0.2) for t in R_c) if initial else None
    x, q = r(M, n, dh), F.normalize(r(M, n, dh), dim=-1)
    gate_bias = torch.tensor([[-0.5, 2.0]], dtype=torch.float64).repeat(M, 1) + r(M, 2, scale=0.1)
    leaves = []

    def leaf(t):
        leaves.append(t.detach().clone().requires_grad_())
        return leaves[-1]

    R_c = tuple(leaf(t) for t in R_c)
    R = R_c if same else tuple(leaf(t) for t in R)
    R_0 = tuple(leaf(t) for t in R_0) if initial else None
    return (R_c, R, leaf(x), leaf(q), R_0, leaf(gate_bias)), leaves


def _grads(step, args, leaves, objective, value_norm, weights=None, create_graph=False, bounded_targets=False):
    y, R = step(*args, objective, value_norm, bounded_targets)
    outs = [y, *R]
    if weights is None:
        weights = [torch.randn_like(t) for t in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True, materialize_grads=True)
    return outs, grads, weights


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("value_norm", [True, False])
@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize("same", [True, False])
def test_hand_backward_equals_autograd(objective, value_norm, initial, same):
    """Outputs and the gradients of every input (memories at the chunk start and running, x, q, the initial
    memories, the gate biases) agree with autograd through ``fused_chunk_step``."""
    args, leaves = _inputs(initial, same)
    outs_ref, g_ref, weights = _grads(fused_chunk_step, args, leaves, objective, value_norm)
    outs, g, _ = _grads(cg.fused_chunk_step_hand_grad, args, leaves, objective, value_norm, weights)
    assert "FusedChunkStep" in type(outs[0].grad_fn).__name__
    for a, b in zip(outs, outs_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


@pytest.mark.parametrize("objective", ["l2", "dot"])
@pytest.mark.parametrize("initial", [True, False])
def test_hand_backward_with_bounded_targets_equals_autograd(objective, initial):
    """The same with the MLP memories' targets bounded (normalize, tanh): the targets' share of the gradient goes
    through both bounds."""
    args, leaves = _inputs(initial, same=False, seed=2)
    kw = dict(bounded_targets=True)
    outs_ref, g_ref, weights = _grads(fused_chunk_step, args, leaves, objective, True, **kw)
    outs, g, _ = _grads(cg.fused_chunk_step_hand_grad, args, leaves, objective, True, weights, **kw)
    plain, _, _ = _grads(fused_chunk_step, args, leaves, objective, True, weights)
    assert not torch.allclose(plain[0], outs_ref[0])  # the bound changes the step
    for a, b in zip(outs, outs_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_second_order_gradients_equal_autograd():
    args, leaves = _inputs(True, False, seed=1)
    second, weights = [], None
    for step in (cg.fused_chunk_step_hand_grad, fused_chunk_step):
        _, g, weights = _grads(step, args, leaves, "l2", True, weights, create_graph=True)
        loss = sum(t.square().sum() for t in g)
        second.append(torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True))
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_without_gradients_it_is_the_plain_step():
    args, _ = _inputs(True, False)
    with torch.no_grad():
        y, R = cg.fused_chunk_step_hand_grad(*args, "l2", True)
        y_ref, R_ref = fused_chunk_step(*args, "l2", True)
    for a, b in zip((y, *R), (y_ref, *R_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("policy, expect_switch", [("PASSIVE", True), ("ACTIVE", False)])
def test_step_runs_on_one_thread_only_when_threads_sleep(monkeypatch, policy, expect_switch):
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    calls, count = [], [2]  # as on a 2-core machine, whatever this one has
    monkeypatch.setattr(torch, "set_num_threads", lambda m: calls.append(m) or count.__setitem__(0, m))
    monkeypatch.setattr(torch, "get_num_threads", lambda: count[0])
    args, _ = _inputs(True, False)
    y, R = cg.fused_chunk_step_hand_grad(*args, "l2", True)
    (y.sum() + sum(t.sum() for t in R)).backward()
    assert calls == ([1, 2, 1, 2] if expect_switch else [])


def test_traced_by_torch_compile_it_is_the_reference_step(monkeypatch):
    """While torch.compile traces a model, the step is ``fused_chunk_step`` (traceable; the compiler derives its
    backward) and no thread switch happens."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda m: calls.append(m))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    args, _ = _inputs(True, False)
    y, _ = cg.fused_chunk_step_hand_grad(*args, "l2", True)
    assert "FusedChunkStep" not in type(y.grad_fn).__name__ and calls == []


def test_layer_compiled_whole_equals_eager():
    """A whole self-modifying Titans layer under torch.compile (aot_eager: tracing and autograd, no C++ build)
    gives the eager layer's outputs and gradients."""
    from nested_learning.memory import SelfModifyingTitans

    torch.manual_seed(0)
    layer = SelfModifyingTitans(8, n_heads=2, chunk_size=4).double()
    x = torch.randn(1, 8, 8, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(lambda t: layer(t)[0], backend="aot_eager")
    yc, ye = compiled(x), layer(x)[0]
    torch.testing.assert_close(yc, ye, rtol=0, atol=1e-10)
    gc = torch.autograd.grad(yc.sum(), [x, *layer.parameters()])
    ge = torch.autograd.grad(ye.sum(), [x, *layer.parameters()])
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_layer_with_hand_backward_equals_default_layer(monkeypatch):
    """``hand_backward`` (on by default) changes how gradients are computed, not what they are: a streamed layer's
    outputs and every gradient match autograd's layer; HOPE passes ``titans_hand_backward`` on."""
    import nested_learning.memory.self_modifying_titans as smt
    from nested_learning.memory import SelfModifyingTitans
    from nested_learning.models import build_model

    calls = []
    step = cg.fused_chunk_step_hand_grad
    monkeypatch.setattr(smt, "fused_chunk_step_hand_grad", lambda *a: calls.append(1) or step(*a))

    torch.manual_seed(0)
    plain = SelfModifyingTitans(8, n_heads=2, chunk_size=4, hand_backward=False).double()
    hand = SelfModifyingTitans(8, n_heads=2, chunk_size=4).double()
    hand.load_state_dict(plain.state_dict())
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    outs = []
    for layer in (plain, hand):
        y1, state = layer(x[:, :6])
        y2, _ = layer(x[:, 6:], state)
        y = torch.cat([y1, y2], dim=1)
        outs.append((y, torch.autograd.grad((y * torch.linspace(-1, 1, 8)).sum(), [x, *layer.parameters()])))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert not plain.hand_backward and len(calls) == 4  # the hand layer's four pieces: 4, 2 | 2, 3 tokens
    model = build_model("hope", "tiny", vocab_size=64)
    assert all(b.mixer.hand_backward and b.mixer.memories.bounded_targets for b in model.blocks)
    model = build_model("hope", "tiny", vocab_size=64, titans_hand_backward=False, titans_bounded_targets=False)
    assert not any(b.mixer.hand_backward or b.mixer.memories.bounded_targets for b in model.blocks)


@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize("same", [True, False])
def test_inputs_only_gradients_give_x_and_q_theirs_and_nothing_else(initial, same):
    """Inside ``inputs_only_gradients`` the backward returns x's and q's gradients as outside it and None for the
    memories and gate biases; a new state off the backward's path counts as a zero gradient."""
    args, leaves = _inputs(initial, same)
    x, q = args[2], args[3]
    y, R = cg.fused_chunk_step_hand_grad(*args, "l2", True, True)
    w = torch.randn_like(y)
    full = torch.autograd.grad((y * w).sum(), leaves, retain_graph=True, allow_unused=True)
    with cg.inputs_only_gradients():
        got = torch.autograd.grad((y * w).sum(), leaves, retain_graph=True, allow_unused=True)
        assert cg._INPUTS_ONLY.on
    assert not cg._INPUTS_ONLY.on
    for leaf, a, b in zip(leaves, got, full):
        if leaf is x or leaf is q:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert a is None and b is not None
    ref = torch.autograd.grad((y * w).sum() + sum((r * 0).sum() for r in R), [x, q])
    at = {id(leaf): i for i, leaf in enumerate(leaves)}
    torch.testing.assert_close(full[at[id(x)]], ref[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(full[at[id(q)]], ref[1], rtol=0, atol=1e-14)
