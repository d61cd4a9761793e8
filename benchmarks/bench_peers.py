"""This package beside other implementations: Titans' neural memory and HOPE, training tokens/s and same-run ratios.

    python benchmarks/bench_peers.py [--threads 2] [--rounds 3] [--quick] [--omp-wait passive|active]
        [--allocator keep-freed|default]
        [--titans-python /tmp/peer-titans/bin/python] [--hope-python /tmp/peer-hope/bin/python]
    python benchmarks/bench_peers.py --flops [--threads 1]      # the two neural memories' FLOPs per token

The peers need their own virtual environments (the community HOPE installs as ``nested_learning`` too):

    python3 -m venv /tmp/peer-titans && /tmp/peer-titans/bin/pip install torch==2.13.0 titans-pytorch==0.5.5
    python3 -m venv /tmp/peer-hope && /tmp/peer-hope/bin/pip install torch==2.13.0 nested-learning==0.2.0

A peer whose interpreter is missing is skipped. Every measurement runs in a fresh subprocess of the right
interpreter (this file, ``--worker NAME``), and the workers take turns round by round: the fastest time of each over
all rounds is kept, so a busy period on a shared machine slows all of them alike. Batch 1, fp32, CPU.

Every worker runs under the same OpenMP wait policy, ``--omp-wait`` (default passive: idle threads sleep, the
fair setting on a machine shared with other jobs; active: they spin, which suits many small ops, and is close to
what an unset OMP_WAIT_POLICY gives). Run both: the ratio between the implementations depends on it. Every worker,
the peers' included, also keeps freed memory in its heap as this package's trainer does
(``training/cpu_memory.py``: no page faults on the large logits buffers of every step); ``--allocator default``
leaves glibc's malloc as it is.

1. Titans' neural memory, forward + backward of ``y.pow(2).mean()`` at T = 512, 2048, 8192:
   ours ``NeuralMemory(256, n_heads=4, chunk_size=64, expansion=4)`` (Eq 90 exact: each chunk's gradient at its
   own start weights; also with ``grad_at="call_start"``, titans-pytorch's rule) against titans-pytorch 0.5.5
   ``NeuralMemory(dim=256, chunk_size=64, heads=4, dim_head=64)`` (every chunk's gradient at the weights the call
   started with). Ours also with ``compile_chunk_step("inductor")`` (the fast path's chunk step compiled).
2. HOPE, one training step at T = 512, 2048: ours ``build_model("hope", "tiny", vocab_size=32000)`` (dim 128, 2
   layers, 4 heads, default chunks) doing ``model(x, labels=x).loss.backward()``; the community HOPE's
   ``pilot_smoke`` config (dim 128, 2 layers, 4 heads, vocab 32000) doing its training step with memory writes
   (``training.run_training_loop`` without online chunking: forward with block outputs, cross-entropy, per-layer
   teach signals, backward, then the no-grad forward that writes the memories); a Transformer++ with as many
   parameters as our HOPE (its MLP widened to match), a tied embedding and head alone (no layers: the least
   any of these models computes per token), and that head as our HOPE runs it, segment by segment of 16 tokens
   (logits, softmax and ``softmax @ W`` per segment for the CMS levels' inner gradient: the least our HOPE
   computes, so its rate over the Transformer++'s bounds HOPE's ratio from above). Ours also with
   ``titans_compile="inductor"``. No optimizer step in any of them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LENGTHS = (512, 2048, 8192)
HOPE_LENGTHS = (512, 2048)
VOCAB = 32000


# ------------------------------------------------------------------------------------------------ workers
def _time(step, reps: int) -> float:
    step()  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def _memory_step(layer, x):
    def step():
        y = layer(x)
        y = y[0] if isinstance(y, tuple) else y
        y.pow(2).mean().backward()
        layer.zero_grad(set_to_none=True)

    return step


def worker_ours_memory(T: int, grad_at: str = "chunk_start"):
    from nested_learning.memory import NeuralMemory

    layer = NeuralMemory(256, n_heads=4, chunk_size=64, expansion=4, grad_at=grad_at)
    return _memory_step(layer, _randn(T))


def worker_ours_memory_call_start(T: int):
    return worker_ours_memory(T, grad_at="call_start")


def worker_ours_memory_compiled(T: int):
    from nested_learning.memory import NeuralMemory

    layer = NeuralMemory(256, n_heads=4, chunk_size=64, expansion=4).compile_chunk_step("inductor")
    return _memory_step(layer, _randn(T))


def worker_titans(T: int):
    from titans_pytorch import NeuralMemory

    return _memory_step(NeuralMemory(dim=256, chunk_size=64, heads=4, dim_head=64), _randn(T))


def _randn(T):
    import torch

    return torch.randn(1, T, 256)


def _lm_step(model, T: int):
    import torch

    x = torch.randint(0, VOCAB, (1, T))

    def step():
        model(x, labels=x).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def worker_ours_hope(T: int):
    from nested_learning.models.registry import build_model

    return _lm_step(build_model("hope", "tiny", vocab_size=VOCAB), T)


def worker_ours_hope_compiled(T: int):
    from nested_learning.models.registry import build_model

    return _lm_step(build_model("hope", "tiny", vocab_size=VOCAB, titans_compile="inductor"), T)


def worker_transformer(T: int):
    """Transformer++ 'tiny' (dim 128, 2 layers, 4 heads) with the MLP width that matches our HOPE's parameters."""
    import torch
    from _equal_size import equal_size_transformer

    from nested_learning.models.registry import build_model

    with torch.device("meta"):
        n_params = sum(p.numel() for p in build_model("hope", "tiny", vocab_size=VOCAB).parameters())
    return _lm_step(equal_size_transformer(n_params, 128, 4, 2, VOCAB, T), T)


def worker_head_only(T: int):
    """A tied embedding and LM head alone (dim 128, vocab 32000): embedding, logits, cross-entropy and their
    backward, no layers, the products as this package's models take them (``ops/fast_linear.py``). Every model in
    the HOPE table runs at least this."""
    import torch
    import torch.nn.functional as F

    from nested_learning.ops.fast_linear import head_linear

    W = torch.nn.Parameter(torch.randn(VOCAB, 128) * 0.02)
    x = torch.randint(0, VOCAB, (1, T))

    def step():
        h = F.embedding(x[0, :-1], W)
        F.cross_entropy(head_linear(h, W), x[0, 1:]).backward()
        W.grad = None

    return step


def worker_head_per_segment(T: int):
    """The tied embedding and head as our HOPE runs them, no layers: per segment (16 tokens, HOPE tiny's fastest
    CMS chunk) the logits, their softmax and ``softmax @ W``, which the CMS levels' inner gradient (the "lm"
    objective) needs before the next segment can run, then the loss's backward for the whole call
    (``models/tied_head.py``, as ``CMSLanguageModel`` calls it). Our HOPE computes at least this, so its rate
    bounds HOPE's against the Transformer++ from above."""
    import torch
    import torch.nn.functional as F

    from nested_learning.models.registry import build_model
    from nested_learning.models.tied_head import SegmentedHead

    with torch.device("meta"):
        C = build_model("hope", "tiny", vocab_size=VOCAB).segment_size
    W = torch.nn.Parameter(torch.randn(VOCAB, 128) * 0.02)
    x = torch.randint(0, VOCAB, (1, T))

    def step():
        h = F.embedding(x, W)
        head = SegmentedHead(x.shape, W, direct=True, keep_probs=True)
        for a in range(0, T, C):
            head.segment(h[:, a : a + C], W.detach().t(), a, min(a + C, T), need_probs=True)
        head.finish(0, x)[1].backward()
        W.grad = None

    return step


def worker_community_hope(T: int):
    import importlib.resources

    import torch
    from omegaconf import OmegaConf

    from nested_learning import training

    path = importlib.resources.files("nested_learning") / "configs" / "pilot_smoke.yaml"
    cfg = OmegaConf.load(str(path))
    model = training.build_model_from_cfg(cfg.model)
    model.train()
    tokens = torch.randint(0, VOCAB, (1, T))

    def step():  # run_training_loop's step without online chunking and without the optimizer
        logits, _pre, block_outputs = model.forward_with_block_outputs(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 tokens[:, 1:].reshape(-1))
        teach_signals = training._compute_layer_teach_signals(loss, block_outputs)
        loss.backward()
        with torch.no_grad():
            model(tokens, teach_signals=teach_signals, surprise_value=None, fast_state=None)
        model.zero_grad(set_to_none=True)

    return step


WORKERS = {
    "ours_memory": worker_ours_memory,
    "ours_memory_call_start": worker_ours_memory_call_start,
    "ours_memory_compiled": worker_ours_memory_compiled,
    "titans": worker_titans,
    "ours_hope": worker_ours_hope,
    "ours_hope_compiled": worker_ours_hope_compiled,
    "transformer": worker_transformer,
    "head_only": worker_head_only,
    "head_per_segment": worker_head_per_segment,
    "community_hope": worker_community_hope,
}


def keep_freed_memory() -> bool:
    """This package's allocator setting (``training/cpu_memory.py``), loaded from its file so that a peer's
    interpreter, which must not import this package, applies the same one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_cpu_memory", ROOT / "src" / "nested_learning" / "training" / "cpu_memory.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.keep_freed_cpu_memory()


def run_worker(name: str, lengths: list[int], threads: int, reps: int, flops: bool = False,
               keep_freed: bool = True) -> None:
    """Prints the fastest time of a step per length, or with ``flops`` its FLOPs per token (every matmul-class op,
    forward and backward, as ``torch.utils.flop_counter`` counts them)."""
    if keep_freed:
        keep_freed_memory()
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out = {}
    for T in lengths:
        step = WORKERS[name](T)
        if flops:
            from torch.utils.flop_counter import FlopCounterMode

            # one torch thread while counting: the counter sees only its own thread's ops, and under passive
            # waiting at several threads our chunk step runs part of its batch on worker threads
            torch.set_num_threads(1)
            step()
            with FlopCounterMode(display=False) as counter:
                step()
            out[T] = counter.get_total_flops() / T
            torch.set_num_threads(threads)
        else:
            out[T] = _time(step, reps)
    print("RESULT " + json.dumps(out))


# ------------------------------------------------------------------------------------------------ driver
def call(python: str, name: str, lengths, threads: int, reps: int, env_src: bool, omp_wait: str,
         flops: bool = False, allocator: str = "keep-freed") -> dict | None:
    env = dict(os.environ, OMP_WAIT_POLICY=omp_wait.upper())
    if env_src:
        env["PYTHONPATH"] = str(ROOT / "src")
    else:  # a peer venv must not see this package (the community HOPE has the same import name)
        env.pop("PYTHONPATH", None)
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--threads", str(threads), "--reps", str(reps),
           "--lengths", *map(str, lengths), "--allocator", allocator, *(["--flops"] if flops else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/tmp")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {int(k): v for k, v in json.loads(line[7:]).items()}
    print(f"  {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def print_flops(args) -> int:
    """FLOPs per token of the neural memories' forward+backward at T = 2048 (ours with either gradient point), and
    the tokens/s that ours could reach at most if every FLOP ran at the same-run fp32 1024^2 matmul rate (the rate
    of a large, cache-friendly GEMM; the memories' products are (64 x 64) by (64 x 256) per head and chunk)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _timing import matmul_flops_per_s

    torch.set_num_threads(args.threads)
    T = 2048
    ours = call(sys.executable, "ours_memory", [T], args.threads, 1, True, args.omp_wait, flops=True)
    call_start = call(sys.executable, "ours_memory_call_start", [T], args.threads, 1, True, args.omp_wait, flops=True)
    titans = call(args.titans_python, "titans", [T], args.threads, 1, False, args.omp_wait, flops=True) \
        if Path(args.titans_python).exists() else None
    rate = matmul_flops_per_s()
    print(f"\nneural memory forward+backward, T={T}, FLOPs per token (torch.utils.flop_counter)")
    print(f"  ours (Eq 90, per-token reads): {ours[T] / 1e6:.2f} M")
    print(f"  ours, grad_at='call_start':    {call_start[T] / 1e6:.2f} M")
    if titans:
        print(f"  titans-pytorch 0.5.5:          {titans[T] / 1e6:.2f} M   "
              f"(ours / titans-pytorch {ours[T] / titans[T]:.2f}x)")
    print(f"same-run fp32 1024^2 matmul, {args.threads} thread(s): {rate / 1e9:.1f} GFLOP/s -> ours at most "
          f"{rate / ours[T]:.0f} tokens/s if every FLOP ran at that rate")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2, help="timed runs per worker call (fastest kept)")
    p.add_argument("--quick", action="store_true", help="T = 512 only, one round")
    p.add_argument("--titans-python", default="/tmp/peer-titans/bin/python")
    p.add_argument("--hope-python", default="/tmp/peer-hope/bin/python")
    p.add_argument("--omp-wait", choices=("passive", "active"), default="passive",
                   help="OpenMP wait policy of every worker (see the module docstring)")
    p.add_argument("--allocator", choices=("keep-freed", "default"), default="keep-freed",
                   help="keep freed memory in every worker's heap, as this package's trainer does, or not")
    p.add_argument("--flops", action="store_true",
                   help="count the neural memories' FLOPs per token instead of timing (see print_flops)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--lengths", type=int, nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args.worker, args.lengths, args.threads, args.reps, args.flops, args.allocator == "keep-freed")
        return 0
    if args.flops:
        return print_flops(args)

    rounds = 1 if args.quick else args.rounds
    mem_lengths = [512] if args.quick else list(MEMORY_LENGTHS)
    hope_lengths = [512] if args.quick else list(HOPE_LENGTHS)
    ours = sys.executable
    jobs = {  # name: (interpreter, lengths, runs on this checkout's sources)
        "ours_memory": (ours, mem_lengths, True),
        "ours_memory_call_start": (ours, mem_lengths, True),
        "ours_memory_compiled": (ours, mem_lengths, True),
        "titans": (args.titans_python, mem_lengths, False),
        "ours_hope": (ours, hope_lengths, True),
        "ours_hope_compiled": (ours, hope_lengths, True),
        "transformer": (ours, hope_lengths, True),
        "head_only": (ours, hope_lengths, True),
        "head_per_segment": (ours, hope_lengths, True),
        "community_hope": (args.hope_python, hope_lengths, False),
    }
    jobs = {k: v for k, v in jobs.items() if Path(v[0]).exists() or print(f"skipped {k}: no {v[0]}")}
    best: dict[str, dict] = {}
    for r in range(rounds):
        for name, (python, lengths, src) in jobs.items():
            res = call(python, name, lengths, args.threads, args.reps, src, args.omp_wait, allocator=args.allocator)
            if res is None:
                continue
            prev = best.setdefault(name, {})
            for T, s in res.items():
                prev[T] = min(prev.get(T, float("inf")), s)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)

    def rate(name, T):
        s = best.get(name, {}).get(T)
        return None if s is None else T / s

    def fmt(x, ratio=False):
        return f"{'-':>10}" if x is None else (f"{x:>9.2f}x" if ratio else f"{x:>10.0f}")

    def ratio(a, b):
        return None if a is None or b is None else a / b

    print(f"\nbatch 1, fp32, {args.threads} threads, OMP_WAIT_POLICY={args.omp_wait.upper()}, allocator "
          f"{args.allocator}, fastest of {rounds} rounds x {args.reps} runs, load average {os.getloadavg()[0]:.1f}")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _timing import machine_line

    print(machine_line())
    print("\nTitans neural memory, forward+backward tokens/s")
    print(f"{'T':>6} {'ours (Eq 90)':>12} {'compiled':>10} {'call start':>10} {'titans-pytorch':>14}"
          f" {'Eq 90 / titans':>14} {'compiled / titans':>17} {'call start / titans':>19}")
    for T in mem_lengths:
        a, d = rate("ours_memory", T), rate("ours_memory_compiled", T)
        b, c = rate("ours_memory_call_start", T), rate("titans", T)
        print(f"{T:>6} {fmt(a):>12} {fmt(d)} {fmt(b)} {fmt(c):>14} {fmt(ratio(a, c), True):>14}"
              f" {fmt(ratio(d, c), True):>17} {fmt(ratio(b, c), True):>19}")
    print("\nHOPE training step (dim 128, 2 layers, vocab 32000), tokens/s")
    print(f"{'T':>6} {'ours':>10} {'compiled':>10} {'community':>10} {'Transformer++':>14} {'head alone':>11}"
          f" {'ours / community':>17} {'compiled / community':>20} {'ours / T++':>11} {'head / community':>17}")
    for T in hope_lengths:
        a, d = rate("ours_hope", T), rate("ours_hope_compiled", T)
        b, c, h = rate("community_hope", T), rate("transformer", T), rate("head_only", T)
        print(f"{T:>6} {fmt(a)} {fmt(d)} {fmt(b)} {fmt(c):>14} {fmt(h):>11} {fmt(ratio(a, b), True):>17}"
              f" {fmt(ratio(d, b), True):>20} {fmt(ratio(a, c), True):>11} {fmt(ratio(h, b), True):>17}")
    print("\nthe head per 16-token segment alone (our HOPE's head work, no layers): an upper bound on HOPE / T++")
    print(f"{'T':>6} {'head per segment':>17} {'Transformer++':>14} {'compiled HOPE / T++':>20}"
          f" {'head per segment / T++':>23}")
    for T in hope_lengths:
        d, c, s = rate("ours_hope_compiled", T), rate("transformer", T), rate("head_per_segment", T)
        print(f"{T:>6} {fmt(s):>17} {fmt(c):>14} {fmt(ratio(d, c), True):>20} {fmt(ratio(s, c), True):>23}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
