"""TokenBatcher sampling, resume and rank sharding; eval windows; unigram baseline."""

import math

import numpy as np
import pytest
import torch

from nested_learning.data import TokenBatcher, eval_batches, unigram_perplexity

# Token value == position, so every window tells where it was cut from.
TOKENS = np.arange(5000, dtype=np.uint16)


def take(batcher, n):
    return [batcher.next_batch() for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_windows_are_contiguous_and_shifted():
    x, y = TokenBatcher(TOKENS, batch_size=8, seq_len=16, seed=3).next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    ramp = torch.arange(16)
    assert torch.equal(x - x[:, :1], ramp.expand(8, 16))
    assert torch.equal(y, x + 1)


def test_windows_reach_both_ends():
    tokens = np.arange(12, dtype=np.uint16)
    b = TokenBatcher(tokens, batch_size=64, seq_len=10)
    starts = {int(s) for x, _ in take(b, 4) for s in x[:, 0]}
    assert starts == {0, 1}  # the last target, token 11, is reachable; nothing reads past the end


def test_deterministic_in_seed_and_step():
    assert_same(take(TokenBatcher(TOKENS, 4, 8, seed=5), 5), take(TokenBatcher(TOKENS, 4, 8, seed=5), 5))
    a = TokenBatcher(TOKENS, 4, 8, seed=5).next_batch()[0]
    b = TokenBatcher(TOKENS, 4, 8, seed=6).next_batch()[0]
    assert not torch.equal(a, b)
    steps = take(TokenBatcher(TOKENS, 4, 8, seed=5), 2)
    assert not torch.equal(steps[0][0], steps[1][0])


def test_resume_equals_uninterrupted():
    straight = take(TokenBatcher(TOKENS, 4, 8, seed=2), 10)
    first = TokenBatcher(TOKENS, 4, 8, seed=2)
    head = take(first, 4)
    state = first.state_dict()
    resumed = TokenBatcher(TOKENS, 4, 8, seed=2)
    resumed.load_state_dict(state)
    assert_same(head + take(resumed, 6), straight)


def test_resume_rejects_other_settings():
    state = TokenBatcher(TOKENS, 4, 8, seed=2).state_dict()
    for other in (
        TokenBatcher(TOKENS, 4, 8, seed=3),
        TokenBatcher(TOKENS, 5, 8, seed=2),
        TokenBatcher(TOKENS, 4, 9, seed=2),
    ):
        with pytest.raises(ValueError, match="cannot resume"):
            other.load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_make_the_single_process_batch(world_size):
    single = take(TokenBatcher(TOKENS, batch_size=2 * world_size, seq_len=8, seed=9), 4)
    ranks = [
        take(TokenBatcher(TOKENS, 2, 8, seed=9, rank=r, world_size=world_size), 4) for r in range(world_size)
    ]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(world_size)]), x)
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(world_size)]), y)
    # Ranks read disjoint rows of the global batch.
    assert not torch.equal(ranks[0][0][0], ranks[1][0][0])


def test_resume_on_other_world_size_keeps_the_data():
    straight = take(TokenBatcher(TOKENS, 4, 8, seed=1), 6)
    one = TokenBatcher(TOKENS, 4, 8, seed=1)
    take(one, 3)
    halves = [TokenBatcher(TOKENS, 2, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(one.state_dict())
    for step in range(3, 6):
        parts = [h.next_batch() for h in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), straight[step][0])


def test_invalid_arguments():
    with pytest.raises(ValueError):
        TokenBatcher(TOKENS, 2, 8, rank=2, world_size=2)
    with pytest.raises(ValueError):
        TokenBatcher(np.arange(8), 2, 8)


def test_eval_batches_cover_stream_in_order():
    tokens = np.arange(23)
    batches = list(eval_batches(tokens, batch_size=3, seq_len=5))
    assert [x.shape[0] for x, _ in batches] == [3, 1]  # windows at 0, 5, 10 | 15; 20..22 too short
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(xs, torch.arange(20))
    assert torch.equal(ys, torch.arange(1, 21))
    assert len(list(eval_batches(tokens, 3, 5, max_batches=1))) == 1
    # A stream of k * seq_len + 1 tokens is covered exactly: every token after the first is one target.
    ys = torch.cat([y for _, y in eval_batches(np.arange(21), 2, 5)]).flatten()
    assert torch.equal(ys, torch.arange(1, 21))
    assert list(eval_batches(np.arange(5), 2, 5)) == []


def test_unigram_perplexity_by_hand():
    # counts [2, 1, 0] + 1 over 3 + 3 -> p = [1/2, 1/3, 1/6]; eval [0, 2] -> exp(-(log 1/2 + log 1/6) / 2) = sqrt 12
    ppl = unigram_perplexity(np.array([0, 0, 1]), np.array([0, 2]), vocab_size=3)
    assert ppl == pytest.approx(math.sqrt(12), rel=1e-12)
    # No training data: uniform over the vocabulary.
    no_train = np.array([], dtype=np.int64)
    assert unigram_perplexity(no_train, np.array([1, 4]), vocab_size=7) == pytest.approx(7)
    with pytest.raises(ValueError):
        unigram_perplexity(np.array([0, 3]), np.array([0]), vocab_size=3)
