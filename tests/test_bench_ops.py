"""The delta rule benchmark's quick run, with the heads-side-by-side comparison (run as a script: it sets the
OpenMP wait policy before torch loads)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_ops.py"


def _run(*flags):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--lengths", "256", *flags],
        capture_output=True, text=True, env=env, check=True, timeout=300,
    )
    return out.stdout


def test_quick_run_with_the_split_comparison():
    out = _run("--threads", "2", "--split-ab")
    assert "OMP_WAIT_POLICY=PASSIVE" in out
    assert "allocator keep-freed" in out  # as the trainer runs
    # the machine and the kernels chosen for it, since figures from different CPUs are not comparable
    assert any(line.startswith("cpu: ") and "large products through" in line for line in out.splitlines())
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("256")]
    assert [r[1] for r in rows] == ["fwd", "fwd+bwd", "fwd", "fwd+bwd"]  # the table, then the comparison
    assert "heads side by side (2 parts)" in out
    assert all(float(r[-1].rstrip("x")) > 0 for r in rows[2:])


def test_the_comparison_says_when_nothing_splits():
    out = _run("--threads", "1", "--split-ab", "--allocator", "default")
    assert "no split here" in out
    assert "allocator default" in out
