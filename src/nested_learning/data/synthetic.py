"""Synthetic sequence tasks with small vocabularies: the MAD suite (paper Table 4) and formal languages (Table 5).

Every task is a seeded, deterministic generator of token sequences plus a mask of the *answer positions*: the
tokens a model must predict (teacher-forced, next-token) and is scored on. Everything needed to produce an answer is
in the tokens before it, except for ``memorization``, whose answers come from a fixed key -> value table that is part
of the task (the same for every example and split), as in MAD.

``make_examples(name, n, seed, split)`` returns a :class:`SyntheticSet` with

* ``tokens: (n, T + 1)`` int64, ``answer_mask: (n, T + 1)`` bool (True where the token is an answer);
* ``inputs``/``labels`` views for the model contract: ``inputs = tokens[:, :-1]``, ``labels[:, t] = tokens[:, t+1]``
  where position t+1 is an answer, else -100.

MAD tasks (after Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid Architectures"), in this code's form:

* ``in_context_recall``: key-value pairs (disjoint key and value vocabularies), then queries ``k v``: predict v.
* ``noisy_recall``: the same, with noise tokens (a third vocabulary) scattered between the context pairs.
* ``fuzzy_recall``: keys and values are spans of 1-3 tokens; keys are prefix-free, so a query key is recognised
  as soon as it is complete and every token of its value span is an answer.
* ``selective_copying``: content tokens scattered among blanks; after a marker, copy the content tokens in order.
* ``compression``: random tokens, a marker, then queries ``<position i> x_i``: any position may be asked, so the
  whole sequence must be kept (compressed) in the state.
* ``memorization``: ``k v`` pairs of one fixed random table; the values are learned in the weights, not the context.

Formal languages (recognition: after the string and a ``=`` token, predict the answer token; strings of random
length are left-padded with a pad token):

* ``parity``: bits; answer: parity of the ones.  * ``mod_counting``: digits 0..4; answer: their sum mod 5.
* ``dyck1``: brackets; answer: balanced or not.  * ``anbn``: a/b strings; answer: is it a^n b^n (n >= 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

MAD_TASKS = ("in_context_recall", "noisy_recall", "fuzzy_recall", "selective_copying", "compression", "memorization")
FORMAL_TASKS = ("parity", "mod_counting", "dyck1", "anbn")
SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclasses.dataclass
class SyntheticSet:
    name: str
    tokens: torch.Tensor  # (N, T + 1) int64
    answer_mask: torch.Tensor  # (N, T + 1) bool
    vocab_size: int

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def labels(self) -> torch.Tensor:
        return torch.where(self.answer_mask[:, 1:], self.tokens[:, 1:], torch.full_like(self.tokens[:, 1:], -100))

    def __len__(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Vocabulary layout of a task; ``generate(rng, spec) -> (tokens, answer_mask)`` as 1-d numpy arrays."""

    name: str
    family: str
    vocab_size: int
    generate: Callable
    params: tuple = ()

    def param(self, key: str):
        return dict(self.params)[key]


# ----------------------------------------------------------------------------------------------------- MAD tasks
# Shared layout of the recall tasks: keys [0, K), values [K, K + V), noise/markers after that.
N_KEYS, N_VALUES, N_NOISE = 16, 16, 8
RECALL_PAD = N_KEYS + N_VALUES + N_NOISE


def _recall(rng: np.random.Generator, spec: TaskSpec):
    n_pairs, n_queries, n_noise = spec.param("pairs"), spec.param("queries"), spec.param("noise")
    keys = rng.choice(N_KEYS, n_pairs, replace=False)
    values = N_KEYS + rng.integers(0, N_VALUES, n_pairs)
    # noise tokens go only between pairs, so a key is always directly followed by its value
    noise_before = np.bincount(rng.integers(0, n_pairs, n_noise), minlength=n_pairs)
    toks, mask = [], []
    for k, v, n_before in zip(keys, values, noise_before):
        toks += (N_KEYS + N_VALUES + rng.integers(0, N_NOISE, n_before)).tolist()
        mask += [False] * int(n_before)
        toks += [k, v]
        mask += [False, False]
    for i in rng.integers(0, n_pairs, n_queries):
        toks += [keys[i], values[i]]
        mask += [False, True]
    return _fit(toks, mask, spec.param("length"), pad=RECALL_PAD)


def _prefix_free_spans(rng: np.random.Generator, n: int, offset: int, size: int, max_len: int) -> list[tuple]:
    """``n`` distinct token spans of length 1..max_len where no span is a prefix of another."""
    spans: list[tuple] = []
    while len(spans) < n:
        cand = tuple(int(t) for t in offset + rng.integers(0, size, rng.integers(1, max_len + 1)))
        if all(cand[: len(s)] != s and s[: len(cand)] != cand for s in spans):
            spans.append(cand)
    return spans


def _fuzzy_recall(rng: np.random.Generator, spec: TaskSpec):
    n_pairs, n_queries = spec.param("pairs"), spec.param("queries")
    keys = _prefix_free_spans(rng, n_pairs, 0, N_KEYS, 3)
    values = [tuple(int(t) for t in N_KEYS + rng.integers(0, N_VALUES, rng.integers(1, 4))) for _ in keys]
    toks, mask = [], []
    for k, v in zip(keys, values):
        toks += [*k, *v]
        mask += [False] * (len(k) + len(v))
    for i in rng.integers(0, n_pairs, n_queries):
        toks += [*keys[i], *values[i]]
        mask += [False] * len(keys[i]) + [True] * len(values[i])
    return _fit(toks, mask, spec.param("length"), pad=RECALL_PAD)


def _selective_copying(rng: np.random.Generator, spec: TaskSpec):
    # blank 0, marker 1, content 2..V-1
    length, n_copy = spec.param("context"), spec.param("copies")
    content = 2 + rng.integers(0, spec.vocab_size - 2, n_copy)
    where = np.sort(rng.choice(length, n_copy, replace=False))
    ctx = np.zeros(length, dtype=np.int64)
    ctx[where] = content
    toks = [*ctx.tolist(), 1, *content.tolist()]
    mask = [False] * (length + 1) + [True] * n_copy
    return np.array(toks), np.array(mask)


def _compression(rng: np.random.Generator, spec: TaskSpec):
    # content [0, C), marker C, position tokens C+1 .. C+n
    n, n_queries, n_content = spec.param("symbols"), spec.param("queries"), spec.param("content")
    seq = rng.integers(0, n_content, n)
    toks, mask = [*seq.tolist(), n_content], [False] * (n + 1)
    for i in rng.integers(0, n, n_queries):
        toks += [n_content + 1 + int(i), int(seq[i])]
        mask += [False, True]
    return np.array(toks), np.array(mask)


def memorization_table(n_keys: int = 64, n_values: int = 16, seed: int = 1234) -> np.ndarray:
    """The fixed key -> value table of ``memorization``: ``table[k]`` is the value token of key k."""
    return n_keys + np.random.default_rng(seed).integers(0, n_values, n_keys)


def _memorization(rng: np.random.Generator, spec: TaskSpec):
    table = memorization_table(spec.param("keys"), spec.param("values"))
    keys = rng.integers(0, spec.param("keys"), spec.param("pairs"))
    toks = np.stack([keys, table[keys]], axis=1).reshape(-1)
    mask = np.tile([False, True], len(keys))
    return toks, mask


def _fit(toks: list, mask: list, length: int, pad: int):
    """Left-pad to ``length`` tokens so that a batch has one shape (never crop: that could cut an answer's cue)."""
    if len(toks) > length:
        raise ValueError(f"example of {len(toks)} tokens does not fit the task length {length}")
    k = length - len(toks)
    return np.array([pad] * k + [int(t) for t in toks]), np.array([False] * k + list(mask))


# ----------------------------------------------------------------------------------------------- formal languages
# Layout: pad 0, "=" 1, answers "no"/"yes" 2/3 (counting tasks: 2 + value, up to 6), symbols from 7.
PAD, EQ, NO, YES, SYM = 0, 1, 2, 3, 7


def _formal(string: list[int], answer: int, max_len: int):
    toks = [SYM + s for s in string] + [EQ, answer]
    mask = [False] * (len(string) + 1) + [True]
    return _fit(toks, mask, max_len + 2, pad=PAD)


def _parity(rng: np.random.Generator, spec: TaskSpec):
    bits = rng.integers(0, 2, rng.integers(spec.param("min_len"), spec.param("max_len") + 1)).tolist()
    return _formal(bits, NO + sum(bits) % 2, spec.param("max_len"))


def _mod_counting(rng: np.random.Generator, spec: TaskSpec):
    digits = rng.integers(0, 5, rng.integers(spec.param("min_len"), spec.param("max_len") + 1)).tolist()
    return _formal(digits, NO + sum(digits) % 5, spec.param("max_len"))


def _dyck1(rng: np.random.Generator, spec: TaskSpec):
    """Balanced with probability 1/2; negatives are a balanced string with one bracket flipped (hard negatives)."""
    n = int(rng.integers(spec.param("min_len") // 2, spec.param("max_len") // 2 + 1))
    s, depth, opens = [], 0, n
    while opens or depth:
        # open while allowed, with a bias that keeps the depth moderate; close otherwise
        if opens and (depth == 0 or rng.random() < 0.5):
            s.append(0)
            opens, depth = opens - 1, depth + 1
        else:
            s.append(1)
            depth -= 1
    balanced = rng.random() < 0.5
    if not balanced:
        i = int(rng.integers(0, len(s)))
        s[i] = 1 - s[i]
    return _formal(s, YES if is_balanced(s) else NO, spec.param("max_len"))


def is_balanced(s: list[int]) -> bool:
    """0 opens, 1 closes."""
    depth = 0
    for c in s:
        depth += 1 if c == 0 else -1
        if depth < 0:
            return False
    return depth == 0


def _anbn(rng: np.random.Generator, spec: TaskSpec):
    """Positives a^n b^n; negatives a^n b^m (m != n) or an a^n b^n with two symbols swapped, 1/4 each."""
    n = int(rng.integers(1, spec.param("max_len") // 2 + 1))
    r = rng.random()
    if r < 0.5:
        s = [0] * n + [1] * n
    elif r < 0.75:
        m = int(rng.choice([k for k in range(1, spec.param("max_len") - n + 1) if k != n] or [n + 1]))
        s = [0] * n + [1] * m
    else:
        s = [0] * n + [1] * n
        i, j = rng.integers(0, len(s), 2)
        s[i], s[j] = s[j], s[i]
    if len(s) > spec.param("max_len"):
        s = s[: spec.param("max_len")]
    return _formal(s, YES if is_anbn(s) else NO, spec.param("max_len"))


def is_anbn(s: list[int]) -> bool:
    n = len(s) // 2
    return len(s) >= 2 and len(s) % 2 == 0 and s == [0] * n + [1] * n


# ------------------------------------------------------------------------------------------------------- registry
def _recall_spec(name, gen, noise=0, pairs=8, queries=8, length=32):
    vocab = N_KEYS + N_VALUES + N_NOISE + 1
    return TaskSpec(name, "mad", vocab, gen,
                    (("pairs", pairs), ("queries", queries), ("noise", noise), ("length", length)))


TASKS: dict[str, TaskSpec] = {
    "in_context_recall": _recall_spec("in_context_recall", _recall),
    "noisy_recall": _recall_spec("noisy_recall", _recall, noise=12, length=44),
    "fuzzy_recall": _recall_spec("fuzzy_recall", _fuzzy_recall, pairs=6, queries=6, length=72),
    "selective_copying": TaskSpec("selective_copying", "mad", 18, _selective_copying,
                                  (("context", 32), ("copies", 6))),
    "compression": TaskSpec("compression", "mad", 8 + 1 + 16, _compression,
                            (("symbols", 16), ("queries", 8), ("content", 8))),
    "memorization": TaskSpec("memorization", "mad", 64 + 16, _memorization,
                             (("keys", 64), ("values", 16), ("pairs", 16))),
    "parity": TaskSpec("parity", "formal", SYM + 2, _parity, (("min_len", 4), ("max_len", 24))),
    "mod_counting": TaskSpec("mod_counting", "formal", SYM + 5, _mod_counting, (("min_len", 4), ("max_len", 24))),
    "dyck1": TaskSpec("dyck1", "formal", SYM + 2, _dyck1, (("min_len", 4), ("max_len", 24))),
    "anbn": TaskSpec("anbn", "formal", SYM + 2, _anbn, (("min_len", 2), ("max_len", 24))),
}


def task_names(family: str | None = None) -> list[str]:
    """Names of the tasks of ``family`` ("mad" or "formal"), or of all tasks."""
    return [n for n, s in TASKS.items() if family is None or s.family == family]


def make_examples(name: str, n: int, seed: int = 0, split: str = "train") -> SyntheticSet:
    """``n`` examples of task ``name``; a pure function of (name, n, seed, split), splits drawn from separate streams."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; choose from {list(TASKS)}")
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
    spec = TASKS[name]
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split], sum(map(ord, name))])
    pairs = [spec.generate(rng, spec) for _ in range(n)]
    lengths = {len(t) for t, _ in pairs}
    if len(lengths) != 1:
        raise AssertionError(f"{name}: generator produced ragged lengths {sorted(lengths)}")
    tokens = torch.from_numpy(np.stack([t for t, _ in pairs]).astype(np.int64))
    mask = torch.from_numpy(np.stack([m for _, m in pairs]).astype(bool))
    return SyntheticSet(name, tokens, mask, spec.vocab_size)
