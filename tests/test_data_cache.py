"""Token cache: location, build-once, equality with direct encoding, atomic writes."""

from pathlib import Path

import numpy as np
import pytest

from nested_learning.data import (
    TokenBatcher,
    corpus,
    get_tokenizer,
    load_lm_documents,
    load_tokens,
    token_cache,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTED_LEARNING_CACHE", str(tmp_path))
    return tmp_path


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("NESTED_LEARNING_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert token_cache.cache_dir() == tmp_path / "xdg" / "nested-learning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert token_cache.cache_dir() == tmp_path / "home" / ".cache" / "nested-learning"
    monkeypatch.setenv("NESTED_LEARNING_CACHE", str(tmp_path / "mine"))
    assert token_cache.cache_dir() == tmp_path / "mine"


def test_tokens_equal_direct_encoding(cache):
    tok = get_tokenizer()
    docs = load_lm_documents("val", max_docs=30)
    tokens = load_tokens("val", max_docs=30)
    expected = [i for d in docs for i in tok.encode(d) + [tok.eot_id]]
    assert tokens.dtype == np.uint16
    assert isinstance(tokens, np.memmap)
    assert tokens.tolist() == expected
    assert int((tokens == tok.eot_id).sum()) == 30 and tokens[-1] == tok.eot_id
    assert tok.decode(tokens[:50].tolist()) == tok.decode(expected[:50])


def test_built_once_then_reused(cache, monkeypatch):
    calls = []
    build = token_cache._build
    monkeypatch.setattr(token_cache, "_build", lambda *a: (calls.append(a), build(*a)))
    first = np.array(load_tokens("test", max_docs=10))
    path = token_cache.cache_path("test", 10)
    mtime = path.stat().st_mtime_ns
    second = load_tokens("test", max_docs=10)
    assert len(calls) == 1
    assert path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first, second)
    assert [p.name for p in cache.iterdir()] == [path.name]


def test_file_name_tracks_settings(cache, monkeypatch):
    base = token_cache.cache_path("train", 10)
    assert token_cache.cache_path("train", 11) != base
    assert token_cache.cache_path("val", 10) != base
    assert token_cache.cache_path("train", None).name.startswith("lm-train-alldocs-")
    monkeypatch.setattr(corpus, "CORPUS_VERSION", corpus.CORPUS_VERSION + 1)
    assert token_cache.cache_path("train", 10) != base


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_build_leaves_nothing(cache, monkeypatch, error):
    tok = get_tokenizer()
    real = tok.encode_batch
    calls = []

    def fail_on_third(texts):
        calls.append(len(texts))
        if len(calls) == 3:
            raise error("interrupted")
        return real(texts)

    monkeypatch.setattr(token_cache, "BATCH_DOCS", 4)
    monkeypatch.setattr(tok, "encode_batch", fail_on_third)
    with pytest.raises(error):
        load_tokens("val", max_docs=20)
    assert len(calls) == 3  # two batches were already written to the temp file when it failed
    assert list(cache.iterdir()) == []

    monkeypatch.setattr(tok, "encode_batch", real)
    tokens = load_tokens("val", max_docs=20)
    expected = token_cache.encode_documents(load_lm_documents("val", max_docs=20))
    np.testing.assert_array_equal(tokens, expected)


def test_bad_split_creates_nothing(cache):
    with pytest.raises(ValueError):
        load_tokens("validation")
    assert list(Path(cache).iterdir()) == []


def test_batcher_on_cached_tokens(cache):
    tokens = load_tokens("val", max_docs=40)
    x, y = TokenBatcher(tokens, batch_size=4, seq_len=32, seed=1).next_batch()
    assert x.shape == y.shape == (4, 32)
    assert int(x.max()) < get_tokenizer().vocab_size
    assert (x[:, 1:] == y[:, :-1]).all()
