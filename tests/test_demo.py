"""The demo's plumbing: a failing stage command stops the demo; a stage folder is started over."""

import pytest

from superedit.commands.demo import _run_command, fresh_stage_dir
from superedit.errors import SupereditError


def test_a_failing_stage_command_stops_the_demo(tmp_path):
    with pytest.raises(SupereditError, match=r"superedit lifelong .* failed \(exit 2\)"):
        _run_command(["lifelong", "--edits", "0", "--out", str(tmp_path / "l")])


def test_a_successful_stage_command_passes(tmp_path, monkeypatch):
    """A command that succeeds returns its own value through click (e.g. the result dict): not a failure."""
    import superedit.cli

    monkeypatch.setattr(superedit.cli, "app", lambda args, **kw: {"out": "x", "n": 3})
    _run_command(["info"])  # no exception
    monkeypatch.setattr(superedit.cli, "app", lambda args, **kw: 2)
    with pytest.raises(SupereditError, match="exit 2"):
        _run_command(["info"])


def test_a_stage_folder_is_started_over(tmp_path):
    d = tmp_path / "lifelong"
    (d / "rome").mkdir(parents=True)
    (d / "run.json").write_text("{}")
    assert fresh_stage_dir(d) == d and not d.exists()
    assert fresh_stage_dir(tmp_path / "new") == tmp_path / "new"  # nothing there: nothing to do
