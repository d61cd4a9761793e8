"""A CMS language model's step with its CMS chains read as one autograd node against the op-by-op reference read.

    python benchmarks/bench_cms_read.py [--threads 2] [--steps 12] [--quick]

``CMSLanguageModel.fused_cms_read`` switches between the two reads (``memory/cms_chain_read.py``) in one process,
alternating step by step, so both see the same machine state; medians of ``--steps`` steps each after a warm-up.
Two models: HOPE tiny (dim 128, 2 layers, vocab 32000, GELU levels), T = 512, a training step
``model(x, labels=x).loss.backward()``; and a random ``transformers`` Llama with SmolLM2-135M's widths (dim 576, MLP
1536, 6 layers, vocab 8192) Hope-ified (Sec 7.3: SwiGLU levels, chunks 16 / 64), T = 256, a training step and a
no-grad stream call (the levels still learn: the continual-learning evaluation's path; no-grad calls read op by op
whatever the switch, so this row checks that nothing changed there). Freed memory is kept in the heap, as the
trainer keeps it. Passive OpenMP waiting unless ``OMP_WAIT_POLICY`` is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede the first import of torch

import argparse  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import alternating_medians  # noqa: E402

from nested_learning.models import build_model  # noqa: E402
from nested_learning.training.cpu_memory import keep_freed_cpu_memory  # noqa: E402


def _hope(T: int, vocab: int):
    model = build_model("hope", "tiny", vocab_size=vocab)
    x = torch.randint(0, vocab, (1, T))
    return model, {"training step": lambda: model(x, labels=x).loss.backward()}


def _hopeified_llama(T: int, layers: int, vocab: int):
    import transformers

    from nested_learning.models import hopeify

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    model = hopeify(transformers.LlamaForCausalLM(cfg).eval(), chunk_sizes=(16, 64), inner_lr=0.1)
    x = torch.randint(0, vocab, (1, T))

    def stream():
        with torch.no_grad():
            model(x)

    return model, {"training step": lambda: model(x, labels=x).loss.backward(), "no-grad stream": stream}


def compare(model, step, steps: int) -> dict:
    """Median seconds of ``step`` with each read, alternating step by step (two warm-up steps each)."""
    def run(fused):
        model.fused_cms_read = fused
        model.zero_grad(set_to_none=True)
        step()

    times = alternating_medians({"fused": lambda: run(True), "reference": lambda: run(False)}, steps)
    model.fused_cms_read = True
    return times


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="small models, short streams, 2 steps (a smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()
    torch.manual_seed(0)
    steps = 2 if args.quick else args.steps
    cases = [("HOPE tiny, T=512", _hope(64 if args.quick else 512, 500 if args.quick else 32000))]
    try:
        llama = _hopeified_llama(32 if args.quick else 256, 2 if args.quick else 6, 500 if args.quick else 8192)
        cases.append(("Hope-ified Llama (SmolLM2-135M widths), T=256", llama))
    except ImportError:  # transformers is an optional dependency
        print("transformers not installed: the Hope-ified Llama is skipped")
    print(f"{args.threads} thread(s), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, median of {steps} "
          f"steps each, the two reads alternating")
    print(f"{'model':48s} {'call':16s} {'fused ms':>9} {'reference ms':>13} {'speed-up':>9}")
    rows = []
    for name, (model, calls) in cases:
        for call, step in calls.items():
            t = compare(model, step, steps)
            rows.append((name, call, t))
            print(f"{name:48s} {call:16s} {t['fused'] * 1e3:9.1f} {t['reference'] * 1e3:13.1f} "
                  f"{t['reference'] / t['fused']:8.2f}x")
    return rows


if __name__ == "__main__":
    main()
