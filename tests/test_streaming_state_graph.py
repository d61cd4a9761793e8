"""Inference use does not grow memory: in eval mode the returned state is detached (a stream fed piece by piece
without torch.no_grad() would otherwise keep every earlier piece's autograd graph alive through the state), unless
the caller asks for the graph with ``keep_state_graph``; in training mode the state keeps its graph."""

import pytest
import torch

from nested_learning.models import build_model
from nested_learning.models.state_checks import leaves

SMALL = {
    "hope": dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, chunk_sizes=(4, 8), cms_expansion=2,
                 titans_chunk_size=4),
    "titans": dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, chunk_size=4),
    "deltanet": dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, chunk_size=4),
    "transformer": dict(vocab_size=64, dim=32, n_layers=1),
}


def _graph_leaves(state):
    """Tensors of the state that carry an autograd graph (flatten() detaches, so walk the fields)."""
    return [t for t in leaves(state).values() if isinstance(t, torch.Tensor) and t.requires_grad]


@pytest.mark.parametrize("name", sorted(SMALL))
def test_eval_mode_returns_a_detached_state(name):
    model = build_model(name, "tiny", **SMALL[name]).eval()
    ids = torch.randint(0, 64, (2, 11))
    state = model(ids[:, :5]).state
    assert not _graph_leaves(state), "the state keeps the graph of the piece it came from"
    out = model(ids[:, 5:], state=state)
    assert out.logits.requires_grad  # the logits keep theirs: a caller may still backpropagate a loss on them
    model.train()
    assert _graph_leaves(model(ids[:, :8]).state)
    model.eval()
    model.keep_state_graph = True
    assert _graph_leaves(model(ids[:, :8]).state)
