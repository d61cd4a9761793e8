"""Needle-in-a-haystack instances: exact length, deterministic, real-text haystacks, and the answer recoverable
by reading the input (the needles for the asked keys, in order)."""

import re

import pytest

from nested_learning.data import get_tokenizer
from nested_learning.data.niah import FILLER, NIAH_TASKS, make_instance

NEEDLE = re.compile(r"special magic (?:numbers|uuids) for (\w+) is: ([0-9a-f-]+)\.")
PASSKEY = re.compile(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.")
ASKED = re.compile(r"special magic \w+ for (.+?) mentioned in the provided text\?")


def solve(text: str) -> str:
    """Answer an instance from its text alone."""
    keys = re.findall(PASSKEY, text)
    if keys:
        assert len(keys) == 1 and keys[0][0] == keys[0][1]
        return keys[0][0]
    needles = NEEDLE.findall(text)
    asked = ASKED.findall(text)[-1].split(" and ")
    values = [v for k in asked for kk, v in needles if kk == k]
    return ", ".join(values)


@pytest.mark.parametrize("task", NIAH_TASKS)
@pytest.mark.parametrize("length", [300, 700])
def test_length_and_answer_recoverable(task, length):
    tok = get_tokenizer()
    for index in range(3):
        inst = make_instance(task, length, seed=5, index=index)
        assert len(inst.input_ids) == length
        text = tok.decode(inst.input_ids)
        assert solve(text) == inst.answer
        assert inst.answer_ids == tok.encode(" " + inst.answer)
        assert all(v in text for v in inst.values)


def test_task_structure():
    counts = {"s_niah_2": 1, "s_niah_3": 1, "mk_niah": 4, "mq_niah": 4, "mv_niah": 4}
    for task, n in counts.items():
        inst = make_instance(task, 500, seed=0, index=0)
        assert len(inst.needles) == n
    mq = make_instance("mq_niah", 500, seed=0, index=0)
    assert len(mq.values) == 2 and mq.answer == ", ".join(mq.values)
    mv = make_instance("mv_niah", 500, seed=0, index=0)
    assert len(set(re.findall(r"for (\w+) is", " ".join(mv.needles)))) == 1, "one key, several values"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        make_instance("s_niah_3", 500).answer)
    assert re.fullmatch(r"\d{5}", make_instance("s_niah_1", 500).answer)
    assert re.fullmatch(r"\d{7}", make_instance("s_niah_2", 500).answer)


def test_deterministic_and_instances_differ():
    a = make_instance("mk_niah", 400, seed=1, index=2)
    b = make_instance("mk_niah", 400, seed=1, index=2)
    assert a == b
    assert make_instance("mk_niah", 400, seed=1, index=3).input_ids != a.input_ids
    assert make_instance("mk_niah", 400, seed=2, index=2).input_ids != a.input_ids


def test_haystacks_real_text_or_filler():
    tok = get_tokenizer()
    passkey = tok.decode(make_instance("s_niah_1", 600).input_ids)
    assert passkey.count("The grass is green.") > 5
    real = tok.decode(make_instance("s_niah_2", 600).input_ids)
    assert FILLER.strip() not in real
    assert len(set(real.split())) > 80, "a haystack of real text has a varied vocabulary"


def test_needles_spread_over_depths():
    # over many instances the single needle lands in every quarter of the haystack
    tok = get_tokenizer()
    quarters = set()
    for i in range(24):
        inst = make_instance("s_niah_2", 400, seed=0, index=i)
        text = tok.decode(inst.input_ids)
        quarters.add(min(3, int(4 * text.index("special magic numbers for") / len(text))))
    assert quarters == {0, 1, 2, 3}


def test_too_short_raises():
    with pytest.raises(ValueError, match="too short"):
        make_instance("mv_niah", 60)
    with pytest.raises(ValueError, match="unknown NIAH task"):
        make_instance("niah_9", 500)
