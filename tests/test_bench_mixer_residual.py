"""The block-fusion benchmark times both forms of HOPE's block in its quick run and leaves the default switched on."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_mixer_residual  # noqa: E402


def test_quick_run_times_both_forms(capsys):
    rows = bench_mixer_residual.main(["--quick", "--threads", "1"])
    assert [label for label, _ in rows] == ["HOPE eager"]
    assert all(set(t) == {"fused", "op by op"} and min(t.values()) > 0 for _, t in rows)
    assert "fused / op by op" in capsys.readouterr().out
