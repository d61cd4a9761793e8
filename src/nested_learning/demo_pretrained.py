"""The demo's pretrained part: SmolLM2-135M turned into Hope (Sec 7.3), its test-time learning on long held-out
documents (CMS learning vs the original model, both with the same sliding attention window), a generated sample,
and the Hope-ified model saved so that ``nested-learning generate --checkpoint DIR`` runs on it."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from nested_learning.evaluation.pretrained_report import DEFAULT_HOPE


@dataclasses.dataclass
class PretrainedDemoConfig:
    model: str = "smollm2-135m"
    hope: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_HOPE))
    window: int = 256
    docs: int = 2
    tokens: int = 1024
    piece: int = 256
    prompt: str = "The history of the"
    sample_tokens: int = 40
    seed: int = 0


def run_pretrained_demo(cfg: PretrainedDemoConfig, out_dir: str | Path) -> dict:
    from nested_learning.evaluation.pretrained_stream import (
        held_out_documents,
        original_with_window,
        stream_nll,
    )
    from nested_learning.models import hopeify, load_pretrained
    from nested_learning.training.checkpoint import save_checkpoint
    from nested_learning.training.config import TrainConfig

    t0 = time.perf_counter()
    hf, tok = load_pretrained(cfg.model)
    hope = hopeify(hf, tokenizer=tok, window=cfg.window, **cfg.hope)
    original = original_with_window(hf, tok, cfg.window)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"\n== {cfg.model} ({n_params / 1e6:.1f} M parameters) Hope-ified: {cfg.hope}, attention window "
          f"{cfg.window} tokens")
    docs = held_out_documents(tok, cfg.docs, cfg.tokens, cfg.tokens)
    ppl = {}
    for name, model, learn in (("original", original, False), ("cms_on", hope, True)):
        nll = [stream_nll(model, d, cfg.piece, learn) for d in docs]
        ppl[name] = math.exp(sum(a for a, _ in nll) / sum(n for _, n in nll))
    print(f"{cfg.model}: perplexity over {len(docs)} held-out documents of {cfg.tokens} tokens: Hope-ified with "
          f"CMS learning {ppl['cms_on']:.2f}, original {ppl['original']:.2f} ({ppl['original'] / ppl['cms_on']:.3f}x)")
    hope.set_test_time_updates(True)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = hope.generate(torch.tensor([tok.encode(cfg.prompt)]), cfg.sample_tokens, temperature=0.7, top_k=40,
                        generator=gen)
    sample = tok.decode(ids[0].tolist())
    print(f"sample from the Hope-ified {cfg.model}:\n{sample}\n")
    run_dir = Path(out_dir) / "hopeified"
    config = TrainConfig(model="hopeified", size=cfg.model, model_overrides={**cfg.hope, "window": cfg.window},
                         out_dir=str(run_dir))
    save_checkpoint(run_dir, 0, hope, {"config": dataclasses.asdict(config), "step": 0})
    print(f"saved; try: nested-learning generate --checkpoint {run_dir} --prompt \"{cfg.prompt}\"")
    return {"model": cfg.model, "parameters": n_params, "perplexity": ppl, "sample": sample, "checkpoint": str(run_dir),
            "seconds": time.perf_counter() - t0, "config": dataclasses.asdict(cfg)}


def report_lines(r: dict) -> list[str]:
    c = r["config"]
    return [
        "", f"## {r['model']} Hope-ified (Sec 7.3)", "",
        f"MLPs turned into CMS levels ({c['hope']}), attention window {c['window']} tokens; perplexity over "
        f"{c['docs']} held-out documents of {c['tokens']} tokens read in pieces of {c['piece']}.", "",
        "| model | perplexity |", "| --- | ---: |",
        f"| original {r['model']} (same window) | {r['perplexity']['original']:.2f} |",
        f"| Hope-ified, CMS learning at test time | {r['perplexity']['cms_on']:.2f} |", "",
        f"Sample (temperature 0.7, prompt `{c['prompt']}`):", "", "```", r["sample"], "```", "",
        f"Saved to `{r['checkpoint']}`: `nested-learning generate --checkpoint {r['checkpoint']} --prompt "
        f"\"{c['prompt']}\"`.",
    ]
