"""Delta rule / DGD on a matrix memory (Eq 56-57, 65, 88, 93): chunked form against the token recurrence."""

import sys

import pytest
import torch
import torch.nn.functional as F

from nested_learning.ops import _common, delta_rule


def make_inputs(B, T, H, Dk, Dv, alpha=True, init=True, dtype=torch.float64, requires_grad=False):
    """Inputs in the stable range: unit keys, eta in (0, 1), alpha in (0.5, 1)."""
    q = torch.randn(B, T, H, Dk, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, Dk, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, Dv, dtype=dtype)
    eta = torch.rand(B, T, H, dtype=dtype)
    a = 0.5 + 0.5 * torch.rand(B, T, H, dtype=dtype) if alpha else None
    S = torch.randn(B, H, Dv, Dk, dtype=dtype) if init else None
    out = [q, k, v, eta, a, S]
    if requires_grad:
        for x in out:
            if x is not None:
                x.requires_grad_(True)
    return out


# (T, H, Dk, Dv, alpha, initial state): every T of the contract, Dk != Dv, H from 1 to 4.
CONFIGS = [
    (1, 1, 4, 3, True, True),
    (63, 2, 8, 5, False, True),
    (100, 3, 6, 10, True, False),
    (257, 4, 8, 6, True, True),
    (100, 2, 5, 7, False, False),
]


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T,H,Dk,Dv,alpha,init", CONFIGS)
def test_chunk_matches_recurrent_fp64(T, H, Dk, Dv, alpha, init, chunk_size, read):
    args = make_inputs(2, T, H, Dk, Dv, alpha, init)
    o_ref, S_ref = delta_rule(*args, mode="recurrent", read=read)
    o, S = delta_rule(*args, chunk_size=chunk_size, mode="chunk", read=read)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("read", ["after", "before"])
def test_chunk_matches_recurrent_fp32(read):
    args64 = make_inputs(2, 257, 4, 16, 12)
    args32 = [x.float() if x is not None else None for x in args64]
    o_ref, S_ref = delta_rule(*args64, mode="recurrent", read=read)
    for mode in ("chunk", "recurrent"):
        o, S = delta_rule(*args32, chunk_size=64, mode=mode, read=read)
        assert o.dtype == S.dtype == torch.float32
        assert (o.double() - o_ref).abs().max() / o_ref.abs().max() < 1e-5
        assert (S.double() - S_ref).abs().max() / S_ref.abs().max() < 1e-5


@pytest.mark.parametrize("read", ["after", "before"])
def test_masked_decay_form_matches_recurrent(read, monkeypatch):
    # Force the always-exact masked-difference decays (normally used only for strong decay) on a ragged T.
    monkeypatch.setitem(_common.FACTORED_LOG_RANGE, torch.float64, -1.0)
    args = make_inputs(2, 45, 2, 6, 5, requires_grad=True)
    leaves = [x for x in args if x is not None]
    o_ref, S_ref = delta_rule(*args, mode="recurrent", read=read)
    o, S = delta_rule(*args, chunk_size=16, read=read)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=1e-10)
    g_ref = torch.autograd.grad(o_ref.sum() + S_ref.sum(), leaves)
    for g, r in zip(torch.autograd.grad(o.sum() + S.sum(), leaves), g_ref):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)


def test_strong_decay_fp32():
    # alpha in (0.005, 0.015): |log gamma| over a chunk of 64 is ~290, past the factored range, so this runs the
    # masked form in fp32; it must stay accurate and give finite gradients.
    q, k, v, eta, _, S = make_inputs(1, 130, 2, 8, 4, dtype=torch.float32)
    a = 0.005 + 0.01 * torch.rand(1, 130, 2)
    leaves = [x.requires_grad_(True) for x in (q, k, v, eta, a, S)]
    o_ref, S_ref = delta_rule(*(x.double() for x in leaves), mode="recurrent")
    o, S_T = delta_rule(*leaves)
    assert (o.double() - o_ref).abs().max() / o_ref.abs().max() < 1e-5
    assert (S_T.double() - S_ref).abs().max() / S_ref.abs().max() < 1e-5
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(o.sum() + S_T.sum(), leaves))


def test_recurrent_is_the_equation():
    # The reference uses the rank-one form; check it against the literal S (alpha I - eta k k^T) + eta v k^T.
    q, k, v, eta, a, S = make_inputs(1, 6, 2, 4, 3)
    o, S_T = delta_rule(q, k, v, eta, a, S, mode="recurrent")
    for t in range(6):
        for h in range(2):
            kt, vt = k[0, t, h], v[0, t, h]
            transition = a[0, t, h] * torch.eye(4, dtype=kt.dtype) - eta[0, t, h] * torch.outer(kt, kt)
            S[0, h] = S[0, h] @ transition + eta[0, t, h] * torch.outer(vt, kt)
            torch.testing.assert_close(o[0, t, h], S[0, h] @ q[0, t, h])
    torch.testing.assert_close(S_T, S)


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("alpha", [True, False])
def test_gradients_match_recurrent(read, alpha):
    args = make_inputs(2, 37, 2, 6, 5, alpha=alpha, requires_grad=True)
    leaves = [x for x in args if x is not None]
    weights = torch.randn(2, 37, 2, 5, dtype=torch.float64), torch.randn(2, 2, 5, 6, dtype=torch.float64)

    def grads(mode):
        o, S = delta_rule(*args, chunk_size=16, mode=mode, read=read)
        loss = (o * weights[0]).sum() + (S * weights[1]).sum()
        return torch.autograd.grad(loss, leaves)

    for g_chunk, g_ref in zip(grads("chunk"), grads("recurrent")):
        torch.testing.assert_close(g_chunk, g_ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("read", ["after", "before"])
def test_gradcheck_chunk(read):
    args = make_inputs(1, 5, 1, 3, 2, requires_grad=True)  # three chunks of 2, the last one padded

    def f(*xs):
        return delta_rule(*xs, chunk_size=2, mode="chunk", read=read)

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("split", [21, 32])  # inside a chunk of 16, and on a boundary
def test_two_calls_equal_one(read, split):
    q, k, v, eta, a, S = make_inputs(1, 50, 2, 6, 4)
    o, S_T = delta_rule(q, k, v, eta, a, S, chunk_size=16, read=read)
    first, second = slice(0, split), slice(split, None)
    o1, S_mid = delta_rule(
        q[:, first], k[:, first], v[:, first], eta[:, first], a[:, first], S, chunk_size=16, read=read
    )
    o2, S_end = delta_rule(
        q[:, second],
        k[:, second],
        v[:, second],
        eta[:, second],
        a[:, second],
        S_mid,
        chunk_size=16,
        read=read,
    )
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S_end, S_T, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("read", ["after", "before"])
def test_causal(read):
    q, k, v, eta, a, S = make_inputs(1, 40, 1, 4, 3)
    o, _ = delta_rule(q, k, v, eta, a, S, chunk_size=16, read=read)
    t = 21
    k2, v2 = k.clone(), v.clone()
    k2[:, t] = F.normalize(torch.randn(4, dtype=k.dtype), dim=-1)
    v2[:, t] += 1.0
    o2, _ = delta_rule(q, k2, v2, eta, a, S, chunk_size=16, read=read)
    # The write at t is visible from t on ("after") or only from t + 1 on ("before", y_t = M_{t-1}(q_t)).
    first_changed = t if read == "after" else t + 1
    torch.testing.assert_close(o2[:, :first_changed], o[:, :first_changed], atol=1e-13, rtol=0)
    assert (o2[:, first_changed] - o[:, first_changed]).abs().max() > 1e-3


def test_no_decay_equals_alpha_one():
    q, k, v, eta, _, S = make_inputs(1, 30, 2, 4, 4, alpha=False)
    ones = torch.ones_like(eta)
    o1, S1 = delta_rule(q, k, v, eta, None, S, chunk_size=8)
    o2, S2 = delta_rule(q, k, v, eta, ones, S, chunk_size=8)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(S1, S2)


def test_low_precision_inputs_use_fp32_state():
    args = make_inputs(1, 40, 2, 8, 8, dtype=torch.float32)
    low = [x.bfloat16() if x is not None else None for x in args]
    o, S = delta_rule(*low, chunk_size=16)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o_ref, S_ref = delta_rule(*[x.float() if x is not None else None for x in low], chunk_size=16)
    torch.testing.assert_close(S, S_ref)
    torch.testing.assert_close(o, o_ref.bfloat16())


def test_autocast_keeps_fp32():
    args = make_inputs(1, 20, 2, 8, 8, dtype=torch.float32)
    o_ref, S_ref = delta_rule(*args, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, S = delta_rule(*args, chunk_size=8)
    assert o.dtype == S.dtype == torch.float32
    torch.testing.assert_close(o, o_ref)


def test_final_state_optional():
    args = make_inputs(1, 5, 1, 3, 3)
    for mode in ("chunk", "recurrent"):
        assert delta_rule(*args, output_final_state=False, mode=mode)[1] is None


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_empty_sequence_keeps_state(mode):
    q, k, v, eta, a, S = make_inputs(2, 0, 3, 4, 5)
    o, S_T = delta_rule(q, k, v, eta, a, S, mode=mode)
    assert o.shape == (2, 0, 3, 5)
    torch.testing.assert_close(S_T, S, atol=0, rtol=0)


def test_bad_input_raises():
    q, k, v, eta, a, S = make_inputs(1, 8, 2, 4, 3)
    with pytest.raises(ValueError):
        delta_rule(q, k[..., :3], v, eta)
    with pytest.raises(ValueError):
        delta_rule(q, k, v[:, :7], eta)
    with pytest.raises(ValueError):
        delta_rule(q, k, v, eta[:, :7])
    with pytest.raises(ValueError):
        delta_rule(q, k, v, eta, a[..., :1])
    with pytest.raises(ValueError):
        delta_rule(q, k, v, eta, initial_state=S.mT)
    with pytest.raises(ValueError):
        delta_rule(q[0], k[0], v[0], eta[0])
    with pytest.raises(ValueError):
        delta_rule(q, k, v, eta, mode="parallel")
    with pytest.raises(ValueError):
        delta_rule(q, k, v, eta, read="during")
    with pytest.raises(ValueError):
        delta_rule(q, k, v, eta, chunk_size=0)
    with pytest.raises(TypeError):
        delta_rule(q, k, v, eta, chunk_size=16.0)
    with pytest.raises(TypeError):
        delta_rule(q, k, v, eta.long())
    with pytest.raises(TypeError):
        delta_rule(q, k.numpy(), v, eta)


def test_unit_lower_inverse_and_chunk_scan_match_their_references():
    from nested_learning.ops import delta_rule_chunk as dc

    torch.manual_seed(0)
    L = (0.3 * torch.randn(2, 1, 5, 5, dtype=torch.float64)).requires_grad_()  # upper part must be ignored
    X = dc.unit_lower_inverse(L)
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(X @ (eye + L.detach().tril(-1)), eye.expand_as(X), atol=1e-12, rtol=0)
    torch.testing.assert_close(X, dc.unit_lower_inverse_reference(L), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(dc.unit_lower_inverse, (L,))
    assert torch.autograd.gradgradcheck(dc.unit_lower_inverse, (L,))

    A = (0.5 * torch.randn(3, 2, 3, 3, dtype=torch.float64)).requires_grad_()
    Bc = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    R0 = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(dc.chunk_scan(A, Bc, R0), dc.chunk_scan_reference(A, Bc, R0), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(dc.chunk_scan, (A, Bc, R0))
    assert torch.autograd.gradgradcheck(dc.chunk_scan, (A, Bc, R0))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 17])
def test_unit_lower_inverse_by_squaring_matches_the_solve_with_gradients(n):
    """The products-only inverse (compiled graphs' small chunks): the solve's values, its gradient through the
    products, the upper part ignored; fp32 within a few ulps on a chunk of unit keys with rates in (0, 1)."""
    from nested_learning.ops import delta_rule_chunk as dc

    torch.manual_seed(n)
    L = (0.3 * torch.randn(3, n, n, dtype=torch.float64)).requires_grad_()
    torch.testing.assert_close(dc.unit_lower_inverse_by_squaring(L), dc.unit_lower_inverse_reference(L), atol=1e-13,
                               rtol=0)
    assert torch.autograd.gradcheck(dc.unit_lower_inverse_by_squaring, (L,))
    k = torch.nn.functional.normalize(torch.randn(4, n, 32), dim=-1)
    keys = (k @ k.mT) * torch.rand(4, n, 1)
    exact = dc.unit_lower_inverse_reference(keys.double())
    assert (dc.unit_lower_inverse_by_squaring(keys).double() - exact).abs().max() < 5e-7


def test_compiled_small_chunks_invert_by_products(monkeypatch):
    """Under torch.compile a chunk of at most ``SQUARING_MAX`` tokens inverts by products, a larger one (or any, at
    0) by the solve; eagerly always the solve with its analytic backward."""
    from nested_learning.ops import delta_rule_one_chunk as d1

    used = []
    for name in ("unit_lower_inverse_by_squaring", "unit_lower_inverse_reference", "unit_lower_inverse"):
        fn = getattr(d1, name)
        monkeypatch.setattr(d1, name, lambda L, fn=fn, name=name: used.append((name, L.shape[-1])) or fn(L))

    def run(n, compiling):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        k = torch.nn.functional.normalize(torch.randn(2, n, 4, dtype=torch.float64), dim=-1)
        d1.delta_rule_one_chunk(k, torch.randn(2, n, 4, dtype=torch.float64), torch.rand(2, n, dtype=torch.float64),
                                torch.rand(2, n, dtype=torch.float64), torch.zeros(2, 4, 4, dtype=torch.float64))

    monkeypatch.setattr(d1, "SQUARING_MAX", 16)
    run(16, True)
    run(17, True)
    run(16, False)
    monkeypatch.setattr(d1, "SQUARING_MAX", 0)
    run(16, True)
    assert [u[0] for u in used] == ["unit_lower_inverse_by_squaring", "unit_lower_inverse_reference",
                                    "unit_lower_inverse", "unit_lower_inverse_reference"]


@pytest.mark.parametrize("n", [5, 8, 9, 32, 61, 64, 100])
def test_blocked_unit_lower_inverse_matches_the_solve(n):
    from nested_learning.ops import delta_rule_chunk as dc

    torch.manual_seed(n)
    L = 0.3 * torch.randn(3, 40, n, n, dtype=torch.float64)  # upper part must be ignored
    X = dc.unit_lower_inverse_blocked(L)
    torch.testing.assert_close(X, dc.unit_lower_inverse_reference(L), atol=1e-12, rtol=0)
    assert X.shape == L.shape
    assert torch.equal(X.triu(1), torch.zeros_like(X))


@pytest.mark.parametrize("mkl_generic", [True, False])
def test_unit_lower_inverse_takes_the_blocked_form_for_many_large_blocks(monkeypatch, mkl_generic):
    """The blocked form for many large blocks where MKL takes its generic path (e.g. AMD); the solve everywhere on
    CPUs where MKL's own is fast (Intel); the same values and gradients either way."""
    from nested_learning.ops import delta_rule_chunk as dc

    monkeypatch.setattr(dc, "mkl_generic_path", lambda: mkl_generic)
    calls = []
    blocked = dc.unit_lower_inverse_blocked
    monkeypatch.setattr(dc, "unit_lower_inverse_blocked", lambda L: calls.append(L.shape) or blocked(L))
    torch.manual_seed(0)
    small = (0.3 * torch.randn(4, 16, 16, dtype=torch.float64)).requires_grad_()
    large = (0.1 * torch.randn(64, 64, 64, dtype=torch.float64)).requires_grad_()
    for L in (small, large):
        X = dc.unit_lower_inverse(L)
        torch.testing.assert_close(X, dc.unit_lower_inverse_reference(L), atol=1e-12, rtol=0)
        g = torch.randn_like(X)
        (got,) = torch.autograd.grad(X, L, g)
        (want,) = torch.autograd.grad(dc.unit_lower_inverse_reference(L), L, g)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    if mkl_generic:
        assert calls and calls[0] == large.shape and small.shape not in calls  # (later calls: its recursion)
    else:
        assert not calls


def test_chunk_second_order_gradients_match_recurrent():
    args = make_inputs(1, 11, 2, 3, 2, requires_grad=True)
    leaves = [x for x in args if x is not None]

    def grad_norm(mode):
        o, S = delta_rule(*args, chunk_size=4, mode=mode)
        g = torch.autograd.grad(o.pow(2).sum() + S.sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(x.pow(2).sum() for x in g), leaves)

    for a, b in zip(grad_norm("chunk"), grad_norm("recurrent")):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_chunk_keeps_the_thread_count():
    n = torch.get_num_threads()
    delta_rule(*make_inputs(1, 40, 2, 4, 4), chunk_size=8)
    assert torch.get_num_threads() == n


@pytest.mark.parametrize("policy, expect_switch", [("PASSIVE", True), ("passive", True), ("ACTIVE", False), (None, False)])
def test_recurrence_runs_on_one_thread_only_when_threads_sleep(monkeypatch, policy, expect_switch):
    from nested_learning.ops import delta_rule_chunk as dc

    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    calls, set_threads = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n) or set_threads(n))
    n = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # as on a 2-core machine, whatever this one has
    A, Bc, R0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(2, 4, 4)
    torch.testing.assert_close(dc.chunk_scan(A, Bc, R0), dc.chunk_scan_reference(A, Bc, R0))
    assert calls == ([1, 2] if expect_switch else [])
    set_threads(n)


def _fla_naive():
    """fla-core's torch reference of the gated delta rule, loaded from its file (the package itself needs triton)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / "gated_delta_rule" / "naive.py"
    module_spec = importlib.util.spec_from_file_location("_fla_gdr_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("alpha", [True, False])
@pytest.mark.parametrize("init", [True, False])
def test_fla_mapping_matches_fla_reference(alpha, init):
    dr = sys.modules["nested_learning.ops.delta_rule"]  # the package's delta_rule attribute is the function
    naive = _fla_naive()
    args = make_inputs(2, 70, 3, 8, 6, alpha=alpha, init=init, dtype=torch.float32)
    o_ref, S_ref = delta_rule(*args, mode="recurrent")
    o_rec, S_rec = dr._delta_rule_fla(naive.naive_recurrent_gated_delta_rule, *args)
    chunk = lambda **kw: naive.naive_chunk_gated_delta_rule(**kw, chunk_size=16)  # noqa: E731
    o_chk, S_chk = dr._delta_rule_fla(chunk, *args)
    for o, S in ((o_rec, S_rec), (o_chk, S_chk)):
        assert S.shape == S_ref.shape
        torch.testing.assert_close(o.float(), o_ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(S, S_ref, atol=2e-5, rtol=2e-5)


def test_fla_dispatch_only_where_it_applies():
    dr = sys.modules["nested_learning.ops.delta_rule"]
    q = torch.zeros(1, 4, 1, 2)
    alpha = torch.ones(1, 4, 1)
    assert not dr._fla_applies(q, "after", torch.float32, alpha)  # CPU tensors: always the native form
    with pytest.raises(ValueError):
        delta_rule(*make_inputs(1, 4, 1, 2, 2), backend="triton")
