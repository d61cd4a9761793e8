"""Models and optimizers re-run from their levels: each level's state is updated only by its own associative-memory
rule (:func:`nested_learning.nsam.linearized_step` on its internal objective, the gradient from autograd), and the
result is compared with the original module or optimizer (the tests, fp64 to 1e-10).

- ``sequence``: linear attention (Eq 14-18) and DeltaNet (Eq 65) as a memory level over level-0 projections.
- ``transformer``: Transformer++ as a non-parametric level (the KV cache) over level-0 weights.
- ``optimizers``: SGD with momentum (Eq 10-13), Adam (Eq 101-105), M3 (Algorithm 1) as levels over the weights.
- ``hope``: HOPE and HOPE-attention, the mixer at its own level and every CMS level stepping at 1/C_l (Eq 71).
"""
