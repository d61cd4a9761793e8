"""Classification by a language model: the label whose name is the most likely continuation of the prompt.

A text x is the prompt ``"<x> =>"``; a class c is the continuation ``" <name of c>\\n"``; the prediction over a
candidate set C is ``argmax_{c in C} log p(name_c | context, prompt_x)``, the sum of the label tokens' log-
probabilities (the probability of the whole label string; the closing newline keeps a label that is a prefix of
another from being favoured). The same rule serves fine-tuned models (no context), in-context learning (labelled
examples as context) and test-time memory (the training stream as context), so methods differ only in how the
model and its context were produced.

Exact pruning: log-probabilities are <= 0, so the first label token's log-probability bounds the whole score from
above. Candidates are scored in order of that bound, a batch at a time, and scoring stops once the best complete
score beats every remaining bound: the argmax is exact, but most candidates are never run.
"""

from __future__ import annotations

from typing import Any

import torch

from nested_learning.data.continual import format_example
from nested_learning.evaluation.harness import prefill, tile_state

CANDIDATE_BATCH = 8


class LabelScorer:
    """Predicts labels for texts; ``label_names`` maps raw labels to the names used in prompts."""

    def __init__(self, model: torch.nn.Module, label_names: dict[str, str], max_text_tokens: int = 48):
        from nested_learning.data import get_tokenizer

        self.model, self.tok = model, getattr(model, "tokenizer", None) or get_tokenizer()
        self.max_text_tokens = max_text_tokens
        self.cont = {raw: self.tok.encode(format_example("", name)[1]) for raw, name in label_names.items()}
        self._tiling_ok: bool | None = None

    # --------------------------------------------------------------------------------------------- encoding
    def truncate(self, text: str) -> str:
        """The text cut to ``max_text_tokens`` tokens (DBpedia abstracts run to hundreds)."""
        ids = self.tok.encode(text)
        return text if len(ids) <= self.max_text_tokens else self.tok.decode(ids[: self.max_text_tokens])

    def prompt_ids(self, text: str) -> list[int]:
        return self.tok.encode(format_example(self.truncate(text))[0])

    def example_ids(self, text: str, label: str) -> tuple[list[int], list[int]]:
        """(prompt ids, label continuation ids) of a labelled example."""
        return self.prompt_ids(text), self.cont[label]

    def training_batch(self, rows: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) for fine-tuning: loss on the label tokens only, right-padded with end-of-text."""
        seqs = [self.example_ids(t, c) for t, c in rows]
        T = max(len(p) + len(c) for p, c in seqs)
        x = torch.full((len(seqs), T), self.tok.eot_id, dtype=torch.long)
        y = torch.full((len(seqs), T), -100, dtype=torch.long)
        for b, (p, c) in enumerate(seqs):
            ids = p + c
            x[b, : len(ids)] = torch.tensor(ids)
            # position t predicts token t+1: the label tokens are predicted from positions len(p)-1 .. len(ids)-2
            y[b, len(p) - 1 : len(ids) - 1] = torch.tensor(c)
        return x, y

    def context_ids(self, rows: list[tuple[str, str]]) -> list[int]:
        """Labelled examples as one token stream ``"x1 => name1\\nx2 => name2\\n..."`` (for ICL and streaming)."""
        out: list[int] = []
        for t, c in rows:
            p, cont = self.example_ids(t, c)
            out += p + cont
        return out

    # --------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _continuation_logprobs(self, logp0: torch.Tensor, state: Any, cands: list[str], batched: bool) -> torch.Tensor:
        """log p(label) of each candidate, given the log-probabilities after the prompt ``logp0: (V,)`` and the
        prompt's state."""
        seqs = [self.cont[c] for c in cands]
        scores = torch.tensor([float(logp0[s[0]]) for s in seqs])
        L = max(len(s) for s in seqs)
        if L == 1:
            return scores
        if batched:
            x = torch.tensor([s[:-1] + [s[-1]] * (L - len(s)) for s in seqs])[:, : L - 1]
            logits = self.model(x, state=tile_state(state, len(seqs))).logits.float()
            rows = [logits[b] for b in range(len(seqs))]
        else:
            rows = [self.model(torch.tensor([s[:-1]]), state=state).logits[0].float() if len(s) > 1 else None
                    for s in seqs]
        for b, s in enumerate(seqs):
            if len(s) > 1:
                lp = torch.log_softmax(rows[b][: len(s) - 1], -1)
                scores[b] += lp.gather(-1, torch.tensor(s[1:])[:, None]).sum()
        return scores

    @torch.no_grad()
    def check_tiling(self, state: Any, text: str, cands: list[str]) -> bool:
        """Whether batched scoring from a tiled state equals scoring each candidate alone (once per scorer)."""
        if self._tiling_ok is None:
            first, st = prefill(self.model, torch.tensor([self.prompt_ids(text)]), state)
            logp0 = torch.log_softmax(first[0], -1)
            a = self._continuation_logprobs(logp0, st, cands, batched=True)
            b = self._continuation_logprobs(logp0, st, cands, batched=False)
            self._tiling_ok = bool(torch.allclose(a, b, atol=1e-3, rtol=1e-3))
        return self._tiling_ok

    @torch.no_grad()
    def predict_one(self, text: str, cands: list[str], state: Any = None) -> str:
        """The candidate label of highest log-likelihood after ``state`` (a context) and the prompt of ``text``."""
        self.model.eval()
        batched = self.check_tiling(state, text, cands[:CANDIDATE_BATCH]) if len(cands) > 1 else True
        first, st = prefill(self.model, torch.tensor([self.prompt_ids(text)]), state)
        logp0 = torch.log_softmax(first[0], -1)
        bounds = logp0[torch.tensor([self.cont[c][0] for c in cands])]
        order = torch.argsort(bounds, descending=True).tolist()
        best, best_score = cands[order[0]], -float("inf")
        for lo in range(0, len(order), CANDIDATE_BATCH):
            if float(bounds[order[lo]]) <= best_score:
                break  # no remaining candidate can beat the best complete score
            chunk = [cands[i] for i in order[lo : lo + CANDIDATE_BATCH]]
            scores = self._continuation_logprobs(logp0, st, chunk, batched)
            i = int(scores.argmax())
            if float(scores[i]) > best_score:
                best, best_score = chunk[i], float(scores[i])
        return best

    def accuracy(self, rows: list[tuple[str, str]], cands: list[str], state: Any = None) -> float:
        """Fraction of ``(text, label)`` rows predicted right among ``cands``."""
        if not rows:
            return float("nan")
        return sum(self.predict_one(t, cands, state) == c for t, c in rows) / len(rows)
