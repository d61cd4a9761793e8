"""Where HOPE's training step spends its time: the forward's phases and the backward, in milliseconds per step.

    python benchmarks/bench_hope_phases.py [--threads 1] [--T 512] [--rounds 3] [--quick] [--compile]

HOPE tiny (dim 128, 2 layers, 4 heads, vocab 32000, default chunks and defaults), batch 1, fp32, one
``model(x, labels=x).loss.backward()`` with test-time memory writes, freed memory kept in the heap as the trainer
keeps it (``training/cpu_memory.py``). Wall-clock timers wrap the model's methods: on a CPU every op runs before the
call returns, so a method's time is its ops' time. The forward runs segment by segment (16 tokens, the fastest CMS
level's chunk); per segment each layer's self-modifying Titans and CMS read, then the head's logits, softmax and
``softmax @ W`` for the segment, then one ``autograd.grad`` from the final hidden state to every CMS level's
activations (the levels' next-token surprise, Eq 8-9; it runs back through the later layers, Titans included), then
the levels' steps. The self-modifying Titans chunk step's backward is timed on its own too, inside the inner
gradients and inside the outer backward. Means over ``--rounds`` steps after one warm-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import collections  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from nested_learning.memory import self_modifying_chunk_grad  # noqa: E402
from nested_learning.models import build_model, tied_head  # noqa: E402
from nested_learning.training.cpu_memory import keep_freed_cpu_memory  # noqa: E402

VOCAB = 32000


class Phases:
    """Seconds per phase, summed over the timed steps; ``inner`` says whether the inner gradients are running."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.inner = False
        self._patched = []  # (owner, attr, what was there), to undo

    def _patch(self, owner, attr: str, value) -> None:
        self._patched.append((owner, attr, owner.__dict__.get(attr)))
        setattr(owner, attr, value)

    def undo(self) -> None:
        """Remove every timer (the classes are shared with the rest of the process)."""
        for owner, attr, old in reversed(self._patched):
            if old is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        self._patched.clear()

    def wrap(self, owner, attr: str, label, static: bool = False) -> None:
        """Time every call of ``owner.attr`` under ``label`` (a string, or a function of this object giving one)."""
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label(self) if callable(label) else label] += time.perf_counter() - start

        self._patch(owner, attr, staticmethod(timed) if static else timed)

    def flag_inner(self, owner, attr: str) -> None:
        fn = getattr(owner, attr)

        def flagged(*args, **kwargs):
            self.inner = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.inner = False

        self._patch(owner, attr, flagged)


TITANS_BACKWARD = "of which the Titans chunk step's backward"


def instrument(model) -> tuple[Phases, list[str]]:
    """Wrap the model's phases with timers; returns the labels in the order they are printed."""
    phases = Phases()
    labels = ["step", "forward"]
    for i, block in enumerate(model.blocks):
        # the layer call with its block's norms and residual sum where the model runs them together
        whole = model.fused_mixer_residual and hasattr(block.mixer, "residual_forward")
        labels.append(f"  self-modifying Titans, layer {i}{' (and its norms)' if whole else ''}")
        phases.wrap(block.mixer, "residual_forward" if whole else "forward", labels[-1])
        phases.wrap(block.cms, "read", "  CMS reads (all layers)")
        phases.wrap(block.cms, "step", "  CMS steps (all layers)")
    phases.wrap(tied_head.SegmentedHead, "segment", "  head per segment: logits, softmax, softmax @ W")
    phases.wrap(model, "_inner_grads", "  inner gradients of the CMS levels")
    phases.flag_inner(model, "_inner_grads")
    phases.wrap(self_modifying_chunk_grad._FusedChunkStep, "backward",
                lambda p: "    " + TITANS_BACKWARD if p.inner else "  " + TITANS_BACKWARD, static=True)
    labels += ["  CMS reads (all layers)", "  head per segment: logits, softmax, softmax @ W",
               "  inner gradients of the CMS levels", "    " + TITANS_BACKWARD, "  CMS steps (all layers)",
               "backward", "  " + TITANS_BACKWARD]
    return phases, labels


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="T = 64, one round (a smoke test)")
    p.add_argument("--compile", action="store_true", help="HOPE with titans_compile='inductor' (its Titans layer calls compiled)")
    args = p.parse_args(argv)
    if args.quick:
        args.T, args.rounds = 64, 1
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()
    torch.manual_seed(0)
    model = build_model("hope", "tiny", vocab_size=VOCAB, titans_compile="inductor" if args.compile else None)
    ids = torch.randint(0, VOCAB, (1, args.T))
    phases, labels = instrument(model)

    def step():
        start = time.perf_counter()
        out = model(ids, labels=ids)
        mid = time.perf_counter()
        out.loss.backward()
        end = time.perf_counter()
        model.zero_grad(set_to_none=True)
        phases.seconds["forward"] += mid - start
        phases.seconds["backward"] += end - mid
        phases.seconds["step"] += end - start

    try:
        step()
        if args.compile:  # the first step compiles; the second runs the backward's variants once more
            step()
        phases.seconds.clear()
        for _ in range(args.rounds):
            step()
    finally:
        phases.undo()
    total = phases.seconds["step"]
    form = ", titans_compile='inductor'" if args.compile else ""
    print(f"HOPE tiny training step{form}, T = {args.T}, batch 1, fp32, {args.threads} thread(s), "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}: {args.T * args.rounds / total:.0f} tokens/s")
    print(f"{'phase':58s} {'ms':>9} {'share':>7}")
    for k in labels:
        s = phases.seconds.get(k, 0.0)
        print(f"{k:58s} {s / args.rounds * 1e3:9.1f} {s / total:7.1%}")
    return phases.seconds


if __name__ == "__main__":
    main()
