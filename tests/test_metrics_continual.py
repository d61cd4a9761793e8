"""Continual-learning metrics, answer accuracy and the EWC penalty against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from nested_learning.evaluation import continual_metrics as cm
from nested_learning.evaluation.ewc import EWC
from nested_learning.evaluation.train_loop import answer_accuracy
from nested_learning.models.base import ModelOutput, lm_loss

nan = float("nan")
R = [[0.9, nan, nan],
     [0.6, 0.8, nan],
     [0.5, 0.7, 0.9]]


def test_metrics_of_a_forgetting_learner():
    assert cm.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    # forgetting: task 0 best 0.9 -> 0.5, task 1 best 0.8 -> 0.7
    assert cm.forgetting(R) == pytest.approx((0.4 + 0.1) / 2)
    # BWT: (0.5 - 0.9) and (0.7 - 0.8)
    assert cm.backward_transfer(R) == pytest.approx((-0.4 - 0.1) / 2)
    assert cm.seen_accuracy_curve(R) == pytest.approx([0.9, 0.7, 0.7])
    assert cm.average_incremental_accuracy(R) == pytest.approx((0.9 + 0.7 + 0.7) / 3)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    # task 0 improves after task 1 (0.5 -> 0.8), then drops to 0.6: forgetting 0.2, yet BWT is positive (+0.1)
    R2 = [[0.5, nan, nan], [0.8, 0.7, nan], [0.6, 0.7, 1.0]]
    assert cm.forgetting(R2) == pytest.approx(((0.8 - 0.6) + (0.7 - 0.7)) / 2)
    assert cm.backward_transfer(R2) == pytest.approx(((0.6 - 0.5) + 0.0) / 2)


def test_no_forgetting_and_single_task():
    perfect = np.tril(np.ones((4, 4))) + np.triu(np.full((4, 4), np.nan), 1)
    assert cm.forgetting(perfect) == 0 and cm.backward_transfer(perfect) == 0 and cm.average_accuracy(perfect) == 1
    assert math.isnan(cm.forgetting([[0.7]])) and math.isnan(cm.backward_transfer([[0.7]]))
    assert cm.summarize([[0.7]])["forgetting"] is None


def test_matrix_json_round_trip_and_bad_input():
    rows = cm.matrix_to_json(R)
    assert rows[0][1] is None and rows[2][0] == 0.5
    np.testing.assert_array_equal(np.isnan(cm.matrix_from_json(rows)), np.isnan(np.array(R)))
    with pytest.raises(ValueError):
        cm.average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError):
        cm.forgetting([[nan, nan], [0.1, 0.2]])


class FixedLogits(torch.nn.Module):
    """Predicts token ``pred[b, t]`` at every position (one-hot logits)."""

    def __init__(self, pred, vocab=5):
        super().__init__()
        self.pred, self.vocab = pred, vocab

    def forward(self, x, state=None, labels=None):
        logits = torch.nn.functional.one_hot(self.pred[: x.shape[0]], self.vocab).float()
        return ModelOutput(logits, lm_loss(logits, labels) if labels is not None else None)


def test_answer_accuracy_by_hand():
    pred = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 0]])
    labels = torch.tensor([[-100, 2, 3],   # both answers right
                           [-100, 2, 4],   # one of two right
                           [-100, -100, 1]])  # wrong
    acc = answer_accuracy(FixedLogits(pred), torch.zeros(3, 3, dtype=torch.long), labels, batch_size=2)
    assert acc["token_accuracy"] == pytest.approx(3 / 5)
    assert acc["exact_match"] == pytest.approx(1 / 3)


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4, 3)
        self.out = torch.nn.Linear(3, 4, bias=False)

    def forward(self, x, state=None, labels=None):
        logits = self.out(self.emb(x))
        return ModelOutput(logits, lm_loss(logits, labels) if labels is not None else None)


def test_ewc_fisher_is_mean_squared_per_example_gradient_and_penalty_by_hand():
    torch.manual_seed(0)
    model = TinyLM()
    batches = [(torch.tensor([[1, 2]]), torch.tensor([[2, 3]])), (torch.tensor([[0, 3]]), torch.tensor([[-100, 1]]))]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        model.zero_grad()
        model(x, labels=y).loss.backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad ** 2 / len(batches)
    ewc = EWC(model, lam=10.0)
    fisher = ewc.fisher_diagonal(batches)
    for n in expected:
        torch.testing.assert_close(fisher[n], expected[n])

    ewc.fisher, ewc.anchor = fisher, {n: p.detach().clone() for n, p in model.named_parameters()}
    assert float(ewc.penalty().detach()) == 0.0
    with torch.no_grad():
        model.out.weight[1, 2] += 0.5
    want = 0.5 * 10.0 * float(fisher["out.weight"][1, 2]) * 0.25
    assert float(ewc.penalty().detach()) == pytest.approx(want, rel=1e-6)
    ewc.penalty().backward()  # differentiable, so it can be added to the loss
    assert model.out.weight.grad[1, 2] == pytest.approx(10.0 * float(fisher["out.weight"][1, 2]) * 0.5, rel=1e-6)
