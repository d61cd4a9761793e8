"""The HOPE step's phase timer: its phases nest as printed, and it leaves the model classes as it found them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_hope_phases  # noqa: E402

from nested_learning.memory.self_modifying_chunk_grad import _FusedChunkStep  # noqa: E402
from nested_learning.models.tied_head import SegmentedHead  # noqa: E402


def test_phases_nest_and_the_timers_are_removed(capsys):
    segment, backward = SegmentedHead.segment, _FusedChunkStep.backward
    s = bench_hope_phases.main(["--quick"])
    assert SegmentedHead.segment is segment and _FusedChunkStep.backward is backward
    assert "tokens/s" in capsys.readouterr().out
    titans_bwd = bench_hope_phases.TITANS_BACKWARD
    inside = [k for k in s if k.startswith("  ") and not k.startswith("    ") and "backward" not in k]
    assert len(inside) == 6 and all(s[k] > 0 for k in inside)
    assert sum(s[k] for k in inside) <= s["forward"]
    assert abs(s["forward"] + s["backward"] - s["step"]) < 1e-9
    # the inner gradients run back through layer 1's Titans: the chunk step's backward inside them
    assert 0 < s["    " + titans_bwd] < s["  inner gradients of the CMS levels"]
    assert 0 < s["  " + titans_bwd] < s["backward"]
