"""The pretrained report end to end on a tiny random Llama read with the GPT-2 tokenizer: every suite runs, every
table and plot it links exists, and the Hope-ified model's frozen condition equals the original."""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nested_learning.data import get_tokenizer  # noqa: E402
from nested_learning.evaluation.continual import CLConfig  # noqa: E402
from nested_learning.evaluation.pretrained_report import PretrainedReportConfig, run  # noqa: E402
from nested_learning.evaluation.pretrained_stream import PretrainedStreamConfig, original_with_window  # noqa: E402
from nested_learning.models import hopeify  # noqa: E402


@pytest.mark.parametrize(
    "methods",
    [("stream_frozen", "memory"),
     pytest.param(("finetune", "ewc", "icl", "stream_frozen", "memory"), marks=pytest.mark.slow)],
)
def test_tiny_pretrained_report_runs_every_suite(tmp_path, methods):
    torch.manual_seed(0)
    tok = get_tokenizer()
    cfg_hf = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=512, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg_hf).eval()
    cfg = PretrainedReportConfig(
        model="tiny", hope={"chunk_sizes": (8, 16), "scheme": "copies", "inner_lr": 0.1}, window=32, seeds=(0,),
        stream=PretrainedStreamConfig(n_docs=1, min_tokens=96, max_tokens=96, piece=32, windows=(16, 32)),
        benchmarks=("clinc",),
        continual=CLConfig(n_tasks=2, classes_per_task=2, train_per_class=1, test_per_class=1, epochs=1,
                           batch_size=2, fisher_samples=1, max_text_tokens=8, score_updates=False,
                           methods=methods),
        niah_tasks=("s_niah_1",), niah_lengths=(64, 96), niah_n=1, niah_seeds=(0,), progress=False,
    )
    hope = hopeify(hf, tokenizer=tok, window=cfg.window, **cfg.hope)
    hope.set_test_time_updates(False)
    models = (hope, original_with_window(hf, tok, cfg.window), tok)
    results = run(cfg, tmp_path, models=models)
    ppl = results["stream"]["perplexity"]
    assert ppl["cms_frozen@32"] == pytest.approx(ppl["original@32"], rel=1e-4)
    assert ppl["cms_on@32"] != pytest.approx(ppl["cms_frozen@32"], rel=1e-6)
    run0 = results["continual"]["clinc_seed0"]["methods"]
    assert set(run0) == set(methods)
    assert run0["memory"]["test_time_updates"] is True and run0["stream_frozen"]["test_time_updates"] is False
    assert {"s_niah_1|64|cms_on", "s_niah_1|96|original_full_window"} <= set(results["niah"]["seed0"])
    report = (tmp_path / "REPORT_pretrained.md").read_text()
    for link in ("plots/pretrained_stream.png", "plots/pretrained_continual.png", "plots/pretrained_niah.png"):
        assert link in report and (tmp_path / link).is_file()
    assert json.loads((tmp_path / "pretrained_report.json").read_text())["config"]["window"] == 32
    # each NIAH length is cached on its own: a rerun with one more length computes only that one
    first = (tmp_path / "runs" / "niah_seed0_len64.json").read_text()
    again = run(dataclasses.replace(cfg, suites=("niah",), niah_lengths=(64, 96, 128)), tmp_path, models=models)
    assert (tmp_path / "runs" / "niah_seed0_len64.json").read_text() == first
    assert "s_niah_1|128|cms_on" in again["niah"]["seed0"]
    # the table keeps every cached cell: a run of one length still shows the others
    one = run(dataclasses.replace(cfg, suites=("niah",), niah_lengths=(64,)), tmp_path, models=models)
    assert {"s_niah_1|96|cms_on", "s_niah_1|128|cms_on"} <= set(one["niah"]["seed0"])
    # so is each stream window
    first = (tmp_path / "runs" / "stream_w16.json").read_text()
    wider = dataclasses.replace(cfg.stream, windows=(16, 32, 48))
    wide = run(dataclasses.replace(cfg, suites=("stream",), stream=wider), tmp_path, models=models)["stream"]
    assert (tmp_path / "runs" / "stream_w16.json").read_text() == first
    assert wide["perplexity"]["cms_frozen@16"] == pytest.approx(ppl["cms_frozen@16"])
    assert wide["perplexity"]["cms_frozen@48"] == pytest.approx(wide["perplexity"]["original@48"], rel=1e-4)
    # and an earlier all-windows file serves the windows it holds
    (tmp_path / "runs" / "stream.json").write_text(json.dumps(wide))
    (tmp_path / "runs" / "stream_w32.json").unlink()
    narrow = dataclasses.replace(cfg.stream, windows=(32,))
    reread = run(dataclasses.replace(cfg, suites=("stream",), stream=narrow), tmp_path, models=models)["stream"]
    assert reread["perplexity"]["cms_on@32"] == wide["perplexity"]["cms_on@32"]
    assert not (tmp_path / "runs" / "stream_w32.json").exists()
    # an earlier all-lengths file (one per seed) still serves the lengths it covers
    legacy = {k: dict(v, recall=0.25) for k, v in again["niah"]["seed0"].items() if k.split("|")[1:2] == ["96"]}
    (tmp_path / "runs" / "niah_seed0.json").write_text(json.dumps(legacy))
    (tmp_path / "runs" / "niah_seed0_len96.json").unlink()
    reused = run(dataclasses.replace(cfg, suites=("niah",)), tmp_path, models=models)["niah"]["seed0"]
    assert reused["s_niah_1|96|cms_on"]["recall"] == 0.25 and not (tmp_path / "runs" / "niah_seed0_len96.json").exists()


@pytest.mark.slow
def test_real_smollm2_hopeified_demo_learns_at_test_time(tmp_path):
    """SmolLM2-135M from its package: greedy answer, and the demo's Hope-ified model saved and reloaded."""
    from nested_learning.cli import _load_run
    from nested_learning.demo_pretrained import PretrainedDemoConfig, run_pretrained_demo
    from nested_learning.models import load_pretrained

    hf, tok = load_pretrained("smollm2-135m")
    ids = torch.tensor([tok.encode("The capital of France is")])
    assert tok.decode(hf.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:].tolist()).startswith(" Paris")
    r = run_pretrained_demo(PretrainedDemoConfig(docs=1, tokens=512, sample_tokens=5), tmp_path)
    assert r["perplexity"]["cms_on"] < r["perplexity"]["original"]
    model, _ = _load_run(r["checkpoint"])
    assert model.tokenizer is not None and model.window == 256


def test_dynamic_evaluation_is_sgd_on_the_mlp_after_each_scored_piece():
    from nested_learning.evaluation.pretrained_stream import dynamic_eval_nll, stream_nll

    torch.manual_seed(0)
    cfg_hf = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg_hf).eval()
    original = original_with_window(hf, None, 16)
    doc = (torch.randint(0, 61, (8,), generator=torch.Generator().manual_seed(3)).tolist() * 13)[:97]
    base, n = stream_nll(original, doc, 16, learn=False)
    frozen, _ = dynamic_eval_nll(original, doc, 16, lr=0.0)
    assert frozen == pytest.approx(base, rel=1e-5) and n == 96
    first_piece, _ = stream_nll(original, doc[:17], 16, learn=False)
    learned, _ = dynamic_eval_nll(original, doc, 16, lr=5.0)
    first_learned, _ = dynamic_eval_nll(original, doc[:17], 16, lr=5.0)
    assert first_learned == pytest.approx(first_piece, rel=1e-5)  # a piece is scored before anything learns from it
    assert learned < base  # a repeated pattern: the SGD steps on the MLPs lower its loss
    assert torch.equal(original.blocks[0].cms.down[0].weight, hf.model.layers[0].mlp.down_proj.weight)  # a copy


@pytest.mark.parametrize("argv", [["--niah_tasks", "s_niah_9"], ["--methods", "finetune,replay"],
                                  ["--niah_lengths", "0"]])
def test_bad_report_options_fail_before_any_model_loads(argv, monkeypatch):
    from nested_learning.evaluation import pretrained_report

    def fail(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pretrained_report, "run", fail)
    with pytest.raises(SystemExit) as e:
        pretrained_report.main(argv)
    assert e.value.code == 2
