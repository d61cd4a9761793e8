"""Label scoring and the model harness: the pruned, state-sharing prediction equals brute force."""

import pytest
import torch

from nested_learning.evaluation import harness
from nested_learning.evaluation.scoring import LabelScorer

LABELS = {"a": "card arrival", "b": "card", "c": "exchange rate", "d": "lost or stolen card", "e": "top up",
          "f": "pin blocked", "g": "cash withdrawal", "h": "transfer", "i": "refund", "j": "balance",
          "k": "direct debit", "l": "apple pay or google pay"}
TEXTS = ["my card has not arrived yet", "what is the exchange rate today?", "I forgot my pin",
         "can I top up by bank transfer"]


@pytest.fixture(scope="module")
def tiny():
    model, _ = harness.build("transformer", "tiny", {"dim": 32, "n_layers": 1, "n_heads": 2}, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def trained(tiny):
    """A model that learned the labels of TEXTS: confident, so the pruning bound actually cuts candidates."""
    import copy

    from nested_learning.evaluation.train_loop import fit

    model = copy.deepcopy(tiny)
    batch = LabelScorer(model, LABELS).training_batch(list(zip(TEXTS, "acfe")))
    fit(model, lambda step: batch, 20, lr=2e-2, warmup=0, progress=False)
    return model.eval()


@torch.no_grad()
def brute_force(model, scorer, text, cands, context=()):
    best, best_score = None, -float("inf")
    for c in cands:
        p, cont = scorer.example_ids(text, c)
        ids = torch.tensor([list(context) + p + cont])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        start = len(context) + len(p) - 1
        score = sum(float(logp[start + k, t]) for k, t in enumerate(cont))
        if score > best_score:
            best, best_score = c, score
    return best


@pytest.mark.parametrize("which", ["tiny", "trained"])
def test_prediction_equals_brute_force(which, request):
    model = request.getfixturevalue(which)
    scorer = LabelScorer(model, LABELS)
    scorer.check_tiling(None, TEXTS[0], list(LABELS)[:8])
    assert scorer._tiling_ok is True
    scored = []
    inner = scorer._continuation_logprobs
    scorer._continuation_logprobs = lambda *a, **k: (scored.append(len(a[2])), inner(*a, **k))[1]
    cands = list(LABELS)
    preds = [scorer.predict_one(t, cands) for t in TEXTS]
    assert preds == [brute_force(model, scorer, t, cands) for t in TEXTS]
    if which == "trained":
        assert sum(scored) < len(TEXTS) * len(cands), "confident predictions must prune candidates"


def test_prediction_from_a_context_state_equals_brute_force_with_the_context_prepended(trained):
    scorer = LabelScorer(trained, LABELS)
    context = scorer.context_ids([("where is my card", "a"), ("rate for euros", "c"), ("refund please", "i")])
    _, state = harness.prefill(trained, torch.tensor([context]), chunk=7)
    cands = ["a", "b", "c", "d", "i"]
    for t in TEXTS:
        assert scorer.predict_one(t, cands, state) == brute_force(trained, scorer, t, cands, context)


def test_training_batch_scores_only_the_label_tokens(tiny):
    scorer = LabelScorer(tiny, LABELS)
    rows = [("my card has not arrived", "a"), ("top up failed", "e")]
    x, y = scorer.training_batch(rows)
    for b, (text, c) in enumerate(rows):
        p, cont = scorer.example_ids(text, c)
        assert x[b, : len(p) + len(cont)].tolist() == p + cont
        scored = (y[b] != -100).nonzero().flatten().tolist()
        assert scored == list(range(len(p) - 1, len(p) + len(cont) - 1))
        assert y[b, scored].tolist() == cont
    assert scorer.cont["a"][-1] == scorer.tok.encode("\n")[0], "labels end with a newline"


def test_truncation_keeps_prompts_short(tiny):
    scorer = LabelScorer(tiny, LABELS, max_text_tokens=5)
    assert len(scorer.prompt_ids("one two three four five six seven eight nine ten")) <= 5 + 2


def test_prefill_equals_one_call_and_tiling(tiny):
    ids = torch.randint(0, 50257, (1, 23))
    last, state = harness.prefill(tiny, ids, chunk=5)
    torch.testing.assert_close(last, tiny(ids).logits[:, -1].float(), atol=1e-4, rtol=1e-4)
    nxt = torch.randint(0, 50257, (3, 4))
    tiled = tiny(nxt, state=harness.tile_state(state, 3)).logits
    for b in range(3):
        torch.testing.assert_close(tiled[b], tiny(nxt[b : b + 1], state=state).logits[0], atol=1e-4, rtol=1e-4)


def test_context_limit_and_build_drops_unknown_overrides(tiny):
    assert harness.context_limit(tiny) == tiny.max_seq_len
    model, used = harness.build("transformer", "tiny", {"dim": 32, "n_layers": 1, "not_a_field": 3})
    assert used == {"dim": 32, "n_layers": 1} and model.dim == 32


class Switchable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.test_time_updates = True

    def set_test_time_updates(self, enabled):
        self.test_time_updates = enabled


def test_test_time_switch_is_set_and_restored(tiny):
    m = Switchable()
    with harness.test_time_updates(m, False):
        assert m.test_time_updates is False
    assert m.test_time_updates is True
    with harness.test_time_updates(tiny, False):  # no switch: a no-op, not an error
        pass
    assert harness.has_test_time_switch(m) and not harness.has_test_time_switch(tiny)
