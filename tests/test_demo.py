"""The demo job runs end to end (tiny settings) and writes its report, plot and results."""

import json

from nested_learning.demo import DemoConfig, run_demo


def test_demo_runs_and_writes_report(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTED_LEARNING_CACHE", str(tmp_path / "cache"))
    demo = DemoConfig(models=("transformer", "hope"), steps=2, out_dir=str(tmp_path / "demo"), max_docs=60, pretrained=None,
                      sample_tokens=3, stream_docs=1, stream_tokens=300)
    overrides = {"model_overrides.dim": "32", "model_overrides.n_layers": "1", "seq_len": "32", "batch_size": "2",
                 "eval_batches": "2", "eval_batch_size": "2"}
    out = run_demo(demo, overrides)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| transformer |" in report and "| hope |" in report
    assert "CMS updates on" in report  # HOPE's test-time-learning comparison is in the report
    assert (tmp_path / "demo" / "loss_curve.png").stat().st_size > 1000
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["unigram_val_ppl"] > 1 and set(results["models"]) == {"transformer", "hope"}
    assert out["sample"].startswith(demo.prompt)
