"""The neural memory's chunk-step benchmark runs and times every form at every length."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_neural_memory_step  # noqa: E402


def test_quick_run_times_every_form(capsys):
    rows = bench_neural_memory_step.main(["--quick", "--threads", "1"])
    assert [T for T, _ in rows] == [128]
    assert all(len(t) == 4 and min(t.values()) > 0 for _, t in rows)
    assert "compiled / eager" in capsys.readouterr().out
