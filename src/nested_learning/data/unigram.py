"""Unigram baseline: the perplexity any language model must beat to have learned more than token frequencies."""

from __future__ import annotations

import math

import numpy as np


def unigram_perplexity(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int = 50257) -> float:
    """Perplexity of ``eval_tokens`` under the add-one-smoothed unigram distribution of ``train_tokens``.

    p(v) = (count_train(v) + 1) / (N_train + vocab_size);  ppl = exp(-mean_t log p(eval_t)).

    Args:
        train_tokens: (N_train,) integer ids in [0, vocab_size).
        eval_tokens: (N_eval,) integer ids in [0, vocab_size), N_eval >= 1.
    """
    train = np.asarray(train_tokens, dtype=np.int64)
    evals = np.asarray(eval_tokens, dtype=np.int64)
    if evals.size == 0:
        raise ValueError("eval_tokens is empty")
    for name, t in (("train_tokens", train), ("eval_tokens", evals)):
        if t.size and (t.min() < 0 or t.max() >= vocab_size):
            raise ValueError(f"{name} has ids outside [0, {vocab_size})")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    log_p = np.log(counts + 1.0) - math.log(train.size + vocab_size)
    return float(np.exp(-log_p[evals].mean()))
