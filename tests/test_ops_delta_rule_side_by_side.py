"""The chunked delta rule split across threads under passive OpenMP waiting (``ops/delta_rule_side_by_side.py``):
the split form against the unsplit chunked form, values and gradients, first and second order, and the rule that
decides the split."""

import pytest
import torch
from test_ops_delta_rule import make_inputs

from nested_learning.ops import delta_rule
from nested_learning.ops import delta_rule_side_by_side as sbs
from nested_learning.ops.delta_rule_chunk import delta_rule_chunk

NAMES = ("q", "k", "v", "eta", "alpha", "S0")


def _whole(inputs, chunk_size, read):
    o, S = delta_rule_chunk(*inputs, chunk_size, read, torch.float64)
    return o, S


def _grads(outs, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in outs]
    live = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad(outs, live, weights)


# (B, H, T, alpha, initial state, read): heads split (H > 1), the batch split (H = 1), an uneven split (H = 3)
CASES = [
    (1, 4, 40, True, True, "after"),
    (1, 4, 37, False, False, "before"),
    (3, 1, 33, True, False, "after"),
    (2, 3, 40, False, True, "before"),
]


@pytest.mark.parametrize("B, H, T, alpha, init, read", CASES)
def test_split_equals_the_whole_sequence_form(two_real_threads, B, H, T, alpha, init, read):
    inputs = make_inputs(B, T, H, 6, 5, alpha=alpha, init=init, requires_grad=True)
    parts, axis = sbs.side_by_side_split(inputs[0], 4)
    assert parts == 2 and axis == (2 if H > 1 else 0)
    o, S = delta_rule(*inputs, chunk_size=4, read=read)
    assert "SideBySide" in type(o.grad_fn).__name__  # the split form ran
    o_ref, S_ref = _whole(inputs, 4, read)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-12)
    for name, a, b in zip(NAMES, _grads((o, S), inputs), _grads((o_ref, S_ref), inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11, msg=name)


def test_some_inputs_without_gradient_and_one_output_used(two_real_threads):
    q, k, v, eta, alpha, S0 = make_inputs(1, 40, 4, 6, 5)
    q.requires_grad_()
    o, _ = delta_rule(q, k, v, eta, alpha, S0, chunk_size=4)
    (g,) = torch.autograd.grad(o.square().sum(), q)
    o_ref, _ = _whole((q, k, v, eta, alpha, S0), 4, "after")
    (g_ref,) = torch.autograd.grad(o_ref.square().sum(), q)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-11)


def test_a_retained_graph_gives_the_same_gradients_twice(two_real_threads):
    inputs = make_inputs(1, 40, 2, 6, 5, requires_grad=True)
    o, S = delta_rule(*inputs, chunk_size=4)
    loss = o.sum() + S.square().sum()
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(loss, inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_second_order_gradients_equal_the_whole_form(two_real_threads):
    """Under create_graph the backward is autograd through the unsplit form: gradients of a function of the first
    gradients agree with the whole form's."""
    inputs = make_inputs(1, 36, 2, 5, 4, requires_grad=True)
    second = []
    for run in (lambda: delta_rule(*inputs, chunk_size=4), lambda: _whole(inputs, 4, "after")):
        o, S = run()
        g = torch.autograd.grad(o.square().sum() + S.sum(), inputs, create_graph=True)
        second.append(torch.autograd.grad(sum(x.square().sum() for x in g), inputs))
    for name, a, b in zip(NAMES, *second):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_without_gradients_and_in_inference_mode(two_real_threads):
    inputs = make_inputs(2, 40, 3, 6, 5)
    o_ref, S_ref = _whole(inputs, 4, "after")
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            o, S = delta_rule(*inputs, chunk_size=4)
        assert o.grad_fn is None
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-12)


def test_split_rule(monkeypatch):
    q = torch.zeros(1, 256, 4, 8)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert sbs.side_by_side_split(q, 64) == (2, 2)  # heads, two threads
    assert sbs.side_by_side_split(q, 65)[0] == 1  # under MIN_CHUNKS chunks: not worth a hand-over
    assert sbs.side_by_side_split(torch.zeros(3, 256, 1, 8), 64) == (2, 0)  # one head: the batch
    assert sbs.side_by_side_split(torch.zeros(1, 256, 1, 8), 64)[0] == 1  # one memory: nothing to split
    with sbs.no_side_by_side():
        assert sbs.side_by_side_split(q, 64)[0] == 1
    assert sbs.side_by_side_split(q, 64) == (2, 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert sbs.side_by_side_split(q, 64)[0] == 1  # one thread (e.g. inside a model's one-thread segment loop)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # spinning threads: parts would compete for the cores
    assert sbs.side_by_side_split(q, 64)[0] == 1
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert sbs.side_by_side_split(q, 64)[0] == 1
