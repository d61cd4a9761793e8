"""bench_peers' worker protocol: a worker runs in its own interpreter, applies the allocator setting from this
package's file (a peer's interpreter cannot import this package) and reports its time."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_peers  # noqa: E402


def test_a_worker_reports_a_time_under_either_allocator():
    for allocator in ("keep-freed", "default"):
        res = bench_peers.call(sys.executable, "head_only", [64], 1, 1, True, "passive", allocator=allocator)
        assert res is not None and set(res) == {64} and 0 < res[64] < 60


def test_the_allocator_setting_loads_without_this_package():
    source = Path(bench_peers.ROOT / "src" / "nested_learning" / "training" / "cpu_memory.py").read_text()
    assert "import nested_learning" not in source and "from nested_learning" not in source and "from ." not in source


def test_flops_count_every_op_whatever_the_thread_count():
    """Under passive waiting at two threads our chunk step runs half its batch on a worker thread, which a FLOP
    counter does not see: the count is taken on one thread, so it equals the one-thread count."""
    res = [bench_peers.call(sys.executable, "ours_memory", [128], n, 1, True, "passive", flops=True) for n in (1, 2)]
    assert res[0] is not None and res[0][128] > 0
    assert res[1] == res[0]


def test_the_head_per_segment_worker_reports_a_time():
    res = bench_peers.call(sys.executable, "head_per_segment", [40], 1, 1, True, "passive")
    assert res is not None and set(res) == {40} and 0 < res[40] < 60
