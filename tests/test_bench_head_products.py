"""The head-products benchmark runs both forms for every model of its quick run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_head_products  # noqa: E402


def test_quick_run_times_both_products(capsys):
    rows = bench_head_products.main(["--quick", "--threads", "1"])
    assert [label for label, _ in rows] == ["Transformer++", "HOPE eager"]
    assert all(set(t) == {"oneDNN", "PyTorch"} and min(t.values()) > 0 for _, t in rows)
    assert "speed-up" in capsys.readouterr().out


def test_quick_run_times_the_head_reordered_once_and_per_product(capsys):
    rows = bench_head_products.main(["--quick", "--threads", "1", "--prepack"])
    assert [label for label, _ in rows] == ["HOPE eager"]
    assert all(set(t) == {"once", "per product"} and min(t.values()) > 0 for _, t in rows)
    assert "reordered" in capsys.readouterr().out
