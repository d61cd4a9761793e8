"""The model contract shared by every language model: ``out = model(input_ids, state=None, labels=None)``.

``out.logits: (B, T, V)``, ``out.loss`` (mean next-token cross-entropy when ``labels`` is given: ``labels[:, t]`` is
the target of position t, already shifted by the caller, -100 ignored; any other label outside [0, vocab_size), or
labels that are all -100, raise ``ValueError``), ``out.state`` (whatever the model needs to
continue the stream: a KV cache for attention, fast weights for memories).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from nested_learning.ops._validation import check_float, check_int


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    state: Any = None


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, max_len: int | None = None) -> None:
    """Clear errors for the bad inputs a user is most likely to pass."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"input_ids must be an integer tensor (torch.long), got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must hold at least one sequence of at least one token, got shape {tuple(input_ids.shape)}"
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got min {int(input_ids.min())}, max {int(input_ids.max())}"
        )
    if max_len is not None and input_ids.shape[1] > max_len:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's limit of {max_len} tokens")


def check_labels(labels, input_ids: torch.Tensor, vocab_size: int) -> None:
    """Labels are targets in [0, vocab_size) or -100 (ignored); -5 is not quietly read as a class, and labels that
    ignore every position (whose mean loss would be 0/0 = NaN) are an error."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (torch.long), got {labels.dtype}")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have shape {tuple(input_ids.shape)} (that of input_ids), got {tuple(labels.shape)}")
    valid = labels != -100
    if not bool(valid.any()):
        raise ValueError("labels are all -100 (ignored): there is no target to compute a loss on; pass labels=None")
    targets = labels[valid]
    if int(targets.min()) < 0 or int(targets.max()) >= vocab_size:
        bad = targets[(targets < 0) | (targets >= vocab_size)][0].item()
        raise ValueError(f"labels must lie in [0, {vocab_size}) or be -100 (ignored), got {bad}")


def check_state_type(state, expected: type, model) -> None:
    if state is not None and not isinstance(state, expected):
        raise TypeError(
            f"state must be a {expected.__name__} from a previous call of this {type(model).__name__} (or None), "
            f"got {type(state).__name__}"
        )


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits: (B, T, V)`` against ``labels: (B, T)`` (-100 ignored), computed in fp32."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class LanguageModel(nn.Module):
    """Base of all language models: sampling on top of the streaming contract."""

    vocab_size: int
    # In eval mode the returned state is detached, so a stream fed piece by piece without torch.no_grad() does not
    # keep every earlier piece's graph alive through it; set True to backpropagate through the state in eval mode.
    keep_state_graph: bool = False

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 50,
        temperature: float = 1.0,
        top_k: int | None = 50,
        state: Any = None,
        generator: torch.Generator | None = None,
        return_state: bool = False,
    ):
        """Sample ``max_new_tokens`` tokens after ``input_ids: (B, T)``, continuing from ``state`` if given.

        The prompt is consumed in one call and every new token in one call of length 1, so the model's memory per
        step is its state, not the length of the stream. Returns ``(B, T + max_new_tokens)`` ids (and the final
        state with ``return_state=True``).
        """
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        check_float("temperature", temperature, low=0.0)
        if top_k is not None:
            check_int("top_k", top_k, minimum=1)
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] == 0:
            raise ValueError("input_ids (the prompt) must hold at least one token, got shape "
                             f"{tuple(input_ids.shape)}")
        out = self(input_ids, state=state)
        state, tokens = out.state, [input_ids]
        logits = out.logits[:, -1]
        for i in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_k, generator)
            tokens.append(nxt)
            if i + 1 < max_new_tokens:
                out = self(nxt, state=state)
                state, logits = out.state, out.logits[:, -1]
        ids = torch.cat(tokens, dim=1)
        return (ids, state) if return_state else ids


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
