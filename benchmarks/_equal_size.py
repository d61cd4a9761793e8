"""A Transformer++ with as many parameters as a given model, for speed comparisons at equal size.

Imports are inside the function: ``bench_peers.py`` also runs under the peers' interpreters, which lack this package.
"""

from __future__ import annotations


def equal_size_transformer(n_params: int, dim: int, heads: int, layers: int, vocab: int, T: int):
    """A Transformer++ of the given width and depth whose MLP width gives ``n_params`` parameters (to the nearest
    32 units per layer, the granularity of its SwiGLU width)."""
    import torch

    from nested_learning.models.registry import build_model

    def count(m):
        return sum(p.numel() for p in m.parameters())

    def with_hidden(h):
        return build_model("transformer", "tiny", dim=dim, n_heads=heads, n_layers=layers, vocab_size=vocab,
                           mlp_hidden=h, max_seq_len=max(T, 16))

    with torch.device("meta"):
        at_64, at_128 = count(with_hidden(64)), count(with_hidden(128))  # linear in the MLP width
    exact = 64 + (n_params - at_64) / (at_128 - at_64) * 64
    return with_hidden(max(32, 32 * round(exact / 32)))
