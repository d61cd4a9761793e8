"""DGD for a weight matrix (Eq 56-57, Eq 113-121): the closed form against the minimiser of Eq 56."""

import pytest
import torch

from nested_learning.ops import dgd_step


def eq56_minimiser(W, x, grad_y, lr):
    """Solve the normal equations of Eq 56 directly: W (x x^T + I / lr) = W_t / lr + u x^T with u = -grad_y."""
    d_in = x.shape[-1]
    lr = torch.as_tensor(lr, dtype=W.dtype)[..., None, None]
    M = x.unsqueeze(-1) * x.unsqueeze(-2) + torch.eye(d_in, dtype=W.dtype) / lr  # symmetric
    rhs = W / lr - grad_y.unsqueeze(-1) * x.unsqueeze(-2)
    return torch.linalg.solve(M, rhs.mT).mT


@pytest.mark.parametrize("norm", [0.05, 1.0, 3.0, 20.0])
@pytest.mark.parametrize("lr", [0.01, 0.5, 4.0])
def test_matches_eq56_minimiser(norm, lr):
    W = torch.randn(3, 5, 7, dtype=torch.float64)
    x = torch.randn(3, 7, dtype=torch.float64)
    x = norm * x / x.norm(dim=-1, keepdim=True)
    g = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(dgd_step(W, x, g, lr), eq56_minimiser(W, x, g, lr), atol=1e-10, rtol=1e-10)


def test_random_norms_and_per_sample_lr():
    W = torch.randn(6, 4, 9, dtype=torch.float64)
    x = torch.randn(6, 9, dtype=torch.float64) * torch.logspace(-2, 1, 6, dtype=torch.float64)[:, None]
    g = torch.randn(6, 4, dtype=torch.float64)
    lr = torch.rand(6, dtype=torch.float64) * 2
    expected = eq56_minimiser(W, x, g, lr)
    torch.testing.assert_close(dgd_step(W, x, g, lr), expected, atol=1e-10, rtol=1e-10)
    for i in range(6):
        torch.testing.assert_close(
            dgd_step(W[i], x[i], g[i], float(lr[i])), expected[i], atol=1e-10, rtol=1e-10
        )


def test_one_matrix_broadcasts_over_rows():
    # W (d_out, d_in) with a batch of rows x (n, d_in): one step from the same W_t per row.
    W = torch.randn(4, 6, dtype=torch.float64)
    x, g = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    out = dgd_step(W, x, g, 0.3)
    assert out.shape == (5, 4, 6)
    for i in range(5):
        torch.testing.assert_close(out[i], eq56_minimiser(W, x[i], g[i], 0.3), atol=1e-12, rtol=1e-12)


def test_unit_norm_is_eq57_with_eta_over_one_plus_eta():
    W = torch.randn(5, 8, dtype=torch.float64)
    x = torch.randn(8, dtype=torch.float64)
    x = x / x.norm()
    g = torch.randn(5, dtype=torch.float64)
    eta = 0.7
    eta_prime = eta / (1 + eta)
    eq57 = W @ (torch.eye(8, dtype=torch.float64) - eta_prime * torch.outer(x, x)) - eta_prime * torch.outer(
        g, x
    )
    torch.testing.assert_close(dgd_step(W, x, g, eta), eq57, atol=1e-12, rtol=1e-12)


def test_plain_gd_would_differ():
    # The first-order step eta' = eta (the sources' unnormalised pseudocode) is not the minimiser for ||x|| != 1.
    W = torch.randn(4, 6, dtype=torch.float64)
    x = 3 * torch.randn(6, dtype=torch.float64)
    g = torch.randn(4, dtype=torch.float64)
    first_order = W @ (torch.eye(6, dtype=torch.float64) - 0.5 * torch.outer(x, x)) - 0.5 * torch.outer(g, x)
    assert (dgd_step(W, x, g, 0.5) - first_order).abs().max() > 1e-2


def test_zero_lr_keeps_weights_and_dtype():
    W = torch.randn(3, 4).bfloat16()
    out = dgd_step(W, torch.randn(4), torch.randn(3), 0.0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, W)


def test_bad_input_raises():
    W, x, g = torch.randn(3, 4), torch.randn(4), torch.randn(3)
    with pytest.raises(ValueError):
        dgd_step(W, torch.randn(5), g, 0.1)
    with pytest.raises(ValueError):
        dgd_step(W, x, torch.randn(4), 0.1)
    with pytest.raises(ValueError):
        dgd_step(torch.randn(4), x, g, 0.1)
    with pytest.raises(ValueError):
        dgd_step(W, x, g, -0.1)
    with pytest.raises(TypeError):
        dgd_step(W.long(), x, g, 0.1)
