"""HOPE and HOPE-attention against Transformer++: training tokens/s, where HOPE's time goes, inference memory.

    python benchmarks/bench_models.py [--threads 2] [--seq-lens 512,2048,8192] [--stream-lens 1024,4096,16384]
                                      [--quick] [--skip-memory] [--skip-parts]

1. Training throughput (forward + backward + AdamW step, batch 1) of the 'tiny' configs (dim 128, 2 layers, GPT-2
   vocabulary), printed as ratios to Transformer++ measured in the same run; HOPE also with its CMS frozen, in meta
   mode, with the "next_input" objective, and with 4x longer chunks (the cost of each choice).
2. The parts of one HOPE training step at the first sequence length: the segment loop's forward (with the inner
   gradients), the outer backward, the optimizer, and the top operators of a torch.profiler trace.
3. Inference memory: bytes of the stream state after streaming N tokens in pieces (no grad, test-time updates on),
   as ratios to the state after the first length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from nested_learning.training.cpu_memory import keep_freed_cpu_memory

sys.path.insert(0, str(Path(__file__).parent))
from _timing import time_fn  # noqa: E402

from nested_learning.models import HOPE, HOPEAttention, TransformerPP  # noqa: E402


def models(vocab: int) -> dict:
    torch.manual_seed(0)
    return {
        "transformer++": lambda: TransformerPP.from_preset("tiny", vocab_size=vocab),
        "hope_attention": lambda: HOPEAttention.from_preset("tiny", vocab_size=vocab),
        "hope": lambda: HOPE.from_preset("tiny", vocab_size=vocab),
        "hope (CMS frozen)": lambda: HOPE.from_preset("tiny", vocab_size=vocab, test_time_updates=False),
        "hope (meta)": lambda: HOPE.from_preset("tiny", vocab_size=vocab, cms_mode="meta"),
        "hope (next_input)": lambda: HOPE.from_preset("tiny", vocab_size=vocab, cms_objective="next_input"),
        "hope (C=64/256/1024)": lambda: HOPE.from_preset("tiny", vocab_size=vocab, chunk_sizes=(64, 256, 1024)),
    }


def train_step_fn(model, T: int, vocab: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (1, T))

    def step():
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_training(seq_lens, vocab: int, quick: bool, skip_long_meta: int, only: str = "") -> None:
    print("\n== training tokens/s (forward + backward + AdamW), batch 1, ratio to Transformer++ in this run ==")
    makers = models(vocab)
    if only:  # Transformer++ always runs: it is the reference of the ratios
        makers = {k: v for k, v in makers.items() if k == "transformer++" or k in only.split(",")}
    print(f"{'model':<20}" + "".join(f"{'T=' + str(T):>22}" for T in seq_lens))
    base: dict[int, float] = {}
    for name, make in makers.items():
        row = f"{name:<20}"
        for T in seq_lens:
            if name == "hope (meta)" and T > skip_long_meta:
                row += f"{'(skipped)':>22}"
                continue
            long = T >= 4096 or quick
            seconds = time_fn(
                train_step_fn(make(), T, vocab), warmup=0 if long else 1, iters=1 if long else 2
            )
            tps = T / seconds
            base.setdefault(T, tps)
            row += f"{tps:>12.0f} ({tps / base[T]:>5.2f}x)"
        print(row, flush=True)


def bench_parts(T: int, vocab: int) -> None:
    print(f"\n== where one HOPE training step goes (T={T}, batch 1) ==")
    model = HOPE.from_preset("tiny", vocab_size=vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (1, T))
    train_step_fn(model, T, vocab)()  # warm up
    t0 = time.perf_counter()
    loss = model(x, labels=x).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    with torch.no_grad():
        t4 = time.perf_counter()
        model(x)
        t5 = time.perf_counter()
    total = t3 - t0
    for name, s in [
        ("forward: segment loop incl. inner gradients + steps", t1 - t0),
        ("outer backward", t2 - t1),
        ("AdamW step", t3 - t2),
        ("(inference forward, no outer graph)", t5 - t4),
    ]:
        print(f"  {name:<55} {s:8.3f} s  {s / total:6.1%}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x, labels=x).loss.backward()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in events if not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    n_segments = T // model.segment_size
    print(
        f"  operators per {model.segment_size}-token segment (forward + inner + outer backward): {len(top) / n_segments:.0f}"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=45))


@torch.no_grad()
def state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.flatten().values())


@torch.no_grad()
def bench_memory(stream_lens, vocab: int, piece: int) -> None:
    print(
        f"\n== inference: bytes of the stream state after N tokens (streamed in pieces of {piece}), ratio to N="
        f"{stream_lens[0]} =="
    )
    print(f"{'model':<20}" + "".join(f"{'N=' + str(n):>22}" for n in stream_lens) + f"{'tokens/s':>12}")
    for name in ("transformer++", "hope_attention", "hope"):
        model = models(vocab)[name]().eval()
        state, done, row, first = None, 0, f"{name:<20}", None
        start = time.perf_counter()
        for n in stream_lens:
            while done < n:
                ids = torch.randint(0, vocab, (1, min(piece, n - done)))
                state = model(ids, state=state).state
                done += ids.shape[1]
            b = state_bytes(state)
            first = first or b
            row += f"{b / 2**20:>11.2f} MiB ({b / first:>5.1f}x)"
        print(row + f"{done / (time.perf_counter() - start):>12.0f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq-lens", default="512,2048,8192")
    p.add_argument("--stream-lens", default="1024,4096,16384")
    p.add_argument(
        "--piece", type=int, default=250, help="tokens per call when streaming (not a multiple of 16)"
    )
    p.add_argument(
        "--meta-max-len", type=int, default=2048, help="longest T for the (memory-hungry) meta mode"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: short sequences, one iteration")
    p.add_argument("--models", default="", help="comma-separated subset of the training rows (default: all)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-parts", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()  # as the trainer does
    seq_lens = [64, 128] if args.quick else [int(s) for s in args.seq_lens.split(",")]
    stream_lens = [256, 512] if args.quick else [int(s) for s in args.stream_lens.split(",")]
    print(
        f"tiny configs (dim 128, 2 layers, vocab {args.vocab}), {args.threads} threads, torch {torch.__version__}"
    )
    bench_training(seq_lens, args.vocab, args.quick, args.meta_max_len, args.models)
    if not args.skip_parts:
        bench_parts(seq_lens[0], args.vocab)
    if not args.skip_memory:
        bench_memory(stream_lens, args.vocab, 100 if args.quick else args.piece)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
