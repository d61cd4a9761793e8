"""Newton-Schulz orthogonalisation (Eq 42-44, Algorithm 1's NewtonSchulz_T)."""

import pytest
import torch

from nested_learning.ops import newton_schulz
from nested_learning.ops.newton_schulz import QUINTIC


def _with_singular_values(s: torch.Tensor, m: int, n: int, dtype=torch.float64) -> torch.Tensor:
    """An (m, n) matrix with singular values s (len min(m, n)) and random singular vectors."""
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, dtype=dtype))
    V, _ = torch.linalg.qr(torch.randn(n, r, dtype=dtype))
    return U @ torch.diag(s.to(dtype)) @ V.T


@pytest.mark.parametrize("m,n", [(24, 40), (40, 24), (32, 32)])
def test_cubic_converges_to_orthogonal(m, n):
    G = _with_singular_values(torch.linspace(1.0, 2.0, min(m, n)), m, n)
    ortho = newton_schulz(G, steps=25, coefficients="cubic")
    s = torch.linalg.svdvals(ortho)
    assert (s - 1).abs().max() < 1e-3
    # The polar factor keeps the singular vectors: O equals U V^T of G.
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(ortho, U @ Vh, atol=1e-3, rtol=0)


def test_cubic_tuple_equals_named():
    G = torch.randn(8, 12, dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(G, 7, "cubic"), newton_schulz(G, 7, (1.5, -0.5, 0.0)))


def test_quintic_acts_on_singular_values_as_its_polynomial():
    # On a diagonal input the iteration is the scalar map s <- a s + b s^3 + c s^5 on s / ||s||_2.
    s = torch.tensor([1.0, 0.5, 0.1, 0.02], dtype=torch.float64)
    out = newton_schulz(torch.diag(s), steps=5, eps=0.0)
    x = s / s.norm()
    a, b, c = QUINTIC
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    torch.testing.assert_close(torch.diagonal(out), x)


@pytest.mark.parametrize("m,n", [(64, 128), (128, 64), (16, 300)])
def test_quintic_band(m, n):
    # After Frobenius normalisation, 5 steps of the quintic map every s0 in [1e-2, 1] into [0.6818, 1.1344]
    # (the scalar polynomial's range on that interval; it peaks at 1.2024 for s0 near 1.5e-3).
    # Gaussian rectangular matrices have normalised singular values above 3e-2, so the band is [0.68, 1.135].
    G = torch.randn(m, n)
    s0 = torch.linalg.svdvals(G)
    assert (s0 / s0.norm()).min() > 1e-2
    s = torch.linalg.svdvals(newton_schulz(G).double())
    assert s.min() > 0.68 and s.max() < 1.135


def test_tall_equals_transposed_wide():
    G = torch.randn(50, 20)
    torch.testing.assert_close(newton_schulz(G), newton_schulz(G.T).T)


def test_batched_equals_per_matrix():
    G = torch.randn(2, 3, 10, 6)
    out = newton_schulz(G)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], newton_schulz(G[i, j]))


def test_dtype_preserved_and_computed_in_fp32():
    G = torch.randn(16, 32)
    out = newton_schulz(G.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 input is upcast once; the result equals the fp32 run on the same rounded input, rounded once.
    torch.testing.assert_close(out, newton_schulz(G.bfloat16().float()).bfloat16(), atol=0, rtol=0)
    assert newton_schulz(G.double()).dtype == torch.float64


def test_zero_matrix_stays_finite():
    assert torch.equal(newton_schulz(torch.zeros(4, 6)), torch.zeros(4, 6))


def test_bad_input_raises():
    with pytest.raises(ValueError):
        newton_schulz(torch.randn(5))
    with pytest.raises(ValueError):
        newton_schulz(torch.randn(3, 3), steps=-1)
    with pytest.raises(ValueError):
        newton_schulz(torch.randn(3, 3), coefficients="septic")
    with pytest.raises(ValueError):
        newton_schulz(torch.randn(3, 3), coefficients=(1.0, 2.0))
    with pytest.raises(TypeError):
        newton_schulz(torch.ones(3, 3, dtype=torch.int64))
