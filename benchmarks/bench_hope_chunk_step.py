"""HOPE's training step with the forms of the self-modifying Titans chunk step, in one run.

    python benchmarks/bench_hope_chunk_step.py [--T 512] [--threads 1] [--rounds 4] [--forms chunk,compiled-layer]

"chunk": each Eq 90 chunk through ``ops.delta_rule`` (the reference form); "fused": the box-major step with
``ops.delta_rule_one_chunk``, differentiated by autograd (``titans_hand_backward=False``); "fused-hand": the same step
with its hand-written backward (the default); "compiled": the fused step under ``torch.compile`` (inductor; the first
run of a machine compiles for minutes, later runs reuse the cache), its backward derived by the compiler
(``titans_hand_backward=False``); "compiled-hand": the hand-written forward and backward, each compiled without
autograd (``titans_compile="inductor", titans_compile_layer=False``); "compiled-layer": every segment's Titans layer
call compiled whole, the compiler deriving its backward (``titans_compile="inductor"``, the default
``titans_compile_layer=True``; the partial segments at a call's end take the compiled-hand step), its small products as
loops of the compiler's own (``SelfModifyingTitans.whole_chunk_small_products``); "compiled-layer-bmm": the same
with every product one library call, as before that option; "compiled-layer-python": "compiled-layer" with
inductor's Python wrapper around the layer graph where the C++ one is the default
(``SelfModifyingTitans.whole_chunk_cpp_wrapper``, ``compiled_steps.cpp_wrapper_pays``). HOPE tiny (dim 128, 2 layers,
4 heads) with a 32,000 vocabulary, batch 1, fp32, ``model(x, labels=x).loss.backward()`` with test-time memory
writes, fastest of ``--rounds`` interleaved rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from nested_learning.models import build_model  # noqa: E402
from nested_learning.training.cpu_memory import keep_freed_cpu_memory  # noqa: E402

VOCAB = 32000
FORMS = ("chunk", "fused", "fused-hand", "compiled", "compiled-hand", "compiled-layer", "compiled-layer-bmm",
         "compiled-layer-python")


def build(form: str):
    torch.manual_seed(0)
    hand = form in ("fused-hand", "compiled-hand") or form.startswith("compiled-layer")
    model = build_model("hope", "tiny", vocab_size=VOCAB, titans_hand_backward=hand)
    for block in model.blocks:
        block.mixer.op_mode = "chunk" if form == "chunk" else "fused"
    if not form.startswith("compiled"):
        return model
    model.compile_chunk_steps(whole_chunk_calls=form.startswith("compiled-layer"))
    for block in model.blocks:  # instance attributes over the class defaults
        if form == "compiled-layer-bmm":
            block.mixer.whole_chunk_small_products = False
        if form == "compiled-layer-python":
            block.mixer.whole_chunk_cpp_wrapper = False
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--forms", default=",".join(FORMS), help="comma-separated, the first is the reference")
    args = p.parse_args()
    forms = args.forms.split(",")
    if unknown := set(forms) - set(FORMS):
        p.error(f"unknown forms {sorted(unknown)}; choose from {', '.join(FORMS)}")
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()  # as the trainer does
    ids = torch.randint(0, VOCAB, (1, args.T))
    models = {form: build(form) for form in forms}

    def step(form):
        models[form](ids, labels=ids).loss.backward()
        models[form].zero_grad(set_to_none=True)

    for form in models:  # warm-up (the compiled form compiles here)
        t = time.perf_counter()
        step(form)
        print(f"{form}: first step {time.perf_counter() - t:.1f} s", flush=True)
    best = {form: float("inf") for form in models}
    for _ in range(args.rounds):
        for form in models:
            t = time.perf_counter()
            step(form)
            best[form] = min(best[form], time.perf_counter() - t)
    print(f"\nHOPE tiny training step, T={args.T}, batch 1, fp32, {args.threads} thread(s), tokens/s")
    for form in models:
        print(f"{form:>21} {args.T / best[form]:8.0f}   {best[forms[0]] / best[form]:.2f}x {forms[0]}")


if __name__ == "__main__":
    main()
