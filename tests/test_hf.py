"""transformers integration: every registered model as an AutoModelForCausalLM, save/load with identical logits,
generate() through transformers with the stream state as its cache, the export command, the tokenizer."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import nested_learning.hf as nh  # noqa: E402
from nested_learning.models import build_model, model_names  # noqa: E402

VOCAB = 64
SMALL = {
    "hope": dict(dim=32, n_layers=1, n_heads=2, chunk_sizes=[4, 8]),
    "hope_attention": dict(dim=32, n_layers=1, n_heads=2, chunk_sizes=[4, 8]),
    "transformer": dict(dim=32, n_layers=1, n_heads=2),
    "titans": dict(dim=32, n_layers=1, n_heads=2, chunk_size=8),
    "deltanet": dict(dim=32, n_layers=1, n_heads=2, chunk_size=8),
}


def _ids(B=2, T=29, seed=0):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf(name, **extra):
    config = nh.NestedLearningConfig(model=name, size="tiny", overrides={**SMALL[name], "vocab_size": VOCAB}, **extra)
    return nh.NestedLearningForCausalLM(config).eval()


def test_every_trainable_model_of_the_registry_is_covered():
    assert set(model_names()) == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
@torch.no_grad()
def test_save_and_auto_load_round_trip_with_identical_logits_and_greedy_tokens(name, tmp_path):
    model = _hf(name)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is nh.NestedLearningForCausalLM
    assert loaded.model.head.weight is loaded.model.embed.weight  # tied, saved once
    x = _ids(T=19)
    assert torch.equal(model(x).logits, loaded(x).logits)
    # the wrapped model's own forward is the reference
    assert torch.equal(loaded(x).logits, loaded.model(x).logits)
    ours = loaded.model.generate(x[:, :5], max_new_tokens=8, temperature=0)
    theirs = loaded.generate(x[:, :5], max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", sorted(SMALL))
@torch.no_grad()
def test_generate_in_bf16_continues_from_each_steps_state(name):
    """bf16 weights (``from_pretrained(..., torch_dtype=torch.bfloat16)`` on a GPU): every step feeds the state the
    previous one returned, and greedy tokens equal the wrapped model's own ``generate``."""
    model = _hf(name).to(torch.bfloat16)
    x = _ids(B=1, T=9)
    theirs = model.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(theirs, model.model.generate(x, max_new_tokens=6, temperature=0))


@torch.no_grad()
def test_generate_carries_the_stream_state_as_its_cache():
    model = _hf("hope")
    x = _ids(B=1, T=9)
    out = model.generate(x, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    assert isinstance(cache, nh.StreamCache) and cache.seen == 9 + 6 - 1  # the last token is not fed back
    # the state continues the stream: feeding the last token gives the logits of one call over everything
    step = model(out.sequences[:, -1:], cache=cache)
    full = model(out.sequences).logits[:, -1]
    torch.testing.assert_close(step.logits[:, -1], full, rtol=0, atol=1e-5)
    assert step.cache.seen == out.sequences.shape[1]
    # sampling runs through the same path
    sampled = model.generate(x, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (1, 13)


def test_labels_are_shifted_inside_like_every_causal_lm():
    model = _hf("transformer")
    x = _ids()
    loss = model(x, labels=x).loss
    torch.testing.assert_close(loss, model.model(x[:, :-1], labels=x[:, 1:]).loss)
    # right padding: masked positions are neither read (causal) nor scored
    mask = torch.ones_like(x)
    mask[1, 20:] = 0
    padded = x.clone()
    padded[1, 20:] = 0
    out = model(padded, attention_mask=mask, labels=padded)
    torch.testing.assert_close(out.logits[1, :20], model(x).logits[1, :20])


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        nh.NestedLearningConfig(model="gpt-5")
    with pytest.raises(TypeError, match="overrides must be a dict"):
        nh.NestedLearningConfig(model="hope", overrides=[1])
    model = _hf("transformer")
    x = _ids()
    left = torch.ones_like(x)
    left[0, :3] = 0
    with pytest.raises(ValueError, match="right padding"):
        model(x, attention_mask=left)
    with pytest.raises(ValueError, match="padding is not supported"):
        model.generate(x, attention_mask=left, max_new_tokens=2)
    with pytest.raises(TypeError, match="StreamCache"):
        model(x, cache=transformers.DynamicCache())
    with pytest.raises(ValueError, match="only supports"):
        model.generate(x, num_beams=2, max_new_tokens=2)


def test_a_directory_loads_with_trust_remote_code_through_its_stubs(tmp_path):
    model = _hf("deltanet")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "nested_learning" and config["model"] == "deltanet"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert "from nested_learning.hf import" in (tmp_path / "modeling_nested_learning.py").read_text()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).logits, model(x).logits)


def test_a_hopeified_pretrained_model_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    config = nh.NestedLearningConfig(model="hopeified", size=str(tmp_path / "llama"),
                                     overrides=dict(chunk_sizes=[4, 8], inner_lr=0.3))
    model = nh.NestedLearningForCausalLM(config).eval()
    with torch.no_grad():  # the levels have learned something in context: the saved weights must be its own
        for p in model.model.cms_layers()[0].parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_the_tokenizer_reads_gpt2_ids_offline(tmp_path):
    from nested_learning.data import get_tokenizer
    from nested_learning.hf.tokenizer import gpt2_tokenizer

    gpt2_tokenizer().save_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Nested learning, at 3 frequencies.<|endoftext|> Again"
    assert tok(text)["input_ids"] == get_tokenizer().encode(text)
    assert tok.eos_token_id == 50256 and tok.decode(get_tokenizer().encode(text)) == text


def test_export_turns_a_trainer_checkpoint_into_a_transformers_directory(tmp_path, capsys):
    from test_training import _tokens

    from nested_learning.cli import main
    from nested_learning.training import TrainConfig, Trainer

    config = TrainConfig(model="hope", size="tiny", model_overrides={**SMALL["hope"], "vocab_size": VOCAB},
                         seq_len=16, batch_size=2, max_steps=2, warmup_steps=0, eval_every=0, eval_batches=1,
                         eval_batch_size=2, out_dir=str(tmp_path / "run"), tensorboard=False, progress=False)
    trainer = Trainer(config, train_tokens=_tokens(), val_tokens=_tokens(2000, 1))
    trainer.train()
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert "exported" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = _ids()
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, trainer.model(x).logits)
    assert not (tmp_path / "hf" / "tokenizer.json").exists()  # a 64-token vocabulary is not GPT-2's
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def test_import_error_names_the_pip_command(monkeypatch):
    import builtins

    from nested_learning.hf import _deps

    real = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(ImportError, match=r"pip install .*nested-learning-pytorch\[hf\]"):
        _deps.require_transformers()


def test_build_model_is_what_the_wrapper_holds():
    model = _hf("titans")
    ref = build_model("titans", "tiny", **SMALL["titans"], vocab_size=VOCAB)
    assert type(model.model) is type(ref)
    assert model.config.vocab_size == VOCAB
