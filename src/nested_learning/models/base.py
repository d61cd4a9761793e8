"""The model contract shared by every language model: ``out = model(input_ids, state=None, labels=None)``.

``out.logits: (B, T, V)``, ``out.loss`` (mean next-token cross-entropy when ``labels`` is given: ``labels[:, t]`` is
the target of position t, already shifted by the caller, -100 ignored), ``out.state`` (whatever the model needs to
continue the stream: a KV cache for attention, fast weights for memories).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got min {int(input_ids.min())}, max {int(input_ids.max())}"
        )
    if max_len is not None and input_ids.shape[1] > max_len:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the model's limit of {max_len} tokens")


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits: (B, T, V)`` against ``labels: (B, T)`` (-100 ignored), computed in fp32."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


class LanguageModel(nn.Module):
    """Base of all language models: sampling on top of the streaming contract."""

    vocab_size: int

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
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
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
