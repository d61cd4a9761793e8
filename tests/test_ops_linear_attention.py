"""Linear attention with decay (Eq 5, 14-18): chunked form against the token recurrence."""

import pytest
import torch

from nested_learning.ops import linear_attention


def make_inputs(B, T, H, Dk, Dv, alpha=True, init=True, dtype=torch.float64):
    q = torch.randn(B, T, H, Dk, dtype=dtype)
    k = torch.randn(B, T, H, Dk, dtype=dtype) / Dk**0.5
    v = torch.randn(B, T, H, Dv, dtype=dtype)
    a = 0.5 + 0.5 * torch.rand(B, T, H, dtype=dtype) if alpha else None
    S = torch.randn(B, H, Dv, Dk, dtype=dtype) if init else None
    return [q, k, v, a, S]


CONFIGS = [  # (T, H, Dk, Dv, alpha, initial state)
    (1, 1, 4, 3, True, True),
    (63, 2, 8, 5, False, True),
    (100, 3, 6, 10, True, False),
    (257, 4, 8, 6, True, True),
]


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T,H,Dk,Dv,alpha,init", CONFIGS)
def test_chunk_matches_recurrent_fp64(T, H, Dk, Dv, alpha, init, chunk_size, read):
    args = make_inputs(2, T, H, Dk, Dv, alpha, init)
    o_ref, S_ref = linear_attention(*args, mode="recurrent", read=read)
    o, S = linear_attention(*args, chunk_size=chunk_size, read=read)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=1e-10)


def test_recurrent_is_eq5():
    q, k, v, a, S = make_inputs(1, 5, 1, 3, 2)
    o, S_T = linear_attention(q, k, v, a, S, mode="recurrent")
    M = S[0, 0].clone()
    for t in range(5):
        M = a[0, t, 0] * M + torch.outer(v[0, t, 0], k[0, t, 0])
        torch.testing.assert_close(o[0, t, 0], M @ q[0, t, 0])
    torch.testing.assert_close(S_T[0, 0], M)


@pytest.mark.parametrize("read", ["after", "before"])
def test_fp32_and_gradients(read):
    args = make_inputs(1, 100, 2, 8, 6)
    o_ref, S_ref = linear_attention(*args, mode="recurrent", read=read)
    o32, S32 = linear_attention(*[x.float() for x in args], chunk_size=16, read=read)
    assert (o32.double() - o_ref).abs().max() / o_ref.abs().max() < 1e-5
    assert (S32.double() - S_ref).abs().max() / S_ref.abs().max() < 1e-5

    for x in args:
        x.requires_grad_(True)
    w = torch.randn_like(o_ref), torch.randn_like(S_ref)

    def grads(mode):
        o, S = linear_attention(*args, chunk_size=16, mode=mode, read=read)
        return torch.autograd.grad((o * w[0]).sum() + (S * w[1]).sum(), args)

    for g_chunk, g_ref in zip(grads("chunk"), grads("recurrent")):
        torch.testing.assert_close(g_chunk, g_ref, atol=1e-10, rtol=1e-10)


def test_strong_decay_uses_exact_masked_form():
    # alpha ~ 0.01 makes |log gamma| over a chunk of 64 far beyond the factored range in fp32.
    q, k, v, _, S = make_inputs(1, 130, 2, 8, 4, dtype=torch.float32)
    a = 0.005 + 0.01 * torch.rand(1, 130, 2)
    for x in (q, k, v, a, S):
        x.requires_grad_(True)
    o_ref, S_ref = linear_attention(*(x.double() for x in (q, k, v, a, S)), mode="recurrent")
    o, S_T = linear_attention(q, k, v, a, S)
    assert (o.double() - o_ref).abs().max() / o_ref.abs().max() < 1e-5
    torch.testing.assert_close(S_T.double(), S_ref, atol=1e-6, rtol=1e-5)
    grads = torch.autograd.grad(o.sum() + S_T.sum(), (q, k, v, a, S))
    assert all(torch.isfinite(g).all() for g in grads)


def test_two_calls_equal_one():
    q, k, v, a, S = make_inputs(1, 50, 2, 6, 4)
    o, S_T = linear_attention(q, k, v, a, S, chunk_size=16)
    o1, S_mid = linear_attention(q[:, :21], k[:, :21], v[:, :21], a[:, :21], S, chunk_size=16)
    o2, S_end = linear_attention(q[:, 21:], k[:, 21:], v[:, 21:], a[:, 21:], S_mid, chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S_end, S_T, atol=1e-12, rtol=1e-12)


def test_bad_input_raises():
    q, k, v, a, S = make_inputs(1, 8, 2, 4, 3)
    with pytest.raises(ValueError):
        linear_attention(q, k[:, :, :1], v)
    with pytest.raises(ValueError):
        linear_attention(q, k, v, a[:, :4])
    with pytest.raises(ValueError):
        linear_attention(q, k, v, initial_state=S[:, :1])
    with pytest.raises(ValueError):
        linear_attention(q, k, v, mode="fast")
    with pytest.raises(ValueError):
        linear_attention(q, k, v, chunk_size=-3)
    with pytest.raises(TypeError):
        linear_attention(q.int(), k, v)
