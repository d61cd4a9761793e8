"""The zero-shot floor and the CMS-only method of class-incremental learning, on a tiny Hope-ified random Llama read
with the GPT-2 tokenizer: the emptied context really is empty, the levels' fast weights are kept, a zero inner
rate gives exactly the zero-shot model, and the pretrained report computes only the methods a saved run lacks."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nested_learning.data import get_tokenizer  # noqa: E402
from nested_learning.data.continual import make_stream  # noqa: E402
from nested_learning.evaluation.continual import CLConfig, levels_only, run_method  # noqa: E402
from nested_learning.evaluation.harness import prefill  # noqa: E402
from nested_learning.evaluation.pretrained_report import _continual_run  # noqa: E402
from nested_learning.models import hopeify  # noqa: E402

CL = CLConfig(benchmark="clinc", n_tasks=2, classes_per_task=2, train_per_class=2, test_per_class=1, epochs=1,
              batch_size=2, fisher_samples=1, max_text_tokens=8, score_updates=False, progress=False)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=get_tokenizer().vocab_size, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=256, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def hope(llama, inner_lr=0.5):
    return hopeify(llama, tokenizer=get_tokenizer(), chunk_sizes=(4, 8), scheme="copies", inner_lr=inner_lr,
                   window=32, grad_clip=None)


@torch.no_grad()
def test_levels_only_keeps_the_learned_levels_and_forgets_the_context(llama):
    m = hope(llama)
    stream = torch.randint(0, 1000, (1, 45), generator=torch.Generator().manual_seed(0))
    query = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(1))
    _, state = prefill(m, stream)
    kept = levels_only(m, state)
    assert kept.pending.shape[1] == 0 and kept.position == state.position
    assert all(mx.k.shape[2] == 0 and mx.position == 0 for mx in kept.mixers)
    for a, b in zip(kept.cms, state.cms):
        assert all(wa is wb for wa, wb in zip(a.weights, b.weights))
    m.set_test_time_updates(False)
    from_levels = m(query, state=kept).logits
    fresh = m.initial_state(1)
    by_hand = dataclasses.replace(fresh, cms=state.cms, position=state.position)
    torch.testing.assert_close(from_levels, m(query, state=by_hand).logits, rtol=0, atol=1e-6)
    # the levels learned something: not the model read without any stream
    assert (from_levels - m(query).logits).abs().max() > 1e-4
    # and the context is gone: not the logits read after the stream itself
    assert (from_levels - m(query, state=state).logits).abs().max() > 1e-4


def test_levels_only_needs_cms_levels():
    with pytest.raises(ValueError, match="cms_only needs a model with CMS levels"):
        levels_only(torch.nn.Linear(2, 2), ("not", "a", "cms", "state"))


def test_cms_only_at_zero_inner_rate_is_the_zero_shot_model(llama):
    stream = make_stream("clinc", CL.n_tasks, CL.classes_per_task, CL.train_per_class, CL.test_per_class, 0)
    zero = run_method(hope(llama, inner_lr=0.0), stream, "zero_shot", CL)
    frozen_levels = run_method(hope(llama, inner_lr=0.0), stream, "cms_only", CL)
    assert frozen_levels["matrix"] == zero["matrix"]
    assert frozen_levels["test_time_updates"] is True and zero["test_time_updates"] is None
    learning = run_method(hope(llama), stream, "cms_only", CL)
    assert learning["test_time_updates"] is True


def test_the_report_computes_only_the_methods_a_saved_run_lacks(llama, tmp_path):
    m = hope(llama)
    first = _continual_run(m, dataclasses.replace(CL, methods=("zero_shot",)), 0, tmp_path, resume=True)
    path = tmp_path / "continual_clinc_seed0.json"
    saved_zero = json.loads(path.read_text())["methods"]["zero_shot"]
    both = _continual_run(m, dataclasses.replace(CL, methods=("zero_shot", "cms_only")), 0, tmp_path, resume=True)
    assert set(both["methods"]) == {"zero_shot", "cms_only"}
    assert both["methods"]["zero_shot"] == saved_zero  # reused, not rerun (its own seconds are kept)
    assert json.loads(path.read_text())["config"]["methods"] == ["zero_shot", "cms_only"]
    assert first["methods"]["zero_shot"]["matrix"] == both["methods"]["zero_shot"]["matrix"]
    # another stream (more tasks) is computed anew, not merged into the old file
    other = _continual_run(m, dataclasses.replace(CL, n_tasks=3, methods=("zero_shot",)), 0, tmp_path, resume=True)
    assert set(other["methods"]) == {"zero_shot"} and other["config"]["n_tasks"] == 3
