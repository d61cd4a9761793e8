"""In-context learning: a one-layer model (embedding -> SelfModifyingTitans -> linear head) learns associative recall.

Each sequence lists n key-value pairs ``k_1 v_1 ... k_n v_n`` (distinct keys, random values) and then asks for every
key again in a new order; the target at a query position is that key's value. The pairs change in every sequence,
so the only way above chance (1 / n_values) is to store them in the fast memories and read them back.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nested_learning.memory import SelfModifyingTitans


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: a second thread only adds synchronisation, which costs 10x on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recall_batch(batch: int, n_pairs: int, n_keys: int, n_values: int, gen: torch.Generator):
    """Token ids (batch, 3 n_pairs): keys are 0..n_keys-1, values n_keys..; targets -100 except at the queries."""
    keys = torch.stack([torch.randperm(n_keys, generator=gen)[:n_pairs] for _ in range(batch)])
    values = torch.randint(n_values, (batch, n_pairs), generator=gen)
    order = torch.stack([torch.randperm(n_pairs, generator=gen) for _ in range(batch)])
    context = torch.stack([keys, values + n_keys], dim=-1).reshape(batch, 2 * n_pairs)
    inputs = torch.cat([context, keys.gather(1, order)], dim=1)
    targets = torch.full_like(inputs, -100)
    targets[:, 2 * n_pairs :] = values.gather(1, order)
    return inputs, targets


class RecallModel(nn.Module):
    def __init__(self, vocab: int, n_values: int, dim: int, **layer_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = SelfModifyingTitans(dim, **layer_kwargs)
        self.head = nn.Linear(dim, n_values)

    def forward(self, ids):
        return self.head(self.layer(self.embed(ids))[0])


def train_and_evaluate(steps, n_pairs, n_keys, n_values, dim=32, lr=1e-2, batch=32, **layer_kwargs) -> float:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = RecallModel(n_keys + n_values, n_values, dim, n_heads=1, **layer_kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        ids, targets = recall_batch(batch, n_pairs, n_keys, n_values, gen)
        loss = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ids, targets = recall_batch(512, n_pairs, n_keys, n_values, torch.Generator().manual_seed(1))
        mask = targets != -100
        return (model(ids).argmax(-1)[mask] == targets[mask]).float().mean().item()


def test_recall_fast():
    """4 pairs, 8 values (chance 12.5%), 120 steps: measured 0.967 accuracy with bounded self-generated values
    (0.983 before them; 0.981, 0.987, 0.948 with other model seeds and 0.928 with the dot objective, also before)."""
    accuracy = train_and_evaluate(120, n_pairs=4, n_keys=8, n_values=8, chunk_size=4)
    assert accuracy > 3 * (1 / 8), accuracy


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_recall_slow(objective):
    """8 pairs, 16 values (chance 6.25%), 800 steps, 8-token chunks: measured 0.997 (l2) and 0.978 (dot; 0.981
    before the self-generated values were bounded)."""
    accuracy = train_and_evaluate(
        800, n_pairs=8, n_keys=16, n_values=16, lr=3e-3, chunk_size=8, objective=objective
    )
    assert accuracy > 0.8, accuracy


@pytest.mark.slow
def test_recall_slow_mlp_memories():
    """The Eq 89 MLP memories, L2 objective: 4 pairs, 8 values (chance 12.5%), 200 steps: measured 0.996."""
    accuracy = train_and_evaluate(200, n_pairs=4, n_keys=8, n_values=8, chunk_size=4, memory="mlp")
    assert accuracy > 0.6, accuracy
