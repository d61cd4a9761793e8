import pytest

from nested_learning.cli import main
from nested_learning.training import TrainConfig, apply_overrides, load_config


def test_overrides_are_typed():
    c = load_config(None, ["lr=1e-3", "max_steps=7", "tensorboard=false", "max_docs=none", "betas=[0.8,0.9]",
                           "model_overrides.dim=64"])
    assert c.lr == 1e-3 and c.max_steps == 7 and c.tensorboard is False and c.max_docs is None
    assert c.betas == (0.8, 0.9) and c.model_overrides == {"dim": 64}


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: transformer\nmax_steps: 11\nlr: 0.01\n")
    c = load_config(p, ["max_steps=3"])
    assert (c.max_steps, c.lr) == (3, 0.01)


@pytest.mark.parametrize(
    "item, message",
    [("lrr=1", "unknown config key 'lrr'"), ("max_steps=abc", "max_steps"), ("max_steps=1.5", "max_steps"),
     ("tensorboard=3", "tensorboard"), ("noequals", "key=value"), ("lr.x=1", "not a mapping")],
)
def test_bad_override_names_the_key(item, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [item])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("max_stepz: 3\n")
    with pytest.raises(ValueError, match="max_stepz"):
        load_config(p)


def test_cli_reports_bad_override(capsys):
    assert main(["train", "bogus=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err


def test_apply_overrides_keeps_defaults():
    assert apply_overrides(TrainConfig(), {}) == TrainConfig()


def test_cli_passes_experiment_arguments_through(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    assert "--preset" in capsys.readouterr().out
