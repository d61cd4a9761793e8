"""``NestedLearningForCausalLM``: any model of our registry as a ``transformers`` ``PreTrainedModel``.

The wrapped model keeps its own forward (``out = model(input_ids, state=None, labels=None)``); this class maps it
onto ``transformers``' conventions:

* ``labels`` are the inputs, shifted inside (as for every ``*ForCausalLM``): position t predicts ``labels[:, t+1]``.
* the stream state (KV caches, Titans memories, every CMS level's fast weights) is the generation cache: a
  :class:`StreamCache` returned as ``out.cache`` and taken back by ``forward``, so
  ``generate()`` feeds the prompt once and then one token per step, as ``LanguageModel.generate`` does, and greedy
  decoding gives the same tokens. With test-time updates on, the CMS levels keep learning from the generated tokens.
* ``attention_mask`` may only mark right padding (ones, then zeros): the models are causal, so tokens after a row's
  end never change its logits; left padding would shift a stream, whose memories have no notion of a masked token,
  and is an error.

``save_pretrained`` writes ``model.safetensors`` (tied weights once) and ``config.json``; ``from_pretrained`` builds
the model from the config on the CPU (not on the meta device: the models compute buffers and initial memories in
their constructors) and loads the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from nested_learning.hf._deps import require_transformers
from nested_learning.hf.configuration import NestedLearningConfig

transformers = require_transformers()
from transformers.generation.configuration_utils import GenerationMode  # noqa: E402
from transformers.modeling_outputs import ModelOutput  # noqa: E402


class StreamCache:
    """The model's stream state as a generation cache. ``state``: the wrapped model's state after ``seen`` tokens.

    ``is_linear`` tells ``generate()`` that the cache is not indexed by position (nothing to slice or crop);
    ``get_seq_length()`` is the number of tokens the state has consumed."""

    is_linear = (True,)
    is_compileable = False
    is_croppable = False

    def __init__(self, state: Any, seen: int):
        self.state, self.seen = state, int(seen)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __repr__(self) -> str:
        return f"StreamCache({type(self.state).__name__}, seen={self.seen})"


@dataclasses.dataclass
class NestedLearningCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: StreamCache | None = None


def _tied_keys(module: torch.nn.Module, prefix: str) -> dict[str, str]:
    """``{alias: first name}`` of parameters shared under several names (the tied LM head)."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        key = f"{prefix}{name}"
        if id(p) in first:
            tied[key] = first[id(p)]
        else:
            first[id(p)] = key
    return tied


def check_right_padding(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> None:
    """Right padding (1...1 0...0 per row) is harmless for a causal model; anything else is an error."""
    if attention_mask is None:
        return
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("attention_mask may only mark right padding (ones, then zeros): nested-learning models "
                         "are streams without masked positions; left-padded batches are not supported, give "
                         "prompts of one length or one prompt at a time")


class NestedLearningForCausalLM(transformers.PreTrainedModel, transformers.GenerationMixin):
    """``NestedLearningForCausalLM(NestedLearningConfig(model="hope", size="tiny"))``; ``.model`` is the
    ``nested_learning`` model itself (its ``generate``, ``initial_state``, ``set_test_time_updates`` ...)."""

    config_class = NestedLearningConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _is_stateful = True  # a stream state cannot be rolled back: no assisted decoding
    _supported_generation_modes = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
    _no_split_modules: list[str] = []

    def __init__(self, config: NestedLearningConfig, model: torch.nn.Module | None = None):
        """``model``: an already built (e.g. trained) model of ``config``'s family to wrap; None builds one."""
        super().__init__(config)
        from nested_learning.models import build_model

        self.model = model if model is not None else build_model(config.model, config.size, **config.overrides)
        config.vocab_size = int(self.model.vocab_size)
        self._tied_weights_keys = _tied_keys(self.model, "model.")
        self.post_init()

    # ------------------------------------------------------------ transformers plumbing
    @classmethod
    def get_init_context(cls, *args, **kwargs):
        """Build on the CPU, not the meta device: constructors fill buffers and initial memories. Weight tying is
        left on: a Hope-ified model loads its pretrained model inside its constructor, which must tie its head."""
        contexts = super().get_init_context(*args, **kwargs)  # its arguments change between transformers releases
        return [c for c in contexts if not (isinstance(c, torch.device) and c.type == "meta")
                and getattr(getattr(c, "func", None), "__name__", "") != "no_tie_weights"]

    def _move_missing_keys_from_meta_to_device(self, *args, **kwargs) -> None:
        """Nothing is on the meta device (see ``get_init_context``): buffers the checkpoint does not hold (a Llama's
        rotary frequencies) keep the values their constructor computed instead of being emptied for re-init."""

    def _init_weights(self, module):
        """The wrapped model initialises itself (GPT-2 style, memories' own initial states)."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is the model's own stream state (StreamCache), made by forward

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    # ------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: StreamCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: StreamCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> NestedLearningCausalLMOutput:
        """``input_ids: (B, T)``; ``cache``: a :class:`StreamCache` from the previous call of the same stream."""
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: nested-learning models read token ids")
        if input_ids is None:
            raise ValueError("input_ids is required")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, StreamCache):
            raise TypeError(f"cache must be a StreamCache returned by this model (or None), got "
                            f"{type(cache).__name__}")
        check_right_padding(attention_mask, input_ids)
        targets = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                                 f"{tuple(labels.shape)}")
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            if attention_mask is not None:
                targets = targets.masked_fill(~torch.nn.functional.pad(attention_mask[:, 1:].bool(), (0, 1)), -100)
        out = self.model(input_ids, state=None if cache is None else cache.state, labels=targets)
        new_cache = None
        if use_cache is not False:
            new_cache = StreamCache(out.state, (0 if cache is None else cache.seen) + input_ids.shape[1])
        result = NestedLearningCausalLMOutput(loss=out.loss, logits=out.logits, cache=new_cache)
        return result if return_dict is not False else result.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=None, **kwargs):
        """The tokens the state has not consumed yet (the whole prompt first, then one token per step)."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: nested-learning models read token ids")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("generate() with padding is not supported: nested-learning models are streams "
                             "without masked positions; give prompts of one length or one prompt at a time")
        seen = 0 if cache is None else cache.seen
        if seen >= input_ids.shape[1]:
            raise ValueError(f"the cache has consumed {seen} tokens, input_ids hold only {input_ids.shape[1]}: pass "
                             "the whole sequence (the cache's tokens and the new ones)")
        return {"input_ids": input_ids[:, seen:], "cache": cache, "use_cache": use_cache}
