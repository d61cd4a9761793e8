"""Each experiment entry point runs end to end with ``--quick`` on a tiny Transformer and writes its JSON."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # trainer logs and default result paths stay inside the test's directory


def test_train_lm_quick(tmp_path):
    from nested_learning.evaluation.language_modeling import main

    out = tmp_path / "lm.json"
    assert main(["--model", "transformer", "--quick", "--out", str(out), "--save_backbone", "bb.pt"]) == 0
    r = json.loads(out.read_text())
    assert r["model"] == "transformer" and r["backbone"]["overrides"]["dim"] == 32
    assert math.isfinite(r["val_ppl"]) and r["val_ppl"] > 1
    s = r["streaming_ppl"]
    assert math.isfinite(s["carried"]) and math.isfinite(s["reset"])
    assert s["updates_on"] is None and s["updates_off"] is None  # Transformer++ has no test-time updates
    assert r["history"] and (tmp_path / "bb.pt").is_file()


def test_continual_learning_script_quick(tmp_path, monkeypatch):
    out = tmp_path / "cl.json"
    argv = ["continual_learning.py", "--model", "transformer", "--benchmark", "banking", "--quick", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "experiments" / "continual_learning.py"), run_name="__main__")
    assert exit_info.value.code == 0
    r = json.loads(out.read_text())
    assert set(r["methods"]) == {"finetune", "ewc", "icl", "memory"}
    classes = [c for task in r["tasks"] for c in task]
    assert len(classes) == len(set(classes)) == 4, "2 tasks of 2 disjoint classes"
    for m in r["methods"].values():
        R = m["matrix"]
        assert len(R) == 2 and R[0][1] is None and all(0 <= v <= 1 for row in R for v in row if v is not None)
        assert m["average_accuracy"] == pytest.approx(sum(R[-1]) / 2)


def test_long_context_quick(tmp_path):
    from nested_learning.evaluation.long_context import main

    out = tmp_path / "lc.json"
    assert main(["--model", "transformer", "--quick", "--out", str(out), "--tasks", "s_niah_1,mq_niah"]) == 0
    r = json.loads(out.read_text())
    assert set(r["exact_match"]) == {"s_niah_1", "mq_niah"}
    for cells in r["exact_match"].values():
        assert set(cells) == {"192", "256"} and all(0 <= v <= 1 for v in cells.values())
    assert r["history"] and r["samples"]


def test_synthetic_quick(tmp_path):
    from nested_learning.evaluation.synthetic_suite import main

    out = tmp_path / "syn.json"
    assert main(["--model", "transformer", "--quick", "--tasks", "parity,selective_copying", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["tasks"]) == {"parity", "selective_copying"}
    assert all(0 <= t["token_accuracy"] <= 1 for t in r["tasks"].values())


def test_niah_beyond_the_context_limit_is_not_applicable():
    from nested_learning.evaluation.harness import build
    from nested_learning.evaluation.long_context import NIAHConfig, evaluate

    model, _ = build("transformer", "tiny", {"dim": 32, "n_layers": 1, "max_seq_len": 200})
    cfg = NIAHConfig(tasks=("s_niah_1",), eval_lengths=(160, 400), n_eval=1, chunk=64, progress=False)
    r = evaluate(model, cfg)
    assert r["exact_match"]["s_niah_1"]["400"] is None  # n/a, not a crash
    assert r["exact_match"]["s_niah_1"]["160"] is not None


@pytest.mark.parametrize("module", ["continual", "language_modeling", "long_context", "synthetic_suite",
                                    "synthetic_compare", "transfer_ablation"])
def test_python_m_runs_the_entry_point(module, monkeypatch):
    # `python -m nested_learning.evaluation.<module>` must reach main(), not import the module and exit silently
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"nested_learning.evaluation.{module}", run_name="__main__")
    assert exit_info.value.code == 0


def test_synthetic_comparison_resumes_and_tabulates(tmp_path):
    from nested_learning.evaluation.synthetic_compare import main

    out = tmp_path / "cmp"
    argv = ["--models", "transformer,deltanet", "--seeds", "0,1", "--tasks", "parity", "--quick", "--out_dir", str(out)]
    assert main(argv) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["deltanet_seed0.json", "deltanet_seed1.json", "transformer_seed0.json", "transformer_seed1.json"]
    table = (out / "SUMMARY.md").read_text()
    assert "| transformer | " in table and "| deltanet | " in table and " ± " in table
    before = (out / "runs" / "transformer_seed0.json").read_text()
    assert main(argv) == 0  # everything reused
    assert (out / "runs" / "transformer_seed0.json").read_text() == before
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["results"]["deltanet"]["parity"]["token_accuracy"]) == 2
    with pytest.raises(SystemExit):
        main(["--models", "gpt5", "--quick", "--out_dir", str(out)])
