"""Needle-in-a-haystack tasks in the style of RULER (Hsieh et al. 2024), paper Table 1.

Six tasks; haystacks are real corpus text (a random window of an LM split's token stream), except S-NIAH-1 whose
haystack is RULER's repeated filler:

=========  ==========================================================  ======================================
task       needles                                                     asked
=========  ==========================================================  ======================================
s_niah_1   "The pass key is 71432. Remember it. 71432 is the pass key."  the pass key (5 digits), filler haystack
s_niah_2   "One of the special magic numbers for river is: 1234567."   the number of the one key (7 digits)
s_niah_3   "One of the special magic uuids for river is: <uuid4>."     the UUID of the one key
mk_niah    4 number needles with different keys                        the number of one key
mq_niah    4 number needles with different keys                        the numbers of 2 keys, ", "-separated
mv_niah    4 number needles with the *same* key                        all 4 numbers in order of appearance
=========  ==========================================================  ======================================

An instance is ``prefix + haystack-with-needles + question``, exactly ``length`` tokens long, ending just before the
answer; the answer is the continuation ``" " + answer`` that greedy decoding must produce (exact match). Needles are
inserted at seeded random depths, moved forward to the next sentence end when one is near. Every instance is a pure
function of ``(task, length, seed, index, split)``.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid

import numpy as np

NIAH_TASKS = ("s_niah_1", "s_niah_2", "s_niah_3", "mk_niah", "mq_niah", "mv_niah")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
N_MULTI = 4  # needles of the multi-needle tasks
KEY_WORDS = (
    "apple river candle forest garden hammer island jacket kettle ladder marble needle orange pepper quartz rabbit "
    "saddle tunnel violin wagon anchor bottle castle dragon engine falcon guitar helmet insect jungle kitten lemon "
    "mirror nickel oyster pillow rocket silver tomato window yellow zebra bridge cotton desert feather glacier "
    "harbor iron lantern meadow planet sponge thunder valley walnut"
).split()
PREFIX = {
    "s_niah_1": "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n",
    "default": "Some special magic {kind} are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about them afterwards.\n",
}
SEARCH_WINDOW = 40  # tokens after a random depth in which a sentence end is looked for


@dataclasses.dataclass
class NIAHInstance:
    task: str
    length: int
    input_ids: list[int]  # exactly ``length`` tokens, ending right before the answer
    answer: str  # e.g. "71432" or "1234567, 7654321"
    answer_ids: list[int]  # tokens of " " + answer
    values: list[str]  # the asked values (RULER's recall metric counts those present in the output)
    needles: list[str]  # the needle sentences, in the order they appear


def _number(rng, digits: int) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _needles(task: str, rng) -> tuple[list[str], list[str], str, str]:
    """(needle sentences, asked values, question with answer lead-in, kind) of one instance."""
    if task == "s_niah_1":
        v = _number(rng, 5)
        return ([f"The pass key is {v}. Remember it. {v} is the pass key."], [v],
                "\nWhat is the pass key? The pass key is", "pass key")
    keys = [str(k) for k in rng.choice(KEY_WORDS, N_MULTI, replace=False)]
    if task == "s_niah_3":
        v = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        return ([f"One of the special magic uuids for {keys[0]} is: {v}."], [v],
                _question("uuid", [keys[0]]), "uuids")
    n = 1 if task == "s_niah_2" else N_MULTI
    values = [_number(rng, 7) for _ in range(n)]
    if task == "mv_niah":
        needles = [f"One of the special magic numbers for {keys[0]} is: {v}." for v in values]
        return needles, values, _question("number", [keys[0]], many=True), "numbers"
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    if task in ("s_niah_2", "mk_niah"):
        i = int(rng.integers(0, n))
        return needles, [values[i]], _question("number", [keys[i]]), "numbers"
    if task == "mq_niah":
        ask = sorted(rng.choice(n, 2, replace=False).tolist())
        return needles, [values[i] for i in ask], _question("number", [keys[i] for i in ask], many=True), "numbers"
    raise ValueError(f"unknown NIAH task {task!r}; choose from {NIAH_TASKS}")


def _question(kind: str, keys: list[str], many: bool = False) -> str:
    who = " and ".join(keys)
    if many:
        return (f"\nWhat are all the special magic {kind}s for {who} mentioned in the provided text? Answer: "
                f"The special magic {kind}s for {who} mentioned in the provided text are")
    return (f"\nWhat is the special magic {kind} for {who} mentioned in the provided text? Answer: "
            f"The special magic {kind} for {who} mentioned in the provided text is")


@functools.lru_cache(maxsize=4)
def _haystack_stream(split: str, max_docs: int | None, tok) -> np.ndarray:
    from nested_learning.data import load_tokens

    return np.asarray(load_tokens(split, max_docs, tok))


@functools.lru_cache(maxsize=4)
def _filler_ids(tok) -> tuple[int, ...]:
    return tuple(tok.encode(FILLER))


def make_instance(task: str, length: int, seed: int = 0, index: int = 0, split: str = "test",
                  max_docs: int | None = None, tokenizer=None) -> NIAHInstance:
    """Instance ``index`` of ``task`` at ``length`` tokens, its haystack from LM split ``split``; ``tokenizer``:
    a pretrained model's (default GPT-2's)."""
    from nested_learning.data import get_tokenizer

    if task not in NIAH_TASKS:
        raise ValueError(f"unknown NIAH task {task!r}; choose from {NIAH_TASKS}")
    tok = tokenizer or get_tokenizer()
    rng = np.random.default_rng([seed, index, length, NIAH_TASKS.index(task)])
    needles, values, question, kind = _needles(task, rng)
    answer = ", ".join(values)
    prefix = tok.encode(PREFIX.get(task, PREFIX["default"]).format(kind=kind))
    needle_ids = [tok.encode(" " + s + " ") for s in needles]
    q_ids = tok.encode(question)
    n_hay = length - len(prefix) - sum(map(len, needle_ids)) - len(q_ids)
    if n_hay < 1:
        raise ValueError(f"length {length} is too short for a {task} instance (needs > {length - n_hay + 1})")
    if task == "s_niah_1":
        filler = _filler_ids(tok)
        hay = [filler[i % len(filler)] for i in range(n_hay)]
    else:
        stream = _haystack_stream(split, max_docs, tok)
        if len(stream) < n_hay:
            raise ValueError(f"the {split} split has {len(stream)} tokens, fewer than a {n_hay}-token haystack")
        start = int(rng.integers(0, len(stream) - n_hay + 1))
        hay = [int(t) for t in stream[start : start + n_hay]]
    ids = list(prefix) + _insert(hay, needle_ids, rng, tok) + q_ids
    assert len(ids) == length, (len(ids), length)
    return NIAHInstance(task, length, ids, answer, tok.encode(" " + answer), values, needles)


def _insert(hay: list[int], needles: list[list[int]], rng, tok) -> list[int]:
    """Insert the needles into ``hay`` in order at sorted random depths, each snapped to a sentence end."""
    depths = np.sort(rng.random(len(needles)))
    cuts = [_sentence_end(hay, int(d * len(hay)), tok) for d in depths]
    cuts = np.maximum.accumulate(cuts).tolist()  # snapping must not reorder the needles
    out, last = [], 0
    for cut, needle in zip(cuts, needles):
        out += hay[last:cut] + needle
        last = cut
    return out + hay[last:]


@functools.lru_cache(maxsize=4)
def _sentence_end_ids(tok) -> frozenset:
    return frozenset(tok.encode(s)[0] for s in (".", "\n", ".\n", "!", "?")) | {tok.eot_id}


def _sentence_end(hay: list[int], pos: int, tok) -> int:
    ends = _sentence_end_ids(tok)
    for j in range(pos, min(pos + SEARCH_WINDOW, len(hay))):
        if hay[j] in ends:
            return j + 1
    return pos


def make_instances(task: str, length: int, n: int, seed: int = 0, split: str = "test",
                   max_docs: int | None = None, tokenizer=None) -> list[NIAHInstance]:
    """``n`` instances of ``task`` at ``length`` tokens (indices 0..n-1)."""
    return [make_instance(task, length, seed, i, split, max_docs, tokenizer) for i in range(n)]
