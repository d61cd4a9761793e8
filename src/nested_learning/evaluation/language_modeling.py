"""Language modelling: validation perplexity, and streaming perplexity over long held-out documents.

Streaming perplexity reads each document in chunks of ``chunk`` tokens and scores every token (but the first) once:

* ``carried``: the state is carried from chunk to chunk, so the model conditions on the whole document so far
  (a Transformer through its KV cache, a recurrent memory through its fast weights);
* ``reset``: every chunk starts from a fresh state: the model sees only the chunk, the reference a memory must beat;
* ``updates_on`` / ``updates_off``: ``carried`` with test-time memory updates switched on / off, for models that
  have the switch (HOPE's CMS levels learn from the document as it streams); None for the others.

Documents come from the test split of the corpus (never trained on): the first ``n_docs`` (in the corpus' fixed
order) with at least ``min_tokens`` tokens, cut to ``max_tokens``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nested_learning.evaluation.backbone import PretrainConfig, pretrain, quick_pretrain_config
from nested_learning.evaluation.harness import (
    has_test_time_switch,
    save_backbone,
    test_time_updates,
    write_json,
)


@dataclasses.dataclass
class StreamConfig:
    n_docs: int = 4
    min_tokens: int = 1024
    max_tokens: int = 2048
    chunk: int = 256
    split: str = "test"


def long_documents(cfg: StreamConfig) -> list[list[int]]:
    from nested_learning.data import get_tokenizer, load_lm_documents

    tok = get_tokenizer()
    docs = []
    for text in load_lm_documents(cfg.split):
        ids = tok.encode(text)
        if len(ids) >= cfg.min_tokens:
            docs.append(ids[: cfg.max_tokens])
            if len(docs) == cfg.n_docs:
                break
    if not docs:
        raise ValueError(f"no {cfg.split} document has {cfg.min_tokens} tokens")
    return docs


@torch.no_grad()
def streaming_nll(model: torch.nn.Module, docs: list[list[int]], chunk: int, carry: bool = True) -> float:
    """Mean next-token loss (nats) over ``docs`` read in chunks, with or without carrying the state."""
    model.eval()
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([doc])
        state = None
        for lo in range(0, len(doc) - 1, chunk):
            x, y = ids[:, lo : lo + chunk], ids[0, lo + 1 : lo + chunk + 1]
            out = model(x, state=state if carry else None)
            state = out.state
            logits = out.logits[0, : len(y)].float()
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            count += len(y)
    return total / count


def streaming_perplexities(model: torch.nn.Module, docs: list[list[int]], chunk: int) -> dict[str, float | None]:
    """Perplexity in each reading mode of the module docstring."""
    ppl = {"reset": math.exp(streaming_nll(model, docs, chunk, carry=False)), "updates_on": None, "updates_off": None}
    if not has_test_time_switch(model):
        ppl["carried"] = math.exp(streaming_nll(model, docs, chunk))
        return ppl
    for key, flag in (("updates_on", True), ("updates_off", False)):
        with test_time_updates(model, flag):
            ppl[key] = math.exp(streaming_nll(model, docs, chunk))
    # carried = the model's own default setting, already measured above
    ppl["carried"] = ppl["updates_on"] if getattr(model, "test_time_updates", True) else ppl["updates_off"]
    return ppl


def run_lm_suite(name: str, pre: PretrainConfig, stream: StreamConfig, seed: int = 0,
                 run_dir: str | Path = "runs/lm", backbone_path: str | Path | None = None) -> dict:
    """Pre-train ``name``, then measure validation and streaming perplexity; saves the backbone if asked."""
    t0 = time.perf_counter()
    model, summary, meta = pretrain(name, pre, seed, run_dir)
    if backbone_path is not None:
        save_backbone(model, backbone_path, meta)
    t1 = time.perf_counter()
    streaming = streaming_perplexities(model, long_documents(stream), stream.chunk)
    return {
        "model": name, "seed": seed, "backbone": meta, "config": dataclasses.asdict(pre),
        "stream_config": dataclasses.asdict(stream),
        "parameters": sum(p.numel() for p in model.parameters()),
        "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"],
        "tokens_per_s": summary["tokens_per_s"], "history": summary["history"],
        "streaming_ppl": streaming, "has_test_time_updates": has_test_time_switch(model),
        "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1,
    }


def main(argv: list[str] | None = None) -> int:
    """``train_lm.py --model hope --size tiny --dataset corpus --optimizer adamw [--steps N] [--quick]``."""
    from nested_learning.models import model_names

    p = argparse.ArgumentParser(description="Train a language model on the corpus; report validation and "
                                            "streaming perplexity.")
    p.add_argument("--model", default="hope", help=f"one of the registered models: {', '.join(model_names())}")
    p.add_argument("--size", default="tiny", help="tiny, small, 760M, 1.3B")
    p.add_argument("--dataset", default="corpus", choices=["corpus"],
                   help="the English corpus of the installed packages (no download)")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max_docs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON result path (default results/train_lm_<model>.json)")
    p.add_argument("--save_backbone", default=None, help="also save the trained weights here (.pt)")
    p.add_argument("--quick", action="store_true", help="a tiny model and tiny data: finishes in seconds")
    args = p.parse_args(argv)
    out = Path(args.out or f"results/train_lm_{args.model}.json")
    if args.quick:
        pre = dataclasses.replace(quick_pretrain_config(), optimizer=args.optimizer)
        stream = StreamConfig(n_docs=1, min_tokens=64, max_tokens=96, chunk=32)
    else:
        pre = PretrainConfig(size=args.size, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                             lr=args.lr, optimizer=args.optimizer, max_docs=args.max_docs)
        stream = StreamConfig()
    result = run_lm_suite(args.model, pre, stream, args.seed, out.parent / f"runs/train_lm_{args.model}",
                          args.save_backbone)
    write_json(out, result)
    s = result["streaming_ppl"]
    print(f"{args.model}: val ppl {result['val_ppl']:.1f}; streaming ppl carried {s['carried']:.1f}, "
          f"reset {s['reset']:.1f}, updates on {s['updates_on']}, off {s['updates_off']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
