"""Bad input a user can pass, across models, layers, ops, optimizers, state files and the CLI: each fails at once with
an error of the right type whose message names the argument and the value (no silent garbage, no obscure error from
deep inside)."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from nested_learning.cli import main
from nested_learning.memory import ContinuumMemorySystem, NeuralMemory, SelfModifyingTitans
from nested_learning.models import HOPE, build_model, load_state, save_state
from nested_learning.ops import delta_rule, linear_attention, newton_schulz
from nested_learning.optimizers import (
    DGD,
    M3,
    AdaGradAsMemory,
    AdamAsMemory,
    DeepMomentumGD,
    DeltaRuleMomentum,
    MomentumAsMemory,
    Muon,
    PreconditionedMomentum,
    build_optimizer,
)
from nested_learning.optimizers.registry import OPTIMIZER_NAMES
from nested_learning.training.checkpoint import load_checkpoint

V = 64


def _hope(dim=32):
    return HOPE(vocab_size=V, dim=dim, n_layers=1, n_heads=2, chunk_sizes=(4, 8), cms_expansion=2,
                titans_chunk_size=4).eval()


def _transformer():
    return build_model("transformer", "tiny", vocab_size=V, dim=32, n_layers=1).eval()


def _titans():
    return build_model("titans", "tiny", vocab_size=V, dim=32, n_layers=1, n_heads=2, chunk_size=4).eval()


def _ids(B=2, T=6):
    return torch.randint(0, V, (B, T))


def _state(model, B=2):
    with torch.no_grad():
        return model(_ids(B), labels=None).state


def _labels_with(value, T=6):
    labels = torch.randint(0, V, (2, T))
    labels[1, 2] = value
    return labels


def _qkv(T=10):
    q = torch.randn(1, T, 1, 4)
    k = torch.nn.functional.normalize(torch.randn(1, T, 1, 4), dim=-1)
    return q, k, torch.randn(1, T, 1, 4), torch.rand(1, T, 1), torch.rand(1, T, 1)


def _cast_state(model):
    state = _state(model)
    return dataclasses.replace(state, cms=[c.to(torch.float16) for c in state.cms])


def _params():
    return nn.Linear(4, 4).parameters()


def _in_inference_mode(model):
    with torch.inference_mode():
        model(_ids())


CASES = [
    # ---------------------------------------------------------------- models
    ("hope label -5", lambda: _hope()(_ids(), labels=_labels_with(-5)), ValueError,
     r"labels must lie in \[0, 64\) or be -100 \(ignored\), got -5"),
    ("transformer label -5", lambda: _transformer()(_ids(), labels=_labels_with(-5)), ValueError,
     r"labels .* got -5"),
    ("hope label = vocab", lambda: _hope()(_ids(), labels=_labels_with(V)), ValueError, r"labels .* got 64"),
    ("hope labels all -100", lambda: _hope()(_ids(), labels=torch.full((2, 6), -100)), ValueError,
     r"labels are all -100"),
    ("titans labels all -100", lambda: _titans()(_ids(), labels=torch.full((2, 6), -100)), ValueError,
     r"labels are all -100"),
    ("float labels", lambda: _hope()(_ids(), labels=torch.zeros(2, 6)), TypeError,
     r"labels must be an integer tensor .* got torch.float32"),
    ("labels of another shape", lambda: _transformer()(_ids(), labels=torch.zeros(2, 5, dtype=torch.long)),
     ValueError, r"labels must have shape \(2, 6\).* got \(2, 5\)"),
    ("T = 0", lambda: _hope()(torch.zeros(2, 0, dtype=torch.long)), ValueError,
     r"input_ids must hold at least one .* got shape \(2, 0\)"),
    ("B = 0", lambda: _transformer()(torch.zeros(0, 5, dtype=torch.long)), ValueError,
     r"input_ids must hold .* got shape \(0, 5\)"),
    ("float input_ids", lambda: _titans()(torch.zeros(2, 5)), TypeError, r"input_ids must be an integer tensor"),
    ("token id = vocab", lambda: _hope()(torch.full((1, 3), V)), ValueError, r"token ids must lie in \[0, 64\).* max 64"),
    ("hope state of another batch size", lambda: _hope()(_ids(3), state=_state(_hope())), ValueError,
     r"state field '.*' was made for batch size 2, but input_ids has batch size 3"),
    ("titans state of another batch size", lambda: _titans()(_ids(3), state=_state(_titans())), ValueError,
     r"was made for batch size 2, but input_ids has batch size 3"),
    ("transformer KV cache of another batch size", lambda: _transformer()(_ids(3), state=_state(_transformer())),
     ValueError, r"batch size 2, but input_ids has batch size 3"),
    ("titans state into hope", lambda: _hope()(_ids(), state=_state(_titans())), TypeError,
     r"state must be a CMSLMState .* got LMState"),
    ("hope state into transformer", lambda: _transformer()(_ids(), state=_state(_hope())), TypeError,
     r"state must be a LMState .* got CMSLMState"),
    ("state cast to fp16", lambda: _hope()(_ids(), state=_cast_state(_hope())), TypeError,
     r"state field 'cms\.0\.weights\.0' has dtype torch.float16, .* torch.float32"),
    ("state of a wider model", lambda: _hope(32)(_ids(), state=_state(_hope(16))), ValueError,
     r"state field '.*' has shape .* expects .*another model size"),
    ("generate: empty prompt", lambda: _hope().generate(torch.zeros(1, 0, dtype=torch.long), 3), ValueError,
     r"input_ids \(the prompt\) must hold at least one token"),
    ("generate: top_k = 0", lambda: _transformer().generate(_ids(1), 3, top_k=0), ValueError,
     r"top_k must be an integer >= 1, got 0"),
    ("generate: NaN temperature", lambda: _transformer().generate(_ids(1), 3, temperature=math.nan), ValueError,
     r"temperature must be a finite number >= 0, got nan"),
    ("generate: max_new_tokens -1", lambda: _titans().generate(_ids(1), -1), ValueError,
     r"max_new_tokens must be an integer >= 0, got -1"),
    ("generate: max_new_tokens 2.5", lambda: _titans().generate(_ids(1), 2.5), TypeError,
     r"max_new_tokens must be an integer, got float 2.5"),
    ("HOPE chunk_sizes 16.7", lambda: HOPE(vocab_size=V, dim=32, n_layers=1, chunk_sizes=(16.7, 64)), TypeError,
     r"chunk_sizes\[0\] must be an integer, got float 16.7"),
    ("HOPE under inference_mode", lambda: _in_inference_mode(_hope()), RuntimeError,
     r"torch.inference_mode\(\).* use torch.no_grad\(\)"),
    ("model_overrides.foo", lambda: build_model("hope", "tiny", foo=1), TypeError,
     r"model 'hope' has no setting 'foo'"),
    ("unknown model", lambda: build_model("gpt5"), ValueError, r"unknown model 'gpt5'"),
    # ---------------------------------------------------------------- layers
    ("CMS expansion 0", lambda: ContinuumMemorySystem(16, (4, 8), expansion=0), ValueError,
     r"expansion must be an integer >= 1, got 0"),
    ("CMS chunk size 16.7", lambda: ContinuumMemorySystem(16, (16.7, 64)), TypeError,
     r"chunk_sizes\[0\] must be an integer, got float 16.7"),
    ("CMS chunk sizes not multiples", lambda: ContinuumMemorySystem(16, (16, 40)), ValueError,
     r"chunk_sizes must be non-decreasing multiples .* \(16, 40\)"),
    ("self-modifying Titans chunk_size 2.5", lambda: SelfModifyingTitans(16, 2, chunk_size=2.5), TypeError,
     r"chunk_size must be an integer, got float 2.5"),
    ("neural memory chunk_size 0", lambda: NeuralMemory(16, 2, chunk_size=0), ValueError,
     r"chunk_size must be an integer >= 1, got 0"),
    ("neural memory retention", lambda: NeuralMemory(16, 2, retention="forever"), ValueError,
     r"retention must be one of .* got 'forever'"),
    ("layer input of another width", lambda: SelfModifyingTitans(16, 2)(torch.randn(1, 4, 8)), ValueError,
     r"x must have shape \(batch, seq_len, 16\), got \(1, 4, 8\)"),
    ("integer layer input", lambda: NeuralMemory(16, 2)(torch.ones(1, 4, 16, dtype=torch.long)), TypeError,
     r"x must be a floating-point torch.Tensor, got torch.int64"),
    ("NaN layer input", lambda: ContinuumMemorySystem(16, (4,))(torch.full((1, 4, 16), math.nan)), ValueError,
     r"x must be finite, got nan at index \(0, 0, 0\)"),
    # ---------------------------------------------------------------- ops
    ("delta_rule chunk_size 2.5", lambda: delta_rule(*_qkv(), chunk_size=2.5), TypeError,
     r"chunk_size must be an int, got float 2.5"),
    ("delta_rule negative eta", lambda: delta_rule(*_qkv()[:3], -torch.rand(1, 10, 1), None), ValueError,
     r"eta must be >= 0, got -"),
    ("delta_rule inf key", lambda: delta_rule(_qkv()[0], torch.full((1, 10, 1, 4), math.inf), *_qkv()[2:]),
     ValueError, r"k must be finite, got inf"),
    ("linear_attention mode", lambda: linear_attention(*_qkv()[:3], mode="fast"), ValueError,
     r"mode must be one of .* got 'fast'"),
    ("newton_schulz NaN", lambda: newton_schulz(torch.tensor([[1.0, math.nan], [0.0, 1.0]])), ValueError,
     r"G must be finite, got nan at index \(0, 1\)"),
    ("newton_schulz steps -1", lambda: newton_schulz(torch.eye(3), steps=-1), ValueError,
     r"steps must be an integer >= 0, got -1"),
    # ---------------------------------------------------------------- optimizers
    *[(f"{name} lr=inf", (lambda n: lambda: build_optimizer(n, nn.Linear(4, 4), lr=math.inf))(name), ValueError,
       r"lr must be a finite number >= 0, got inf") for name in OPTIMIZER_NAMES],
    *[(f"{cls.__name__} lr=inf", (lambda c: lambda: c(_params(), lr=math.inf))(cls), ValueError,
       r"lr must be a finite number >= 0, got inf")
      for cls in (DGD, DeltaRuleMomentum, DeepMomentumGD, PreconditionedMomentum, AdamAsMemory, AdaGradAsMemory,
                  MomentumAsMemory, Muon, M3)],
    ("optimizer lr='fast'", lambda: build_optimizer("adamw", nn.Linear(4, 4), lr="fast"), TypeError,
     r"lr must be a number, got str 'fast'"),
    ("optimizer weight_decay NaN", lambda: build_optimizer("sgd", nn.Linear(4, 4), lr=0.1, weight_decay=math.nan),
     ValueError, r"weight_decay must be a finite number >= 0, got nan"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_named_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- state and checkpoint files
def _saved(tmp_path, model=None):
    return save_state(_state(model or _hope()), tmp_path / "s.safetensors")


def _truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return path


FILE_CASES = [
    ("missing state file", lambda p: load_state(p / "nope.safetensors", _hope()), ValueError,
     r"state file '.*nope.safetensors' does not exist"),
    ("empty state file", lambda p: load_state(_truncate(_saved(p), 0), _hope()), ValueError,
     r"state file '.*s.safetensors' is not a readable safetensors file"),
    ("truncated state file", lambda p: load_state(_truncate(_saved(p)), _hope()), ValueError,
     r"state file '.*s.safetensors' is not a readable safetensors file"),
    ("state of a wider model", lambda p: load_state(_saved(p, _hope(32)), _hope(16)), ValueError,
     r"saved state '.*s.safetensors' does not fit the model: '.*' has shape .*another model size"),
    ("state of another model class", lambda p: load_state(_saved(p), _titans()), TypeError,
     r"like must be a model with initial_state\(\)"),
    ("not a state file", lambda p: load_state(_model_file(p), _hope()), ValueError,
     r"is not a saved stream state"),
    ("truncated checkpoint", lambda p: load_checkpoint(_checkpoint(p, truncate=True), _transformer()), ValueError,
     r"checkpoint .*ck is damaged or incomplete"),
]


def _model_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "m.safetensors"))
    return tmp_path / "m.safetensors"


def _checkpoint(tmp_path, truncate=False):
    from nested_learning.training.checkpoint import save_checkpoint

    path = save_checkpoint(tmp_path / "run", 1, _transformer(), {"step": 1})
    path = path.rename(tmp_path / "ck")
    if truncate:
        _truncate(path / "model.safetensors")
    return path


@pytest.mark.parametrize("call, error, message", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_file_raises_a_named_error(tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path)


# ---------------------------------------------------------------- command line
def _broken_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: [transformer\nlr: 3\n")
    return str(p)


CLI_CASES = [
    ("dataset=foo", lambda p: ["train", "dataset=foo"], r"config key 'dataset' must be one of \('corpus',\), got 'foo'"),
    ("grad_accum=0", lambda p: ["train", "grad_accum=0"], r"'grad_accum' must be an integer >= 1, got 0"),
    ("max_steps=-5", lambda p: ["train", "max_steps=-5"], r"'max_steps' must be an integer >= 1, got -5"),
    ("min_lr_ratio=5", lambda p: ["train", "min_lr_ratio=5"], r"'min_lr_ratio' must be a number in \[0, 1\], got 5"),
    ("eval_every=-1", lambda p: ["train", "eval_every=-1"], r"'eval_every' must be an integer >= 0, got -1"),
    ("lr=inf", lambda p: ["train", "lr=inf"], r"'lr' must be a finite number > 0, got inf"),
    ("lr=0", lambda p: ["train", "lr=0"], r"'lr' must be a finite number > 0, got 0"),
    ("betas=[0.9,1.5]", lambda p: ["train", "betas=[0.9,1.5]"], r"'betas' must be two numbers in \[0, 1\)"),
    ("device=foo", lambda p: ["train", "device=foo"], r"config key 'device' must be .* got 'foo'"),
    ("model_overrides.foo=1", lambda p: ["train", f"out_dir={p}/r", "model_overrides.foo=1"],
     r"model 'transformer' has no setting 'foo'"),
    ("model=gpt5", lambda p: ["train", f"out_dir={p}/r", "model=gpt5"], r"unknown model 'gpt5'"),
    ("broken YAML", lambda p: ["train", "--config", _broken_yaml(p)], r"config file '.*bad.yaml' is not valid YAML"),
    ("missing config file", lambda p: ["train", "--config", f"{p}/none.yaml"], r"config file '.*none.yaml' does not exist"),
    ("resume with nothing to resume", lambda p: ["train", f"out_dir={p}/empty", "resume=true"],
     r"resume=true but '.*empty' holds no checkpoint to resume from; set allow_fresh_start=true"),
    ("eval of a missing run", lambda p: ["eval", "--checkpoint", f"{p}/none"], r"--checkpoint '.*none' does not exist"),
    ("eval of a run without checkpoints", lambda p: ["eval", "--checkpoint", str(p)],
     r"--checkpoint '.*': no intact checkpoint found there"),
    ("generate with an empty prompt", lambda p: ["generate", "--checkpoint", str(p), "--prompt", ""],
     r"--prompt must not be empty"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_prints_bad_input_without_a_traceback_and_exits_2(tmp_path, capsys, argv, message):
    assert main(argv(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error: ")
    import re

    assert re.search(message, err), err


def test_state_to_a_dtype_keeps_token_ids_and_counters():
    state = _state(_hope())
    moved = state.to(torch.float64)
    assert moved.pending.dtype == torch.long
    assert all(w.dtype == torch.float64 for c in moved.cms for w in c.weights)


def test_table_size():
    assert len(CASES) + len(FILE_CASES) + len(CLI_CASES) >= 40


def test_a_huge_lr_stops_with_a_message_that_names_it(tmp_path):
    from test_training import _config, _trainer

    from nested_learning.training import TrainingDiverged

    t = _trainer(_config(tmp_path, lr=1e30, max_steps=10, max_bad_steps=3))
    with pytest.raises(TrainingDiverged, match=r"lr=1e\+30 .*a smaller lr usually helps"):
        t.train()


def test_cli_reports_divergence_without_a_traceback(monkeypatch, capsys):
    import nested_learning.training as training

    class Diverging:
        def __init__(self, config):
            pass

        def train(self):
            raise training.TrainingDiverged("5 non-finite steps in a row at step 5; training stopped (lr=1e+30)")

    monkeypatch.setattr(training, "Trainer", Diverging)
    assert main(["train", "lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lr=1e+30" in err
