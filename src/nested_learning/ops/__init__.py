"""Pure update rules and their fast forms (no nn.Module, no imports from the rest of the package).

- ``delta_rule``: DGD / delta rule on a matrix memory, recurrent and chunked (Eq 56-57, 65, 88, 93).
- ``linear_attention``: Hebbian fast weights with decay, recurrent and chunked (Eq 5, 14-18).
- ``dgd_step``: one exact DGD step for a weight matrix, the minimiser of Eq 56 (Eq 57, Eq 113-121).
- ``newton_schulz``: Newton-Schulz orthogonalisation (Eq 42-44, Eq 52, Algorithm 1).
"""

from .delta_rule import delta_rule
from .dgd import dgd_step
from .linear_attention import linear_attention
from .newton_schulz import newton_schulz

__all__ = ["delta_rule", "dgd_step", "linear_attention", "newton_schulz"]
