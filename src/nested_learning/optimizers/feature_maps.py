"""Element-wise feature maps phi applied to the gradient before it is written into the momentum (Eq 51).

Eq 51 makes the momentum's key a higher-order feature of the gradient, m <- alpha m - eta P phi(grad). The update
has to stay in the parameter's shape, so the maps here act element-wise (a dimension-raising kernel map would
need a read-out back to the parameter's shape). Each map is written in units of the tensor's RMS s, so it is
scale-equivariant (phi(c g) = c phi(g)) and keeps the sign of every coordinate; hence <phi(g), g> > 0 and
phi(g) is still a descent direction.

- ``"identity"``: phi(g) = g.
- ``"poly2"``: phi(g) = s (g^ + g^ |g^|), g^ = g / s: the degree-2 polynomial map extended oddly, which
  amplifies coordinates that are large relative to the rest of the tensor.
- a callable ``g -> phi(g)`` of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FEATURE_MAPS = ("identity", "poly2")


def _poly2(grad: torch.Tensor) -> torch.Tensor:
    scale = grad.pow(2).mean().sqrt()
    if scale == 0:
        return grad.clone()
    return grad + grad * grad.abs() / scale


def resolve_feature_map(feature_map: str | Callable[[torch.Tensor], torch.Tensor]):
    """Map a name (or a callable) to the function phi."""
    if callable(feature_map):
        return feature_map
    if feature_map == "identity":
        return lambda g: g
    if feature_map == "poly2":
        return _poly2
    raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)} or a callable, got {feature_map!r}")
