"""The fused-against-reference CMS read benchmark runs and times both reads of every case."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_cms_read  # noqa: E402


def test_quick_run_times_both_reads_of_every_case(capsys):
    rows = bench_cms_read.main(["--quick", "--threads", "1"])
    assert rows and all(t["fused"] > 0 and t["reference"] > 0 for _, _, t in rows)
    assert "speed-up" in capsys.readouterr().out
