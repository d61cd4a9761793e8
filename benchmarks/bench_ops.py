"""Chunked vs recurrent delta rule (Eq 65/88/93) on CPU, with the chunked form's FLOP/s against a same-run matmul.

    python benchmarks/bench_ops.py [--threads 2] [--chunk-size 64] [--quick] [--omp-wait passive|active|default]
        [--allocator keep-freed|default]

Shapes: B=1, H=4, Dk=Dv=d=64, fp32, unit keys, eta in (0, 1), alpha in (0.9, 1).

FLOP count of the chunked algorithm, per token and head, forward (matmuls only, 2 FLOPs per multiply-add; C is the
chunk size, d = Dk = Dv):
    intra-chunk, 10 C d:  K K^T (2Cd), Q K^T (2Cd), applying the inverse of (I + L) to [eta V, eta K] (4Cd),
                          the masked (Q K^T) U (2Cd)
    state, 6 d^2:         W K S^T to form U (2d^2), Q S^T (2d^2), the state update U^T K (2d^2)
This is the standard count for the WY chunked form (it applies the inverse of (I + L) as a dense C x C matrix);
"fraction" uses it. The implementation executes 12Cd + 6d^2 + 2d^3/C + C^2: the UT transform (I + L)^{-1} by a
triangular solve (C^2), its application to [eta V, eta K] (4Cd), K K^T and Q K^T (4Cd), P W1 and P W2 (4Cd); per
chunk the affine map A = gamma I - K_tail^T W2, Bc = K_tail^T W1 (4d^2), the recurrence R <- A R + Bc (2d^3/C) and
(Q - P W2) R (2d^2). At C = d that is about 30% more than the standard count ("executed" is the fraction on it):
the extra work moves the recurrence out of the chunk loop into batched products.
Forward+backward is counted as 3x the forward.

OpenMP threads wait passively by default (``--omp-wait passive``, i.e. OMP_WAIT_POLICY=PASSIVE): on a machine whose
cores are shared with other jobs, spinning threads that get descheduled make small ops many times slower and the
timings erratic. ``--omp-wait default`` leaves the policy unset (OpenMP spins a while, then sleeps: what a user gets
without setting anything), ``active`` spins. The chunked form adapts: under the passive policy it runs its recurrence
and small solves on one thread, otherwise on the caller's threads; and under the passive policy with several threads
it runs the heads side by side, each part on a thread of its own (``ops/delta_rule_side_by_side.py``).

The process keeps freed memory in its heap, as this package's trainer does (``training/cpu_memory.py``): the
chunked form's backward allocates and frees tensors of several MB at every call, and with glibc's defaults each
comes back from the kernel page by page (about 15,000 page faults per forward+backward at T=8192, four heads).
``--allocator default`` leaves glibc's malloc as it is.

``--split-ab`` then times that split against the unsplit form (``no_side_by_side()``), alternating run by run in one
process, medians of ``--ab-runs`` runs each (only meaningful with passive waiting and several threads).
"""

from __future__ import annotations

import os
import sys


def _omp_wait_from_argv() -> str | None:
    """``--omp-wait`` read before torch is imported (OpenMP reads the policy once, when it loads)."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a.startswith("--omp-wait="):
            return a.split("=", 1)[1]
        if a == "--omp-wait" and i + 1 < len(argv):
            return argv[i + 1]
    return None


OMP_WAIT = _omp_wait_from_argv()
if OMP_WAIT == "default":
    os.environ.pop("OMP_WAIT_POLICY", None)
elif OMP_WAIT in ("passive", "active"):
    os.environ["OMP_WAIT_POLICY"] = OMP_WAIT.upper()
else:  # not given: an OMP_WAIT_POLICY already set is kept
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_line, matmul_flops_per_s, onednn_matmul_flops_per_s, time_fn  # noqa: E402

from nested_learning.ops import delta_rule  # noqa: E402
from nested_learning.ops.delta_rule_side_by_side import no_side_by_side, side_by_side_split  # noqa: E402
from nested_learning.training.cpu_memory import keep_freed_cpu_memory  # noqa: E402

B, H, D = 1, 4, 64


def make_inputs(T: int, requires_grad: bool = False):
    q = torch.randn(B, T, H, D)
    k = F.normalize(torch.randn(B, T, H, D), dim=-1)
    v = torch.randn(B, T, H, D)
    eta = torch.rand(B, T, H)
    alpha = 0.9 + 0.1 * torch.rand(B, T, H)
    xs = (q, k, v, eta, alpha)
    return tuple(x.requires_grad_(requires_grad) for x in xs)


def forward_flops(T: int, C: int) -> float:
    """The standard count of the WY chunked form."""
    return (10 * C * D + 6 * D * D) * T * H


def executed_flops(T: int, C: int) -> float:
    """What this implementation performs (see the module docstring)."""
    return (12 * C * D + 6 * D * D + 2 * D**3 / C + C * C) * T * H


def runner(mode: str, T: int, C: int, backward: bool):
    xs = make_inputs(T, requires_grad=backward)
    # Dense output gradients, as a real loss gives: o.sum() would hand backward stride-0 gradients, which send
    # CPU bmm down a per-matrix path and time something no training run does.
    grad_o, grad_S = torch.randn(B, T, H, D), torch.randn(B, H, D, D)

    def run():
        o, S = delta_rule(*xs, chunk_size=C, mode=mode)
        if backward:
            torch.autograd.backward((o, S), (grad_o, grad_S))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument(
        "--iters",
        type=int,
        default=5,
        help="timed runs of the chunked form at the longest T (shorter T get proportionally more; fastest kept)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short smoke run: T in {256, 1024}, one timed run"
    )
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 512 2048 8192)")
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument(
        "--split-ab", action="store_true",
        help="also time the heads split across threads against the unsplit form, alternating (passive waiting)",
    )
    parser.add_argument("--ab-runs", type=int, default=12, help="runs of each form in --split-ab")
    parser.add_argument(
        "--omp-wait", choices=("passive", "active", "default"),
        help="OpenMP wait policy of this run; 'default' leaves it unset (without the flag: OMP_WAIT_POLICY as set,"
        " else passive)",
    )
    parser.add_argument(
        "--allocator", choices=("keep-freed", "default"), default="keep-freed",
        help="keep freed memory in the heap, as the trainer does (default), or leave glibc's malloc as it is",
    )
    args = parser.parse_args()

    kept = args.allocator == "keep-freed" and keep_freed_cpu_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    C = args.chunk_size
    lengths = args.lengths or ((256, 1024) if args.quick else (512, 2048, 8192))
    iters = 1 if args.quick else args.iters
    rec_max_T = 1024 if args.quick else 2048  # longer recurrent runs are extrapolated linearly in T
    print(
        f"delta rule, B={B} H={H} Dk=Dv={D} fp32, chunk_size={C}, threads={args.threads}, fastest of >= {iters},"
        f" OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')},"
        f" allocator {'keep-freed' if kept else 'default'}, load average {os.getloadavg()[0]:.1f}"
    )
    print(machine_line())
    print(
        f"{'T':>6} {'pass':>8} {'chunk ms':>10} {'recur ms':>10} {'ratio':>8} {'GFLOP/s':>9} {'matmul':>9} {'fraction':>9} {'executed':>9}"
    )

    rec_per_token = {}
    for T in lengths:
        for backward in (False,) if args.no_backward else (False, True):
            name = "fwd+bwd" if backward else "fwd"
            # Matmul rate measured right before and after, the larger kept: the fraction errs low, not high.
            # Short runs are repeated more: the fastest of many is the best estimate on a busy machine.
            chunk_iters = iters * max(1, max(lengths) // T)
            mm_before = matmul_flops_per_s(iters=iters + 2)
            t_chunk = time_fn(runner("chunk", T, C, backward), warmup=1, iters=chunk_iters)
            mm = max(mm_before, matmul_flops_per_s(iters=iters + 2))
            if T <= rec_max_T or name not in rec_per_token:
                rec_iters = min(chunk_iters, 1 if backward else 3)  # a few seconds per run at T=2048
                t_rec = time_fn(runner("recurrent", T, C, backward), warmup=0, iters=rec_iters)
                rec_per_token[name] = t_rec / T
                rec_note = ""
            else:
                t_rec = rec_per_token[name] * T
                rec_note = "*"
            passes = 3 if backward else 1
            rate = forward_flops(T, C) * passes / t_chunk
            executed = executed_flops(T, C) * passes / t_chunk
            print(
                f"{T:>6} {name:>8} {t_chunk * 1e3:>10.1f} {t_rec * 1e3:>9.0f}{rec_note or ' '} {t_rec / t_chunk:>7.1f}x"
                f" {rate / 1e9:>9.1f} {mm / 1e9:>9.1f} {rate / mm:>8.0%} {executed / mm:>8.0%}"
            )
    if any(T > rec_max_T for T in lengths):
        print(f"* recurrent time extrapolated linearly from T={rec_max_T} (per-token cost), not measured")
    print(
        "recurrent: fastest of 3 runs (forward) or 1 run (forward+backward); chunked: fastest of >= --iters"
    )
    print("matmul: fp32 1024x1024 @ 1024x1024 in the same run; fraction = chunk GFLOP/s / matmul GFLOP/s,")
    print(
        "GFLOP/s and fraction on the standard count 10Cd + 6d^2; executed: on the 12Cd + 6d^2 + 2d^3/C + C^2 performed"
    )
    onednn = onednn_matmul_flops_per_s(iters=iters + 2)
    if onednn is not None:
        print(f"matmul is PyTorch's (torch.mm); the same product through oneDNN ran at {onednn / 1e9:.1f} GFLOP/s")
    if args.split_ab:
        split_ab(lengths, C, not args.no_backward, 2 if args.quick else args.ab_runs)


def split_ab(lengths, C: int, backward: bool, runs: int) -> None:
    """The heads side by side on threads of their own against the unsplit form, alternating run by run."""
    parts = side_by_side_split(torch.zeros(B, max(lengths), H, 1), C)[0]
    print(f"\nheads side by side ({parts} parts) / unsplit, alternating, median of {runs} runs each")
    if parts == 1:
        print("no split here (it needs passive waiting, several threads and at least 4 chunks)")
        return
    print(f"{'T':>6} {'pass':>8} {'split ms':>10} {'whole ms':>10} {'speed-up':>9}")
    for T in lengths:
        for bwd in (False, True) if backward else (False,):
            run = runner("chunk", T, C, bwd)
            times = {True: [], False: []}
            for i in range(2 * runs + 2):
                split = i % 2 == 0
                with contextlib.nullcontext() if split else no_side_by_side():
                    start = time.perf_counter()
                    run()
                    if i >= 2:  # one warm-up each
                        times[split].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"{T:>6} {'fwd+bwd' if bwd else 'fwd':>8} {med[True] * 1e3:>10.1f} {med[False] * 1e3:>10.1f}"
                f" {med[False] / med[True]:>8.2f}x"
            )


if __name__ == "__main__":
    main()
