"""The transfer ablation runs end to end (``--quick``) and writes one result per transfer and seed."""

import json
import math

from nested_learning.evaluation.transfer_ablation import level_transfers, main, markdown_table


def test_level_transfers_leave_the_slowest_level_at_init():
    assert level_transfers("generate", 3) == ("generate", "generate", "init")
    assert level_transfers("backprop", 2) == ("backprop", "backprop")


def test_transfer_ablation_quick(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ablation.json"
    assert main(["--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [run["transfer"] for run in r["runs"]] == ["init", "backprop", "direct", "generate"]
    for run in r["runs"]:
        assert math.isfinite(run["streaming_ppl"]["updates_on"]) and 0 <= run["continual"]["average_accuracy"] <= 1
    table = markdown_table(r["summary"])
    assert table.count("\n") == 5 and "| generate |" in table
