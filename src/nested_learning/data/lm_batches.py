"""Language-model batches from a flat token stream: random windows for training, in-order windows for evaluation.

Training sampling is a pure function of (seed, step): the global batch of step ``s`` is
``global_batch = batch_size * world_size`` window starts drawn uniformly from ``numpy.random.default_rng([seed, s])``,
and rank ``r`` takes rows ``r*batch_size : (r+1)*batch_size`` of it. Hence

* the run is reproducible and resumable: restoring the step counter replays exactly the same batches;
* ranks read disjoint slices of one global batch, and K ranks with ``batch_size=b`` together see exactly the
  batch that one process with ``batch_size=K*b`` sees, so changing the number of devices at a fixed global batch
  size does not change the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (len(starts), seq_len) int64: x = tokens[s : s+seq_len], y = tokens[s+1 : s+seq_len+1]."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class TokenBatcher:
    """Random training windows of a token stream, deterministic in (seed, step), sharded over ranks.

    Args:
        tokens: (n_tokens,) integer array, e.g. ``load_tokens("train")``; n_tokens >= seq_len + 1.
        batch_size: windows per step on this rank.
        seq_len: tokens per window (targets are the next ``seq_len`` tokens).
        seed: base seed of the sampling.
        rank, world_size: this process's slice of the global batch of ``batch_size * world_size`` windows.

    ``next_batch()`` returns ``(x, y)``, both (batch_size, seq_len) int64, ``y[:, t] == x[:, t+1]`` for t < seq_len-1.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill one window of seq_len + 1 = {seq_len + 1}")
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def global_starts(self, step: int) -> np.ndarray:
        """Window starts of the whole global batch at ``step``, shape (global_batch_size,)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch_size)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) at ``step``, without moving the counter."""
        lo = self.rank * self.batch_size
        return _windows(self.tokens, self.global_starts(step)[lo : lo + self.batch_size], self.seq_len)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the current step, then advance the step counter."""
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The step counter plus the settings that must match for a resume to replay the same batches."""
        return {
            "step": self.step,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["step"]``. The world size may differ if the global batch size is unchanged."""
        mine = self.state_dict()
        for key in ("seed", "global_batch_size", "seq_len"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"cannot resume: saved {key}={state[key]} but this batcher has {mine[key]}")
        self.step = int(state["step"])


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering ``tokens`` in order, for validation perplexity.

    Window i starts at ``i * seq_len``, so every token after the first is a target exactly once, except a final
    remainder shorter than ``seq_len`` which is dropped. Yields (x, y) of shape (b, seq_len) with b = batch_size
    except possibly the last batch; at most ``max_batches`` batches.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    n_windows = max(len(tokens) - 1, 0) // seq_len
    starts = np.arange(n_windows) * seq_len
    for i, lo in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield _windows(tokens, starts[lo : lo + batch_size], seq_len)
