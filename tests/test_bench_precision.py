"""The precision benchmark runs both precisions for every model of its quick run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_precision  # noqa: E402


def test_quick_run_times_both_precisions(capsys):
    rows = bench_precision.main(["--quick", "--threads", "1"])
    assert [label for label, _ in rows] == ["Transformer++", "HOPE eager"]
    assert all(set(t) == {"fp32", "bf16"} and min(t.values()) > 0 for _, t in rows)
    assert "bf16 / fp32" in capsys.readouterr().out
