"""MAD and formal-language generators: deterministic, well-formed, and every answer recoverable from its input.

The solvers below are independent re-implementations of each task's rule that read only the tokens before an
answer; they must reproduce every answer token the generator wrote.
"""

import numpy as np
import pytest
import torch

from nested_learning.data import synthetic as S

N = 64


def _answers(ds):
    """(row, position) of every answer token."""
    return [tuple(x) for x in torch.nonzero(ds.answer_mask).tolist()]


@pytest.mark.parametrize("name", list(S.TASKS))
def test_deterministic_and_split_streams_differ(name):
    a, b = S.make_examples(name, N, seed=3), S.make_examples(name, N, seed=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.answer_mask, b.answer_mask)
    assert not torch.equal(a.tokens, S.make_examples(name, N, seed=4).tokens)
    assert not torch.equal(a.tokens, S.make_examples(name, N, seed=3, split="test").tokens)


@pytest.mark.parametrize("name", list(S.TASKS))
def test_shapes_vocab_and_labels(name):
    ds = S.make_examples(name, N, seed=0)
    assert ds.tokens.dtype == torch.int64 and ds.tokens.min() >= 0 and ds.tokens.max() < ds.vocab_size
    assert ds.answer_mask.any(dim=1).all(), "every example has at least one answer"
    assert not ds.answer_mask[:, 0].any(), "the first token cannot be predicted"
    x, y = ds.inputs, ds.labels
    assert x.shape == y.shape == (N, ds.tokens.shape[1] - 1)
    scored = y != -100
    assert torch.equal(scored, ds.answer_mask[:, 1:])
    assert torch.equal(y[scored], ds.tokens[:, 1:][scored])


def _recall_solver(toks, t):
    key = toks[t - 1]
    first = next(s for s in range(t - 1) if toks[s] == key and S.N_KEYS <= toks[s + 1] < S.N_KEYS + S.N_VALUES)
    return toks[first + 1]


@pytest.mark.parametrize("name", ["in_context_recall", "noisy_recall"])
def test_recall_answers_recoverable(name):
    ds = S.make_examples(name, N, seed=1)
    for b, t in _answers(ds):
        toks = ds.tokens[b].tolist()
        assert toks[t - 1] < S.N_KEYS, "an answer follows its key directly"
        assert _recall_solver(toks, t) == toks[t]
    if name == "noisy_recall":
        assert ((ds.tokens >= S.N_KEYS + S.N_VALUES) & (ds.tokens < S.RECALL_PAD)).any(dim=1).all()


def _spans(toks):
    """Parse (key span, value span, start of value) items: maximal runs of key tokens then of value tokens."""
    items, i = [], 0
    toks = [t for t in toks if t != S.RECALL_PAD]
    while i < len(toks):
        k0 = i
        while toks[i] < S.N_KEYS:
            i += 1
        v0 = i
        while i < len(toks) and S.N_KEYS <= toks[i] < S.N_KEYS + S.N_VALUES:
            i += 1
        items.append((tuple(toks[k0:v0]), tuple(toks[v0:i])))
    return items


def test_fuzzy_recall_answers_recoverable_and_keys_prefix_free():
    ds = S.make_examples("fuzzy_recall", N, seed=2)
    spec = S.TASKS["fuzzy_recall"]
    n_pairs = spec.param("pairs")
    for b in range(N):
        items = _spans(ds.tokens[b].tolist())
        table = dict(items[:n_pairs])
        keys = list(table)
        assert len(keys) == n_pairs
        assert all(k1 == k2 or k1[: len(k2)] != k2 for k1 in keys for k2 in keys), "keys must be prefix-free"
        answers = [v for _, v in items[n_pairs:]]
        assert [table[k] for k, _ in items[n_pairs:]] == answers
        flat = ds.tokens[b][ds.answer_mask[b]].tolist()
        assert flat == [t for v in answers for t in v]


def test_selective_copying_answers_recoverable():
    ds = S.make_examples("selective_copying", N, seed=0)
    for b in range(N):
        toks = ds.tokens[b].tolist()
        marker = toks.index(1)
        content = [t for t in toks[:marker] if t != 0]
        assert ds.tokens[b][ds.answer_mask[b]].tolist() == content
        assert ds.answer_mask[b].nonzero().min() == marker + 1


def test_compression_answers_recoverable():
    ds = S.make_examples("compression", N, seed=0)
    C = S.TASKS["compression"].param("content")
    for b, t in _answers(ds):
        toks = ds.tokens[b].tolist()
        seq = toks[: toks.index(C)]
        assert toks[t] == seq[toks[t - 1] - C - 1]


def test_memorization_answers_come_from_the_fixed_table():
    ds = S.make_examples("memorization", N, seed=0)
    table = S.memorization_table()
    for b, t in _answers(ds):
        assert ds.tokens[b, t] == table[ds.tokens[b, t - 1]]
    # the same table in the test split: it is knowledge, not context
    test = S.make_examples("memorization", N, seed=0, split="test")
    for b, t in _answers(test):
        assert test.tokens[b, t] == table[test.tokens[b, t - 1]]


def _formal_string(toks):
    eq = toks.index(S.EQ)
    return [t - S.SYM for t in toks[:eq] if t != S.PAD], toks[eq + 1]


RULES = {
    "parity": lambda s: S.NO + sum(s) % 2,
    "mod_counting": lambda s: S.NO + sum(s) % 5,
    "dyck1": lambda s: S.YES if S.is_balanced(s) else S.NO,
    "anbn": lambda s: S.YES if (len(s) % 2 == 0 and s == [0] * (len(s) // 2) + [1] * (len(s) // 2) and s) else S.NO,
}


@pytest.mark.parametrize("name", list(RULES))
def test_formal_answers_recoverable_and_both_classes_occur(name):
    ds = S.make_examples(name, 200, seed=0)
    answers = []
    for b in range(len(ds)):
        toks = ds.tokens[b].tolist()
        string, answer = _formal_string(toks)
        assert answer == RULES[name](string)
        assert ds.answer_mask[b].nonzero().flatten().tolist() == [len(toks) - 1]
        answers.append(answer)
    counts = np.bincount(answers)
    assert (counts > 0).sum() >= 2, "a recogniser task needs both answers"
    if name in ("dyck1", "anbn"):
        assert 0.3 < np.mean(np.array(answers) == S.YES) < 0.8


def test_balanced_checker_on_hand_cases():
    assert S.is_balanced([0, 1, 0, 0, 1, 1])
    assert not S.is_balanced([1, 0])
    assert not S.is_balanced([0, 0, 1])
    assert S.is_anbn([0, 0, 1, 1]) and not S.is_anbn([0, 1, 1]) and not S.is_anbn([0, 1, 0, 1])


def test_unknown_task_and_split_raise():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        S.make_examples("nope", 2)
    with pytest.raises(ValueError, match="split"):
        S.make_examples("parity", 2, split="val")
