"""DeltaNetLayer (Eq 65) and LinearAttentionLayer (Eq 14-18) against token loops written from their equations."""

import pytest
import torch
import torch.nn.functional as F

from nested_learning.memory import DeltaNetLayer, LinearAttentionLayer


def _finish(layer, o):
    """The shared output path: per-head RMSNorm, merge heads, output projection. o: (B, T, H, dh)."""
    return layer.to_out(layer.out_norm(o).flatten(2))


def test_deltanet_equals_token_loop():
    torch.manual_seed(0)
    layer = DeltaNetLayer(8, n_heads=2, chunk_size=4).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    q, k, v, _ = layer._qkv(x, layer.initial_state(2, dtype=torch.float64))  # conv + SiLU applied
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    beta = torch.sigmoid(layer.to_beta(x))
    S = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    o = torch.zeros_like(v)
    eye = torch.eye(4, dtype=torch.float64)
    for t in range(9):
        kt, b = k[:, t].unsqueeze(-1), beta[:, t, :, None, None]
        S = S @ (eye - b * kt @ kt.mT) + b * v[:, t].unsqueeze(-1) @ kt.mT  # Eq 65
        o[:, t] = (S @ q[:, t].unsqueeze(-1)).squeeze(-1)  # read after the write
    with torch.no_grad():
        y, state = layer(x)
        torch.testing.assert_close(y, _finish(layer, o), rtol=0, atol=1e-10)
    torch.testing.assert_close(state.memory, S, rtol=0, atol=1e-10)


@pytest.mark.parametrize("feature_map,decay", [("elu", False), ("l2", True)])
def test_linear_attention_equals_token_loop(feature_map, decay):
    torch.manual_seed(0)
    layer = LinearAttentionLayer(8, n_heads=2, chunk_size=4, feature_map=feature_map, decay=decay).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    q, k, v, _ = layer._qkv(x, layer.initial_state(2, dtype=torch.float64))
    phi = (lambda z: F.elu(z) + 1) if feature_map == "elu" else (lambda z: F.normalize(z, dim=-1))
    q, k = phi(q), phi(k)
    alpha = torch.sigmoid(layer.to_decay(x)) if decay else torch.ones(2, 9, 2, dtype=torch.float64)
    S = torch.zeros(2, 2, 4, 4, dtype=torch.float64)
    o = torch.zeros_like(v)
    for t in range(9):
        S = alpha[:, t, :, None, None] * S + v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2)  # Eq 5 / 15
        o[:, t] = (S @ q[:, t].unsqueeze(-1)).squeeze(-1)  # Eq 16
    with torch.no_grad():
        y, state = layer(x)
        torch.testing.assert_close(y, _finish(layer, o), rtol=0, atol=1e-10)
    torch.testing.assert_close(state.memory, S, rtol=0, atol=1e-10)
