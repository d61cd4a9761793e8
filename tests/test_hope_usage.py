"""HOPE and HOPE-attention in use: state persistence, generation, presets, the trainer, learning real text."""

import numpy as np
import pytest
import torch

from nested_learning.models import HOPE, HOPEAttention, build_model, load_state, save_state

V, CHUNKS = 64, (4, 8, 16)


def tiny(cls, dtype=torch.float64, **kw):
    cfg = dict(
        vocab_size=V, dim=16, n_layers=2, n_heads=2, chunk_sizes=CHUNKS, cms_inner_lr=0.5, titans_chunk_size=4
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return cls(**cfg).to(dtype)


@pytest.mark.parametrize("cls", [HOPE, HOPEAttention])
@torch.no_grad()
def test_saved_and_reloaded_state_continues_identically(cls, tmp_path):
    m = tiny(cls).eval()
    x = torch.randint(0, V, (2, 30))
    first = m(x[:, :18])  # ends inside a segment: the pending tokens are part of the state
    path = save_state(first.state, tmp_path / "stream.safetensors")
    restored = load_state(path, m)  # as a fresh process would: structure from the model, values from the file
    cont = m(x[:, 18:], state=restored)
    torch.testing.assert_close(cont.logits, m(x[:, 18:], state=first.state).logits, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([first.logits, cont.logits], 1), m(x).logits, rtol=0, atol=1e-9)
    assert restored.length == 18 and restored.pending.shape == (2, 2)


def test_loading_into_a_different_model_is_a_clear_error(tmp_path):
    path = save_state(
        tiny(HOPE).eval()(torch.randint(0, V, (1, 5))).state.detach(), tmp_path / "s.safetensors"
    )
    with pytest.raises(ValueError, match="does not fit"):
        load_state(path, tiny(HOPE, n_layers=3))


@torch.no_grad()
def test_generate_continues_from_a_state_with_memory_independent_of_stream_length():
    m = tiny(HOPE).eval()
    prompt = torch.randint(0, V, (1, 6))
    ids, state = m.generate(prompt, 10, temperature=0, return_state=True)
    # greedy decoding with test-time learning equals the argmax of one forward pass over the whole stream
    assert torch.equal(m(ids[:, :-1]).logits[:, 5:].argmax(-1), ids[:, 6:])
    sizes = []
    for _ in range(3):
        ids2, state = m.generate(ids[:, -1:], 16, temperature=0, state=state, return_state=True)
        sizes.append(sum(t.numel() for k, t in state.flatten().items() if k != "pending"))
    assert sizes[0] == sizes[1] == sizes[2]  # HOPE's state does not grow with the stream


def test_presets_build_and_large_ones_have_the_papers_sizes():
    for name in ("hope", "hope_attention"):
        m = build_model(name, "tiny", vocab_size=V)
        assert m.config.dim == 128 and m.config.n_layers == 2 and m.config.n_heads == 4
    counts = {}
    with torch.device("meta"):
        for name in ("hope", "hope_attention"):
            for size in ("760M", "1.3B"):
                counts[name, size] = build_model(name, size).num_parameters()
        readme = HOPE(dim=512, n_layers=12, n_heads=8, chunk_sizes=[16, 64, 256], vocab_size=50257)
    assert 0.72e9 < counts["hope", "760M"] < 0.80e9 and 1.2e9 < counts["hope", "1.3B"] < 1.4e9
    assert (
        0.72e9 < counts["hope_attention", "760M"] < 0.82e9
        and 1.2e9 < counts["hope_attention", "1.3B"] < 1.4e9
    )
    assert readme.config.chunk_sizes == (16, 64, 256) and readme.num_parameters() > 1e8
    with pytest.raises(ValueError, match="unknown hope preset"):
        HOPE.from_preset("huge")


@pytest.mark.parametrize("name", ["hope", "hope_attention"])
def test_trainer_trains_it_by_name(name, tmp_path):
    """By name through the trainer: the held-out loss falls, and every CMS level (each steps inside a 32-token window)
    has its rate and its up/down weights moved by training."""
    import warnings

    from nested_learning.training import TrainConfig, Trainer

    rng = np.random.default_rng(0)
    tokens = np.where(rng.random(8000) < 0.1, rng.integers(0, V, 8000), np.arange(8000) % V).astype(np.uint16)
    config = TrainConfig(
        model=name,
        size="tiny",
        model_overrides=dict(vocab_size=V, dim=16, n_heads=2, chunk_sizes=CHUNKS),
        seq_len=32,
        batch_size=4,
        max_steps=12,
        warmup_steps=1,
        lr=1e-2,
        eval_every=0,
        eval_batches=4,
        eval_batch_size=4,
        out_dir=str(tmp_path),
        tensorboard=False,
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no level is left without a training signal
        trainer = Trainer(config, train_tokens=tokens, val_tokens=tokens[:1000])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    loss_before = trainer.evaluate()
    trainer.train()
    assert trainer.step == 12
    assert trainer.evaluate() < loss_before - 0.3
    after = trainer.model.state_dict()
    for key in after:
        if key.endswith("cms.lr_logit"):
            assert (after[key] != before[key]).all(), key  # every level's rate trained
        if ".cms.up." in key or ".cms.down." in key:
            assert not torch.equal(after[key], before[key]), key


def test_trainer_names_levels_that_never_step(tmp_path):
    from nested_learning.training import TrainConfig, Trainer

    tokens = (np.arange(4000) % V).astype(np.uint16)
    config = TrainConfig(model="hope", size="tiny", model_overrides=dict(vocab_size=V, dim=16, n_heads=2,
                         chunk_sizes=CHUNKS), seq_len=8, batch_size=2, max_steps=1, eval_every=0,
                         out_dir=str(tmp_path), tensorboard=False, progress=False)
    with pytest.warns(UserWarning, match=r"layer 0 CMS level 2 \(chunk 8\), layer 0 CMS level 3 \(chunk 16\)"):
        Trainer(config, train_tokens=tokens, val_tokens=tokens[:400])


def _text_tokens(n_vocab: int) -> torch.Tensor:
    """Real English (the project's corpus) remapped onto its n_vocab - 1 most frequent tokens plus 'other'."""
    from nested_learning.data import load_tokens

    try:
        tok = np.asarray(load_tokens("train", max_docs=200)).astype(np.int64)
    except Exception as e:  # no corpus package installed in this environment
        pytest.skip(f"corpus unavailable: {e}")
    ids, counts = np.unique(tok, return_counts=True)
    remap = np.full(int(tok.max()) + 1, n_vocab - 1)
    remap[ids[np.argsort(-counts)[: n_vocab - 1]]] = np.arange(n_vocab - 1)
    return torch.from_numpy(remap[tok])


def test_hope_loss_falls_on_real_text():
    data = _text_tokens(256)
    torch.manual_seed(0)
    m = HOPE(vocab_size=256, dim=32, n_layers=2, n_heads=2, chunk_sizes=(16, 32, 64))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(10):  # 3 segments of 16 tokens per sequence: every level of the first two learns in context
        start = torch.randint(0, len(data) - 49, (4,), generator=g)
        batch = torch.stack([data[s : s + 49] for s in start])
        loss = m(batch[:, :-1], labels=batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # about ln(256) at the start
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0
