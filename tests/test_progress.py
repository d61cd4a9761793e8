"""Progress reports: a tqdm bar in a terminal, plain lines every N seconds in a log file."""

import io
import sys

import pytest

from nested_learning import progress as prog


def test_lines_every_interval_and_at_the_end():
    out = io.StringIO()
    bar = prog.LineProgress(total=4, desc="train hope", every=0.0, file=out)
    for _ in range(4):
        bar.update(1)
        bar.set_postfix(loss="3.210")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()  # steps 1-3, then the final line
    assert lines[1].startswith("train hope: 2/4 (50%), ") and "s left" in lines[1] and lines[1].endswith("loss=3.210")
    assert lines[-1].startswith("train hope: 4/4 (100%), ") and "(done)" in lines[-1]


def test_a_due_line_shows_the_values_set_after_the_update():
    out = io.StringIO()
    bar = prog.LineProgress(total=4, desc="d", every=0.0, file=out)
    bar.update(1)
    assert out.getvalue() == ""
    bar.set_postfix(loss=1)
    assert out.getvalue().startswith("d: 1/4 (25%), ") and out.getvalue().endswith("s left, loss=1\n")
    bar.update(1)  # no postfix this time: printed at the next update
    bar.update(1)
    assert out.getvalue().splitlines()[-1].startswith("d: 3/4 (75%), ")


def test_nothing_between_intervals_and_nothing_when_disabled():
    out = io.StringIO()
    with prog.LineProgress(range(100), desc="x", every=3600, file=out) as bar:
        assert sum(1 for _ in bar) == 100
    assert out.getvalue().count("\n") == 1  # only the final line
    quiet = io.StringIO()
    for _ in prog.LineProgress(range(3), every=0, disable=True, file=quiet):
        pass
    assert quiet.getvalue() == ""


def test_the_helper_picks_tqdm_only_for_a_terminal(monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(prog.progress(total=3), prog.LineProgress)
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    bar = prog.progress(total=3, desc="t")
    assert not isinstance(bar, prog.LineProgress)
    bar.close()


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(prog.ENV_EVERY, "5")
    assert prog.LineProgress(total=1).every == 5.0
    monkeypatch.setenv(prog.ENV_EVERY, "soon")
    with pytest.raises(ValueError, match="number of seconds"):
        prog.report_every()


def test_the_trainer_reports_lines_in_a_log(tmp_path, capsys, monkeypatch):
    from test_training import _config, _trainer

    monkeypatch.setenv(prog.ENV_EVERY, "0")
    _trainer(_config(tmp_path, max_steps=3, progress=True)).train()
    err = capsys.readouterr().err
    assert "train transformer: 3/3 (100%)" in err and "\r" not in err
