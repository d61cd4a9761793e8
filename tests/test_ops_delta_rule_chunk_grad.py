"""The chunked delta rule's groups (Eq 65/88/93): the hand-written backward of a group of chunks against autograd
through the same arithmetic, groups against the whole sequence at once, and the rule that sizes the groups."""

import pytest
import torch
import torch.nn.functional as F
from test_ops_delta_rule import make_inputs

from nested_learning.ops import delta_rule
from nested_learning.ops import delta_rule_chunk as dc
from nested_learning.ops import delta_rule_chunk_grad as dcg
from nested_learning.ops.delta_rule_side_by_side import no_side_by_side


def group_inputs(n, BH, C, Dk, Dv, decay, seed=0):
    """One group's inputs as ``delta_rule_chunk`` hands them over (chunk-major), fp64, every one a leaf."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, BH, C, Dk, dtype=torch.float64, generator=gen)
    k = F.normalize(torch.randn(n, BH, C, Dk, dtype=torch.float64, generator=gen), dim=-1)
    v = torch.randn(n, BH, C, Dv, dtype=torch.float64, generator=gen)
    eta = torch.rand(n, BH, C, dtype=torch.float64, generator=gen)
    R = torch.randn(BH, Dk, Dv, dtype=torch.float64, generator=gen)
    g = g_prev = None
    if decay:
        log_alpha = torch.log(0.5 + 0.5 * torch.rand(n, BH, C, dtype=torch.float64, generator=gen))
        g = log_alpha.cumsum(-1)
        g_prev = g - log_alpha
    return [x if x is None else x.requires_grad_() for x in (q, k, v, eta, g, g_prev, R)]


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("decay", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_hand_written_backward_matches_autograd(read, decay, n):
    inputs = group_inputs(n, 2, 6, 5, 4, decay, seed=n)
    leaves = [x for x in inputs if x is not None]
    o_ref, R_ref = dc._chunk_group(*inputs, read, True)
    o, R = dcg.chunk_group_hand_grad(*inputs, read)
    assert torch.equal(o, o_ref) and torch.equal(R, R_ref)
    go, gR = torch.randn_like(o), torch.randn_like(R)
    want = torch.autograd.grad((o_ref, R_ref), leaves, (go, gR))
    got = torch.autograd.grad((o, R), leaves, (go, gR))
    for name, a, b in zip("q k v eta g g_prev R".split(), got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_hand_written_backward_sees_only_the_final_state_or_only_the_outputs():
    inputs = group_inputs(3, 2, 4, 3, 3, decay=True, seed=5)
    leaves = [x for x in inputs if x is not None]
    for pick in (0, 1):  # the final state does not depend on q: its gradient is zero
        kw = dict(allow_unused=True, materialize_grads=True)
        want = torch.autograd.grad(dc._chunk_group(*inputs, "after", True)[pick].square().sum(), leaves, **kw)
        got = torch.autograd.grad(dcg.chunk_group_hand_grad(*inputs, "after")[pick].square().sum(), leaves, **kw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_second_order_gradients_go_through_the_reference():
    inputs = group_inputs(2, 1, 4, 3, 2, decay=True, seed=7)
    leaves = [x for x in inputs if x is not None]

    def grad_norm(step):
        o, R = step(*inputs)
        g = torch.autograd.grad(o.square().sum() + R.sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(x.square().sum() for x in g), leaves)

    want = grad_norm(lambda *x: dc._chunk_group(*x, "before", True))
    got = grad_norm(lambda *x: dcg.chunk_group_hand_grad(*x, "before"))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("alpha, strong_decay", [(True, False), (False, False), (True, True)])
def test_groups_of_chunks_equal_the_whole_sequence(monkeypatch, read, alpha, strong_decay):
    """T = 45 in chunks of 8 (the last one padded): 6 chunks in groups of 4, 2 (and 1 for fp32 sizes) against
    all at once, outputs, final state and every input's gradient, fp64. Strong decay takes the masked path."""
    torch.manual_seed(3)
    args = make_inputs(2, 45, 2, 5, 3, alpha=alpha, init=True, requires_grad=True)
    if strong_decay:
        args[4] = (1e-30 * (0.5 + torch.rand(2, 45, 2, dtype=torch.float64))).requires_grad_()
    assert dc.factored_decay_ok(dc.chunk_log_decay(args[4], 8, torch.float64)[0], torch.float64) != strong_decay
    leaves = [x for x in args if x is not None]
    go, gS = torch.randn(2, 45, 2, 3, dtype=torch.float64), torch.randn(2, 2, 3, 5, dtype=torch.float64)

    def run(group_bytes):
        monkeypatch.setattr(dc, "GROUP_BYTES", group_bytes)
        o, S = delta_rule(*args, chunk_size=8, read=read)
        return (o, S, *torch.autograd.grad((o, S), leaves, (go, gS)))

    per_chunk = 2 * 2 * 8 * 8 * 8  # B*H rows of chunks, C x max(C, D), fp64
    assert dc.chunks_per_group(6, 4, 8, 5, args[0].device, torch.float64) == 6  # the default holds them whole
    whole = run(1 << 40)
    for chunks in (4, 2, 1):
        for a, b in zip(run(chunks * per_chunk), whole):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_delta_rule_takes_the_hand_written_group_where_decays_factor(monkeypatch):
    calls = []
    hand = dcg.chunk_group_hand_grad
    monkeypatch.setattr(dcg, "chunk_group_hand_grad", lambda *a: calls.append(a[0].shape) or hand(*a))
    mild = make_inputs(1, 40, 2, 4, 4)
    with no_side_by_side():  # both heads in one group, whatever the wait policy another test left behind
        delta_rule(*mild, chunk_size=8)
    assert calls == [(5, 2, 8, 4)]
    strong = list(mild)
    strong[4] = 1e-30 * (0.5 + torch.rand(1, 40, 2, dtype=torch.float64))  # log decays past the factored range
    calls.clear()
    delta_rule(*strong, chunk_size=8)
    assert calls == []


def test_group_size_rule(monkeypatch):
    cpu, f32 = torch.device("cpu"), torch.float32
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(dc, "GROUP_BYTES", 512 * 1024)
    # (G, 4, 64, 64) fp32 intermediates of 64 KiB per chunk: 8 chunks in 512 KiB
    assert dc.chunks_per_group(128, 4, 64, 64, cpu, f32) == 8
    assert dc.chunks_per_group(5, 4, 64, 64, cpu, f32) == 5
    assert dc.chunks_per_group(128, 512, 64, 64, cpu, f32) == 1  # a chunk larger than the budget still makes a group
    assert dc.chunks_per_group(128, 4, 64, 64, cpu, torch.float64) == 4
    assert dc.chunks_per_group(128, 4, 64, 64, torch.device("meta"), f32) == 128  # other devices: one group
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dc.chunks_per_group(128, 4, 64, 64, cpu, f32) == 128
    monkeypatch.undo()
    monkeypatch.setattr(dc, "GROUP_BYTES", 512 * 1024)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert dc.chunks_per_group(128, 4, 64, 64, cpu, f32) == 128  # sleeping threads: fewer, larger ops
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert dc.chunks_per_group(128, 4, 64, 64, cpu, f32) == 8


def test_the_group_budget_is_one_cores_l2_cache(monkeypatch):
    """Unset, ``GROUP_BYTES`` is the L2 cache of one core (``ops.cpu.l2_cache_bytes``), else 1 MiB; inside the parts
    of a side-by-side run too."""
    from nested_learning.ops.threads import run_side_by_side

    cpu, f32 = torch.device("cpu"), torch.float32
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(dc, "GROUP_BYTES", None)
    monkeypatch.setattr(dc, "l2_cache_bytes", lambda: 2 * 2**20)
    assert dc.chunks_per_group(128, 4, 64, 64, cpu, f32) == 32  # 64 KiB chunks in 2 MiB
    assert run_side_by_side(lambda _: dc.chunks_per_group(128, 4, 64, 64, cpu, f32), [(0,), (1,)]) == [32, 32]
    monkeypatch.setattr(dc, "l2_cache_bytes", lambda: None)
    assert dc.chunks_per_group(128, 4, 64, 64, cpu, f32) == 16


def test_bf16_inputs_are_grouped_by_their_fp32_compute_size(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    sizes = []
    group = dc.chunks_per_group
    monkeypatch.setattr(dc, "chunks_per_group", lambda *a: sizes.append(a[-1]) or group(*a))
    q, k, v, eta, alpha, _ = make_inputs(1, 20, 1, 4, 4, dtype=torch.bfloat16)
    o, _ = delta_rule(q, k, v, eta, alpha, chunk_size=4)
    assert sizes == [torch.float32] and o.dtype == torch.bfloat16


@pytest.mark.parametrize("n", [16, 24, 64, 128])
def test_inverse_by_levels_matches_the_solve(monkeypatch, n):
    """Sizes b 2^j with b <= 8 build the inverse level by level in one output (24: from blocks of 6)."""
    calls = []
    levels = dc._unit_lower_inverse_in_place_levels
    monkeypatch.setattr(dc, "_unit_lower_inverse_in_place_levels", lambda L: calls.append(L.shape) or levels(L))
    torch.manual_seed(n)
    L = 0.3 * torch.randn(3, 5, n, n, dtype=torch.float64)  # upper part must be ignored
    X = dc.unit_lower_inverse_blocked(L)
    torch.testing.assert_close(X, dc.unit_lower_inverse_reference(L), atol=1e-12, rtol=0)
    assert torch.equal(X.triu(1), torch.zeros_like(X))
    assert calls == [(15, n, n)]
