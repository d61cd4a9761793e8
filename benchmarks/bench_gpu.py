"""GPU figures in one run: the delta rule (this package's chunked form against fla's kernel) and HOPE against a
Transformer++ of equal parameters, training tokens/s at the 760M preset's width with a few layers.

    python benchmarks/bench_gpu.py [--layers 4] [--seq-len 4096] [--compile] [--out bench_gpu.json]
    python benchmarks/bench_gpu.py --device cpu --quick [--precision bf16]  # the smoke run (tiny sizes), as the tests do

On CUDA (``--precision auto``; ``bf16`` anywhere), models run under bf16 autocast (the memories' state recursions stay in fp32 inside it) and the delta rule
takes bf16 inputs; times are the fastest of ``--iters`` synchronised runs after a warm-up. Every measurement runs on
its own: one that fails (out of memory, a missing kernel) is reported with its error and the others still run, so a
single call on a lent machine gives every figure it can.

What it prints, and writes with ``--out`` as JSON:
- delta rule, B x T x H x 64 (B=1, H=16 by default, the 760M width): forward and forward+backward ms of
  ``delta_rule(..., backend="native")`` and, where fla-core with triton is importable, of ``backend="auto"``
  (fla's chunked gated delta rule), and their ratio;
- HOPE (dim 1024, 16 heads, ``--layers`` layers, vocab 32000) and a Transformer++ of the same width and depth whose
  MLP width is chosen for the same parameter count: training tokens/s of ``model(x, labels=x).loss.backward()``,
  batch 1, T = ``--seq-len``, and their ratio (with ``--compile`` also HOPE with ``titans_compile="inductor"``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _equal_size import equal_size_transformer

from nested_learning.models.registry import build_model
from nested_learning.ops import delta_rule
from nested_learning.ops.delta_rule import fla_chunk_kernel

FULL = dict(dim=1024, heads=16, vocab=32000)
QUICK = dict(dim=64, heads=4, vocab=512)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 1, iters: int = 3) -> float:
    """Fastest of ``iters`` synchronised calls of ``fn``, in ms."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(iters, 1)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _measure(name: str, fn, results: dict) -> None:
    """Run one measurement; a failure is recorded as its error and does not stop the others."""
    try:
        results[name] = fn()
    except Exception as err:  # noqa: BLE001 -- report and go on: one call on a lent machine must give what it can
        results[name] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"  {name}: {results[name] if isinstance(results[name], str) else round(results[name], 2)}", flush=True)


def delta_rule_inputs(B, T, H, D, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, v = rand(B, T, H, D), rand(B, T, H, D)
    k = F.normalize(rand(B, T, H, D), dim=-1)
    eta = torch.sigmoid(rand(B, T, H))
    alpha = 0.9 + 0.1 * torch.sigmoid(rand(B, T, H))
    return [x.to(dtype).requires_grad_() for x in (q, k, v, eta, alpha)]


def bench_delta_rule(device, B, T, H, D, dtype, iters, results: dict) -> None:
    xs = delta_rule_inputs(B, T, H, D, device, dtype)
    grad_o = torch.randn(B, T, H, D, device=device, dtype=dtype)

    def run(backend: str, backward: bool):
        def step():
            o, _ = delta_rule(*xs, chunk_size=64, read="after", backend=backend, output_final_state=False)
            if backward:
                o.backward(grad_o)
        return lambda: time_ms(step, device, iters=iters)

    backends = ["native"] + (["auto"] if device.type == "cuda" and fla_chunk_kernel() is not None else [])
    if len(backends) == 1:
        results["delta_rule fla"] = "unavailable (needs CUDA and fla-core with triton)"
    for backend in backends:
        label = "ours" if backend == "native" else "fla"
        _measure(f"delta_rule {label} fwd ms", run(backend, False), results)
        _measure(f"delta_rule {label} fwd+bwd ms", run(backend, True), results)


def bench_models(device, dim, heads, layers, vocab, T, iters, compile_titans: bool, results: dict,
                 bf16: bool = True) -> None:
    x = torch.randint(0, vocab, (1, T), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def tokens_per_s(make):
        def run():
            model = make().to(device)

            def step():
                with autocast:
                    loss = model(x, labels=x).loss
                loss.backward()
                model.zero_grad(set_to_none=True)

            return T / (time_ms(step, device, iters=iters) / 1e3)
        return run

    def hope(**kw):
        return build_model("hope", "tiny", dim=dim, n_heads=heads, n_layers=layers, vocab_size=vocab, **kw)

    with torch.device("meta"):
        n_params = sum(p.numel() for p in hope().parameters())
    results["params"] = n_params
    _measure("HOPE tok/s", tokens_per_s(hope), results)
    if compile_titans:
        _measure("HOPE compiled tok/s", tokens_per_s(lambda: hope(titans_compile="inductor")), results)
    _measure("Transformer++ tok/s", tokens_per_s(lambda: equal_size_transformer(n_params, dim, heads, layers,
                                                                                  vocab, T)), results)


def ratio(results: dict, a: str, b: str):
    x, y = results.get(a), results.get(b)
    return x / y if isinstance(x, float) and isinstance(y, float) and y > 0 else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--heads", type=int, help="delta rule heads (default: the model width's)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also HOPE with titans_compile='inductor' (its Titans layer calls compiled)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16: models under bf16 autocast, delta rule inputs in bf16 (auto: bf16 on CUDA, else fp32)")
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    T = 64 if args.quick else args.seq_len
    layers = 1 if args.quick else args.layers
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, T={T}, width {sizes['dim']}, {layers} layers", flush=True)
    results: dict = {"device": name, "seq_len": T, "dim": sizes["dim"], "layers": layers, "dtype": str(dtype)}

    head_dim = 16 if args.quick else 64
    print(f"delta rule (B=1, Dk=Dv={head_dim}, chunk 64, read after):", flush=True)
    bench_delta_rule(device, 1, T, args.heads or sizes["heads"], head_dim, dtype, args.iters, results)
    print(f"training step, batch 1, {'bf16 autocast' if bf16 else 'fp32'}:", flush=True)
    bench_models(device, sizes["dim"], sizes["heads"], layers, sizes["vocab"], T, args.iters, args.compile, results,
                 bf16)

    results["fla / ours, fwd"] = ratio(results, "delta_rule ours fwd ms", "delta_rule fla fwd ms")
    results["fla / ours, fwd+bwd"] = ratio(results, "delta_rule ours fwd+bwd ms", "delta_rule fla fwd+bwd ms")
    results["HOPE / Transformer++"] = ratio(results, "HOPE tok/s", "Transformer++ tok/s")
    results["HOPE compiled / Transformer++"] = ratio(results, "HOPE compiled tok/s", "Transformer++ tok/s")
    print("ratios (speed-ups, > 1 means the first is faster):")
    for key in ("fla / ours, fwd", "fla / ours, fwd+bwd", "HOPE / Transformer++", "HOPE compiled / Transformer++"):
        value = results[key]
        print(f"  {key}: {'-' if value is None else f'{value:.2f}x'}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
