"""The GPU benchmark script runs end to end (tiny sizes on CPU), so that one call on a lent GPU gives its figures."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_gpu  # noqa: E402


def test_quick_run_reports_every_figure(tmp_path):
    out = tmp_path / "bench_gpu.json"
    results = bench_gpu.main(["--device", "cpu", "--quick", "--iters", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    for key in ("delta_rule ours fwd ms", "delta_rule ours fwd+bwd ms", "HOPE tok/s", "Transformer++ tok/s"):
        assert isinstance(results[key], float) and results[key] > 0, (key, results[key])
    assert results["delta_rule fla"].startswith("unavailable")  # fla's kernel needs CUDA
    assert results["HOPE / Transformer++"] == results["HOPE tok/s"] / results["Transformer++ tok/s"]


def test_quick_run_under_bf16_autocast_reports_every_figure(tmp_path):
    """The precision the GPU run uses (bf16 autocast, bf16 delta-rule inputs), on CPU: a dtype mismatch in any
    hand-written backward shows here rather than as an error in place of a figure on a lent GPU."""
    results = bench_gpu.main(["--device", "cpu", "--quick", "--iters", "1", "--precision", "bf16"])
    assert results["dtype"] == "torch.bfloat16"
    for key in ("delta_rule ours fwd ms", "delta_rule ours fwd+bwd ms", "HOPE tok/s", "Transformer++ tok/s"):
        assert isinstance(results[key], float) and results[key] > 0, (key, results[key])


def test_equal_size_transformer_matches_the_parameter_count():
    from nested_learning.models.registry import build_model

    hope = build_model("hope", "tiny", dim=64, n_heads=4, n_layers=2, vocab_size=512)
    n_hope = sum(p.numel() for p in hope.parameters())
    n_tpp = sum(p.numel() for p in bench_gpu.equal_size_transformer(n_hope, 64, 4, 2, 512, 64).parameters())
    step = 3 * 64 * 32 * 2  # the parameters of 32 more MLP units in each of the 2 layers (SwiGLU's granularity)
    assert abs(n_tpp - n_hope) <= step / 2


def test_a_failing_measurement_is_reported_and_the_others_go_on():
    results = {}
    bench_gpu._measure("broken", lambda: 1 / 0, results)
    bench_gpu._measure("fine", lambda: 2.0, results)
    assert results["broken"].startswith("error: ZeroDivisionError") and results["fine"] == 2.0
