"""M3 (Algorithm 1) and Muon (Eq 52)."""

import pytest
import torch
from torch import nn

from nested_learning.ops import newton_schulz
from nested_learning.optimizers import M3, Muon


@pytest.fixture(autouse=True)
def _one_thread():
    # Tensors here are tiny: a second thread only adds synchronisation, which dominates on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grads(steps, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


def _run(opt, param, grads, after_step=None):
    for t, g in enumerate(grads, start=1):
        param.grad = g.clone()
        opt.step()
        if after_step is not None:
            after_step(t)


def test_slow_momentum_changes_only_every_f_steps():
    f = 3
    param = nn.Parameter(torch.zeros(4, 6, dtype=torch.float64))
    opt = M3([param], lr=1e-3, frequency=f)
    snapshots = []
    _run(opt, param, _grads(10, (4, 6)), lambda t: snapshots.append(
        (opt.state[param]["slow"].clone(), opt.state[param]["slow_ortho"].clone())))
    changed = [t for t in range(2, 11) if not torch.equal(snapshots[t - 1][0], snapshots[t - 2][0])]
    assert changed == [3, 6, 9]
    for t in (1, 2):  # Algorithm 1: O2 = NewtonSchulz(0) = 0 during the first chunk
        assert snapshots[t - 1][1].abs().max() == 0
    for t in (3, 6, 9):  # O2 is the orthogonalised slow memory, refreshed with it
        torch.testing.assert_close(snapshots[t - 1][1], newton_schulz(snapshots[t - 1][0]), rtol=0, atol=1e-12)


def _algorithm1(grads, lr, betas, alpha, eps, f, mode, eps_mode, coefficients):
    """Algorithm 1 written out step by step for one matrix."""
    b1, b2, b3 = betas
    w = torch.zeros_like(grads[0])
    m1, m2, v, o2 = (torch.zeros_like(w) for _ in range(4))
    chunk = []
    for t, g in enumerate(grads, start=1):
        chunk.append(g)
        if mode == "ema":
            m1 = b1 * m1 + g
            v = b2 * v + (1 - b2) * g * g
            v_hat = v / (1 - b2**t)
        else:
            m1 = m1 + b1 * g
            v = v + b2 * g * g
            v_hat = v
        o1 = newton_schulz(m1, coefficients=coefficients)
        denom = v_hat.sqrt() + eps if eps_mode == "outside" else (v_hat + eps).sqrt()
        w = w - lr * (o1 + alpha * o2) / denom
        if t % f == 0:
            m2 = b3 * m2 + sum(chunk) if mode == "ema" else m2 + b3 * sum(chunk)
            o2 = newton_schulz(m2, coefficients=coefficients)
            chunk = []
    return w


@pytest.mark.parametrize(
    "mode, eps_mode, coefficients",
    [("ema", "outside", "quintic"), ("accumulate", "inside", "cubic"), ("accumulate", "outside", "quintic")],
)
def test_m3_follows_algorithm_1(mode, eps_mode, coefficients):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99, 0.8), alpha=0.5, eps=1e-3)
    grads = _grads(11, (5, 3), seed=1)
    param = nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    opt = M3([param], frequency=4, momentum_mode=mode, eps_mode=eps_mode, ns_coefficients=coefficients, **kwargs)
    _run(opt, param, grads)
    expected = _algorithm1(grads, betas=kwargs["betas"], lr=kwargs["lr"], alpha=kwargs["alpha"], eps=kwargs["eps"],
                           f=4, mode=mode, eps_mode=eps_mode, coefficients=coefficients)
    torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-12)


def test_m3_vectors_take_adam_steps():
    grads = _grads(20, (7,), seed=2)
    param = nn.Parameter(torch.ones(7, dtype=torch.float64))
    ref = nn.Parameter(torch.ones(7, dtype=torch.float64))
    _run(M3([param], lr=1e-1, adam_lr=1e-2, betas=(0.9, 0.99, 0.5), eps=1e-6), param, grads)
    _run(torch.optim.Adam([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-6), ref, grads)
    torch.testing.assert_close(param, ref, rtol=0, atol=1e-12)


def test_muon_matches_torch_muon_to_bf16_precision():
    # torch.optim.Muon runs Newton-Schulz in bf16; this one in fp32, so they agree to bf16 precision only.
    grads = [g.float() for g in _grads(10, (16, 24), seed=3)]
    ours = nn.Parameter(torch.randn(16, 24))
    theirs = nn.Parameter(ours.detach().clone())
    start = ours.detach().clone()
    kwargs = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1)
    _run(Muon([ours], **kwargs), ours, grads)
    _run(torch.optim.Muon([theirs], **kwargs), theirs, grads)
    ours_delta, theirs_delta = ours.detach() - start, theirs.detach() - start
    assert (ours_delta - theirs_delta).norm() / theirs_delta.norm() < 0.02


def test_muon_sends_vectors_to_adamw():
    grads = _grads(20, (7,), seed=4)
    param = nn.Parameter(torch.ones(7, dtype=torch.float64))
    ref = nn.Parameter(torch.ones(7, dtype=torch.float64))
    _run(Muon([param], lr=0.5, adamw_lr=1e-2, adamw_betas=(0.9, 0.95), adamw_eps=1e-8, weight_decay=0.1), param, grads)
    _run(torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), ref, grads)
    torch.testing.assert_close(param, ref, rtol=0, atol=1e-12)
