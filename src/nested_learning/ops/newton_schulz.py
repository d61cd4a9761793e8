"""Newton-Schulz orthogonalisation: the map O = NewtonSchulz_T(G) of Muon and M3.

Eq 42-44 (Muon as a momentum whose output goes through a non-linearity, Eq 52) and Algorithm 1 (M3) use
``NewtonSchulz_T``: T steps of an odd matrix polynomial that drive every singular value of G towards 1 while
keeping its singular vectors, i.e. an approximation of the polar factor U V^T of G = U S V^T.

One step on X (with X X^T taken on the short side) is

    X <- a X + (b A + c A A) X,   A = X X^T,

which acts on each singular value as s <- a s + b s^3 + c s^5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._validation import check_finite, check_int

# Eq 44 / Algorithm 1: gradient descent on ||O^T O - I||^2 gives O <- O (3I - O^T O) / 2.
CUBIC = (1.5, -0.5, 0.0)
# Muon's quintic: a steep slope at 0 (a = 3.4445) pulls small singular values up fast; it converges to a band
# around 1 rather than to 1 itself.
QUINTIC = (3.4445, -4.7750, 2.0315)

_NAMED = {"cubic": CUBIC, "quintic": QUINTIC}


def _coefficients(coefficients: str | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(coefficients, str):
        if coefficients not in _NAMED:
            raise ValueError(
                f"coefficients must be one of {sorted(_NAMED)} or an (a, b, c) tuple, got {coefficients!r}"
            )
        return _NAMED[coefficients]
    abc = tuple(float(x) for x in coefficients)
    if len(abc) != 3:
        raise ValueError(f"coefficients tuple must have 3 entries (a, b, c), got {len(abc)}")
    return abc  # type: ignore[return-value]


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: str | Sequence[float] = "quintic",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Orthogonalise G with ``steps`` Newton-Schulz iterations (Eq 42-44, Eq 52, Algorithm 1's NewtonSchulz_T).

    Args:
        G: (..., m, n) matrix or batch of matrices.
        steps: number of iterations T (0 returns the normalised input).
        coefficients: ``"quintic"`` (Muon, default), ``"cubic"`` (the sources' O (3I - O^T O) / 2),
            or an explicit ``(a, b, c)``.
        eps: added to the Frobenius norm before normalising, so a zero matrix maps to zero.

    A G with a NaN or inf entry raises ``ValueError`` (its normalised form, and so every iterate, would be NaN).

    Returns:
        (..., m, n) tensor in G's dtype. The iteration runs in fp32 (fp64 inputs stay fp64).

    The input is first divided by its Frobenius norm, which bounds every singular value by 1 (the region where
    the iteration converges). Tall matrices are transposed so that X X^T is min(m, n) squared.
    """
    if not isinstance(G, torch.Tensor) or not G.is_floating_point():
        raise TypeError("newton_schulz expects a floating-point tensor")
    if G.ndim < 2:
        raise ValueError(f"newton_schulz expects a (..., m, n) tensor, got shape {tuple(G.shape)}")
    check_int("steps", steps, minimum=0)
    # a NaN or inf entry would make the normalised input and every iterate NaN: raise instead of returning it
    check_finite("G", G)
    a, b, c = _coefficients(coefficients)

    compute_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    X = G.to(compute_dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A) if c != 0.0 else b * A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)
