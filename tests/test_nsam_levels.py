"""Levels ordered by frequency (Def 2-4), ``describe`` read from the modules, the CLI and the generated docs."""

import math
from pathlib import Path

import pytest
import torch

from nested_learning.cli import main
from nested_learning.models import build_model, model_names
from nested_learning.nsam import FROZEN, NON_PARAMETRIC, AssociativeMemory, Frequency, NestedSystem, describe
from nested_learning.nsam.tables import levels_report
from nested_learning.optimizers import OPTIMIZER_NAMES, build_optimizer

SMALL = dict(vocab_size=64, dim=16, n_heads=2)


def _mem(name, freq, reads=()):
    return AssociativeMemory(name, "s", "k", "v", "tokens", "L", "rule", "Eq 6", freq, reads)


def test_levels_are_ordered_by_frequency_then_by_dependency():
    system = NestedSystem("toy", [
        _mem("frozen", FROZEN), _mem("reads_a", Frequency.every(4), reads=("a",)),
        _mem("step", Frequency.every(1, "step")), _mem("kv", NON_PARAMETRIC), _mem("a", Frequency.every(4)),
        _mem("fast", Frequency.every(1)),
    ])
    levels = system.levels()
    assert [[m.component for m in lv.memories] for lv in levels] == [
        ["kv"], ["fast"], ["a", "reads_a"], ["step"], ["frozen"]]
    assert [lv.index for lv in levels] == [1, 2, 3, 4, 5]
    # with the tokens of a step known, a step of 4 tokens shares the level of a chunk of 4
    merged = NestedSystem("toy", system.memories, tokens_per_step=4).levels()
    assert [m.component for m in merged[2].memories] == ["step", "a", "reads_a"]


def test_frequency_reads_as_in_the_sources():
    assert str(NON_PARAMETRIC) == "inf" and NON_PARAMETRIC.rate == math.inf
    assert str(FROZEN) == "0"
    assert str(Frequency.every(16)) == "1/16 per token" and str(Frequency.every(1, "step")) == "1 per step"


def _build(name):
    if name != "hopeified":
        return build_model(name, "tiny", **SMALL)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    from nested_learning.models import hopeify

    return hopeify(transformers.LlamaForCausalLM(cfg).eval(), layers=(1,))


@pytest.mark.parametrize("name", model_names())
def test_describe_reads_every_registered_model(name):
    model = _build(name)
    system = describe(model, show=False)
    levels = system.levels()
    rates = [lv.frequency.rate for lv in levels]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates)
    assert levels[-1].frequency.rate == 0  # the slow weights, frozen after training
    assert sum(p.numel() for p in model.parameters()) == sum(
        int(m.state.split()[0].replace(",", "")) for m in levels[-1].memories)
    assert len(levels) >= 2 and levels[0].frequency.rate > 0


def test_describe_shows_the_chunk_sizes_the_model_was_built_with():
    model = build_model("hope", "tiny", **SMALL, chunk_sizes=(8, 32), titans_chunk_size=4)
    table = str(describe(model, show=False))
    assert "1/8 per token" in table and "1/32 per token" in table and "1/4 per token" in table
    assert "1/16 per token" not in table
    first = describe(model, show=False).levels()[0]
    assert first.frequency == Frequency.every(4) and "mixer" in first.memories[0].component


def test_transformer_is_two_levels_and_attention_is_the_fastest():
    levels = describe(build_model("transformer", "tiny", **SMALL), show=False).levels()
    assert len(levels) == 2 and levels[0].frequency.rate == math.inf and levels[1].frequency.rate == 0


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_describe_reads_every_registered_optimizer(name):
    model = build_model("transformer", "tiny", **SMALL)
    optimizer = build_optimizer(name, model, lr=1e-3)
    system = describe(model, optimizer, show=False)
    weights = [m for m in system.memories if m.component.startswith("slow weights")]
    assert weights and all(m.frequency == Frequency.every(1, "step") for m in weights)
    assert all(m.update != "fixed after training" for m in weights)
    memories = [m for m in system.memories if m.context == "gradients"]
    if name not in ("dgd",):
        assert memories, "an optimizer with state shows its memories"
        # within a level, a memory of the gradients comes before the weights that read it (ties by dependency)
        for level in system.levels():
            order = [m.component for m in level.memories]
            for w in (m for m in level.memories if m in weights):
                assert all(order.index(r) < order.index(w.component) for r in w.reads if r in order)
                assert any(r in order for r in w.reads)
    recorder = getattr(optimizer, "recorder", None)
    if recorder is not None:
        recorder.remove()


def test_m3_slow_memory_is_read_at_the_frequency_it_was_built_with():
    model = build_model("hope", "tiny", **SMALL)
    system = describe(model, build_optimizer("m3", model, lr=1e-4, frequency=5), show=False)
    slow = [m for m in system.memories if "slow momentum" in m.component]
    assert slow and slow[0].frequency == Frequency.every(5, "step")
    assert system.levels()[-1].memories == tuple(slow)  # slower than the weights it feeds


def test_describe_prints_the_table(capsys):
    model = build_model("deltanet", "tiny", **SMALL)
    describe(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    out = capsys.readouterr().out
    assert "DeltaNetLM + SGD" in out and "Eq 65" in out and "Eq 10-13" in out


def test_cli_levels(capsys):
    assert main(["levels", "--model", "hope", "--optimizer", "m3", "chunk_sizes=[8,32]", "vocab_size=64"]) == 0
    out = capsys.readouterr().out
    assert "HOPE + M3" in out and "1/8 per token" in out and "Algorithm 1" in out
    assert main(["levels", "--model", "nope"]) == 2


def test_docs_page_is_the_generated_tables():
    page = Path(__file__).resolve().parents[1] / "docs" / "levels.md"
    assert page.read_text() == levels_report("all", "all", markdown=True)
