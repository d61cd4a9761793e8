"""The report: runs suites per (model, seed), writes REPORT.md with tables and figures, resumes, records failures."""

import json

import pytest

from nested_learning.evaluation.presets import apply_yaml, get_preset
from nested_learning.report import run_report

SMOKE = """
suites: [lm, synthetic]
seeds: {lm: [0], synthetic: [0, 1]}
stream: {n_docs: 1, min_tokens: 40, max_tokens: 48, chunk: 16}
synthetic: {tasks: [parity, compression]}
"""


def test_report_smoke_writes_tables_figures_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "smoke.yaml"
    cfg.write_text(SMOKE)
    report = run_report("quick", tmp_path / "results", models=["transformer"], config_file=cfg, progress=False)
    text = report.read_text()
    assert "## Language modelling" in text and "## Synthetic tasks" in text
    assert "| transformer | 2 |" in text, "synthetic row aggregates the two seeds"
    assert (tmp_path / "results/plots/lm_loss.png").stat().st_size > 1000
    assert (tmp_path / "results/plots/formal.png").is_file() and (tmp_path / "results/plots/mad.png").is_file()
    runs = tmp_path / "results/runs/quick"
    first = {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")}
    assert len(first) == 3 and (runs / "backbones/transformer_seed0.pt").is_file()
    summary = json.loads((tmp_path / "results/report_quick.json").read_text())
    assert summary["failed"] == [] and len(summary["runs"]) == 3

    run_report("quick", tmp_path / "results", models=["transformer"], config_file=cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*.json")} == first, "resume must not re-run finished runs"
    again = json.loads((tmp_path / "results/report_quick.json").read_text())
    # reused runs count the time recorded when they were made
    assert again["seconds"]["lm/transformer"] == summary["seconds"]["lm/transformer"] > 0
    assert again["seconds"]["synthetic/transformer"] == summary["seconds"]["synthetic/transformer"] > 0
    assert again["seconds"]["this call"] < again["seconds"]["all runs (sum)"]


def test_a_failing_run_is_reported_and_the_rest_goes_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("suites: [synthetic]\nseeds: {synthetic: [0]}\nsynthetic: {tasks: [no_such_task]}\n")
    report = run_report("quick", tmp_path / "out", models=["transformer"], config_file=cfg, progress=False)
    text = report.read_text()
    assert "## Failed runs" in text and "no_such_task" in text


def test_preset_overrides_are_checked():
    p = apply_yaml(get_preset("small"), {"pretrain": {"steps": 7}, "seeds": {"lm": [0, 1]}})
    assert p.pretrain.steps == 7 and p.seeds["lm"] == (0, 1) and p.seeds["synthetic"] == (0, 1, 2)
    with pytest.raises(ValueError, match="unknown"):
        apply_yaml(p, {"pretrain": {"stepz": 1}})
    with pytest.raises(ValueError, match="unknown"):
        apply_yaml(p, {"nope": 1})
    with pytest.raises(ValueError, match="unknown report preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="unknown models"):
        run_report("quick", models=["not_a_model"])


@pytest.mark.slow
def test_quick_report_every_suite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = run_report("quick", tmp_path / "results", progress=False)
    text = report.read_text()
    for section in ("Language modelling", "Continual learning", "needle in a haystack", "Synthetic tasks"):
        assert section in text
    for bench in ("clinc", "banking", "dbpedia"):
        assert (tmp_path / f"results/plots/cl_{bench}_matrices.png").is_file()
    assert (tmp_path / "results/plots/niah_length.png").is_file()
    assert json.loads((tmp_path / "results/report_quick.json").read_text())["failed"] == []
