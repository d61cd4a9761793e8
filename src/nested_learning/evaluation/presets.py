"""Sizes of the report's runs, by name: ``quick`` (seconds to a minute; tests) and ``small`` (about 2 hours of runs on
two CPU cores for five models, less with several processes side by side).

What ``small`` buys on two CPU cores: the GPT-2 vocabulary makes the output layer the dominant cost of every
corpus-based suite (50,257 x dim multiply-adds per token), so the LM, continual-learning and NIAH suites use one
seed and small token budgets, and the synthetic suites (vocabularies of 9-80 tokens, cheap) use three seeds. A YAML
file (``configs/report_small.yaml``) may override any field: ``{pretrain: {steps: 400}, seeds: {lm: [0, 1]}}``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from nested_learning.evaluation.backbone import QUICK_OVERRIDES, PretrainConfig
from nested_learning.evaluation.continual import CLConfig
from nested_learning.evaluation.language_modeling import StreamConfig
from nested_learning.evaluation.long_context import NIAHConfig
from nested_learning.evaluation.synthetic_suite import SyntheticConfig

SUITES = ("lm", "continual", "niah", "synthetic")
BENCHMARKS = ("clinc", "banking", "dbpedia")


@dataclasses.dataclass
class ReportPreset:
    name: str
    seeds: dict  # suite -> tuple of seeds
    pretrain: PretrainConfig
    stream: StreamConfig
    continual: CLConfig
    niah: NIAHConfig
    synthetic: SyntheticConfig
    benchmarks: tuple = BENCHMARKS
    suites: tuple = SUITES
    threads: int = 0  # torch threads for the whole report; 0: torch's default (1 is faster on a busy machine)


def quick() -> ReportPreset:
    return ReportPreset(
        name="quick",
        seeds={s: (0,) for s in SUITES},
        # chunk sizes below seq_len: every CMS level steps, and so trains, inside a training window
        pretrain=PretrainConfig(overrides=dict(QUICK_OVERRIDES, chunk_sizes=(4, 8, 16)), steps=3, seq_len=32,
                                batch_size=2, max_docs=200,
                                eval_batches=1, progress=False),
        stream=StreamConfig(n_docs=1, min_tokens=64, max_tokens=96, chunk=32),
        continual=CLConfig(n_tasks=2, classes_per_task=2, train_per_class=2, test_per_class=2, epochs=1,
                           fisher_samples=2, max_text_tokens=16, progress=False),
        niah=NIAHConfig(train_length=160, train_steps=2, batch_size=2, train_max_docs=200, eval_lengths=(192, 256),
                        n_eval=1, chunk=128, progress=False),
        synthetic=SyntheticConfig(steps=2, batch_size=4, n_test=8, overrides={"dim": 32, "n_layers": 1},
                                  progress=False),
    )


def small() -> ReportPreset:
    # Measured (docs/results/report_small, 1 thread per process, 3-10 processes side by side on 2 cores, so every
    # figure is inflated by the load): LM 461-919 s per model, continual 227-538 s for the three benchmarks, NIAH
    # 128-1,631 s (a 16K prompt is 16K x 50,257 logits), synthetic 357-4,973 s for three seeds; Transformer++ is
    # the cheapest and HOPE the dearest. 14,473 s summed, about 95 minutes of wall time.
    return ReportPreset(
        name="small",
        seeds={"lm": (0,), "continual": (0,), "niah": (0,), "synthetic": (0, 1, 2)},
        # 512-token windows (2 x 512 tokens a step, as many as 8 x 128): the slowest CMS level (C = 256) steps at 256
        # inside every window, so its rate and weights train; at 128 it never stepped in training
        pretrain=PretrainConfig(size="tiny", steps=200, seq_len=512, batch_size=2, lr=3e-3, max_docs=5000,
                                eval_batches=5),
        stream=StreamConfig(n_docs=3, min_tokens=1024, max_tokens=1024, chunk=256),
        continual=CLConfig(n_tasks=4, classes_per_task=3, train_per_class=6, test_per_class=3, epochs=2,
                           batch_size=6, fisher_samples=12, icl_shots=1, max_text_tokens=32),
        niah=NIAHConfig(train_length=256, train_steps=30, batch_size=2, train_max_docs=2000,
                        eval_lengths=(1024, 4096, 16384), n_eval=1, chunk=1024),
        synthetic=SyntheticConfig(steps=100, batch_size=32, n_test=128),
    )


PRESETS = {"quick": quick, "small": small}


def get_preset(name: str, config_file: str | Path | None = None) -> ReportPreset:
    """The named preset, with the fields of ``config_file`` (YAML) applied on top if given."""
    if name not in PRESETS:
        raise ValueError(f"unknown report preset {name!r}; choose from {sorted(PRESETS)}")
    preset = PRESETS[name]()
    if config_file is not None:
        preset = apply_yaml(preset, yaml.safe_load(Path(config_file).read_text()) or {})
    return preset


def apply_yaml(preset: ReportPreset, data: dict) -> ReportPreset:
    """Override fields of ``preset``; nested dataclasses take a mapping of their own fields."""
    changes = {}
    for key, value in data.items():
        if not hasattr(preset, key):
            raise ValueError(f"unknown report preset field {key!r}")
        current = getattr(preset, key)
        if dataclasses.is_dataclass(current):
            bad = set(value) - {f.name for f in dataclasses.fields(current)}
            if bad:
                raise ValueError(f"unknown fields {sorted(bad)} for {key!r}")
            value = dataclasses.replace(current, **{k: tuple(v) if isinstance(v, list) else v
                                                    for k, v in value.items()})
        elif key == "seeds":
            value = {**current, **{k: tuple(v) for k, v in value.items()}}
        elif isinstance(value, list):
            value = tuple(value)
        changes[key] = value
    return dataclasses.replace(preset, **changes)
