"""A pre-norm residual language model over any sequence mixer: the shared skeleton of every model.

``x -> embed -> N x [x + mixer(norm(x)); x + mlp(norm(x))] -> norm -> tied LM head``. The mixer follows the layer
contract ``y, state = mixer(x, state)``; the model's state is the list of mixer states plus the stream position, so
streaming equals one shot whenever every mixer's does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn as nn

from nested_learning.memory.state import LayerState
from nested_learning.models.base import (
    LanguageModel,
    ModelOutput,
    check_input_ids,
    check_labels,
    check_state_type,
    lm_loss,
)
from nested_learning.models.layers import RMSNorm
from nested_learning.models.state_checks import check_state, leaves, signature
from nested_learning.ops.fast_linear import head_linear


@dataclasses.dataclass
class LMState(LayerState):
    layers: list  # one LayerState (or None) per block
    position: int = 0


class Block(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, mlp: nn.Module, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1, self.mixer = RMSNorm(dim, norm_eps), mixer
        self.norm2, self.mlp = RMSNorm(dim, norm_eps), mlp

    def forward(self, x: torch.Tensor, state=None):
        y, state = self.mixer(self.norm1(x), state)
        x = x + y
        return x + self.mlp(self.norm2(x)), state


class BlockLM(LanguageModel):
    """Embedding, a stack of :class:`Block`, final norm and a head tied to the embedding."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_layers: int,
        make_mixer: Callable[[int], nn.Module],
        make_mlp: Callable[[int], nn.Module],
        max_seq_len: int | None = None,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
        reinit_mixers: bool = True,
    ):
        super().__init__()
        self.vocab_size, self.dim, self.max_seq_len = vocab_size, dim, max_seq_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, make_mixer(i), make_mlp(i), norm_eps) for i in range(n_layers))
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self._init_weights(init_std, n_layers, reinit_mixers)

    def fsdp_units(self) -> list[nn.Module]:
        """The submodules FSDP may shard one by one (``training/fsdp.py``): the blocks, each called once per
        forward as a module."""
        return list(self.blocks)

    def _init_weights(self, std: float, n_layers: int, reinit_mixers: bool) -> None:
        # GPT-2 style: small normal init, residual output projections scaled down with depth. Memory layers
        # keep their own initialisation (gate biases, zero fast-weight inits) unless asked otherwise.
        nn.init.normal_(self.embed.weight, mean=0.0, std=std)
        for block in self.blocks:
            modules = [block.mlp] + ([block.mixer] if reinit_mixers else [])
            for module in modules:
                for name, p in module.named_parameters():
                    if p.dim() >= 2:
                        last = name.endswith(("out.weight", "down.weight"))
                        nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layers) if last else std)

    def forward(self, input_ids: torch.Tensor, state: LMState | None = None, labels: torch.Tensor | None = None):
        check_input_ids(input_ids, self.vocab_size)
        check_labels(labels, input_ids, self.vocab_size)
        if state is not None:
            self._check_state(state, input_ids)
        position = 0 if state is None else state.position
        if self.max_seq_len is not None and position + input_ids.shape[1] > self.max_seq_len:
            raise ValueError(
                f"stream length {position + input_ids.shape[1]} exceeds the model's limit of {self.max_seq_len} tokens"
            )
        layer_states = [None] * len(self.blocks) if state is None else state.layers
        x = self.embed(input_ids)
        new_states = []
        for block, st in zip(self.blocks, layer_states):
            x, st = block(x, st)
            new_states.append(st)
        h = self.norm(x)
        # the plain tied head's product through oneDNN where it applies (ops/fast_linear.py); a replaced head as it is
        plain = type(self.head) is nn.Linear and self.head.bias is None
        logits = head_linear(h, self.head.weight) if plain else self.head(h)
        loss = lm_loss(logits, labels) if labels is not None else None
        new_state = LMState(new_states, position + input_ids.shape[1])
        # in eval mode the state leaves the graph unless asked (keep_state_graph): a stream fed piece by piece
        # would otherwise keep every piece's graph alive through the state, and memory would grow with the stream
        if not (self.training or self.keep_state_graph):
            new_state = new_state.detach()
        return ModelOutput(logits, loss, new_state)

    def _check_state(self, state, input_ids: torch.Tensor) -> None:
        check_state_type(state, LMState, self)
        if len(state.layers) != len(self.blocks):
            raise ValueError(f"state has {len(state.layers)} layer states, this {type(self).__name__} has "
                             f"{len(self.blocks)} blocks")
        dtype = torch.float64 if self.embed.weight.dtype == torch.float64 else torch.float32
        for i, (block, st) in enumerate(zip(self.blocks, state.layers)):
            if st is None:
                continue
            if hasattr(block.mixer, "initial_state"):
                cache = self.__dict__.setdefault("_mixer_signatures", {})
                key = (i, str(input_ids.device), dtype)
                if key not in cache:
                    with torch.no_grad():
                        cache[key] = signature(block.mixer.initial_state(1, input_ids.device, dtype),
                                               block.mixer.initial_state(2, input_ids.device, dtype))
                check_state(st, cache[key], input_ids.shape[0], f"{type(self).__name__} (layer {i})")
            else:
                for name, x in leaves(st).items():
                    if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] != input_ids.shape[0]:
                        raise ValueError(f"state of layer {i} ({name}) was made for batch size {x.shape[0]}, but "
                                         f"input_ids has batch size {input_ids.shape[0]}")

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n
