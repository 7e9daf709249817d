"""`superedit edit` measures whether the model knows each request's target_true before editing."""

from __future__ import annotations

import json

import pytest

from helpers import SHARED_DATA


def test_edit_warns_about_unknown_facts_and_only_known_refuses_cleanly(tmp_path):
    from typer.testing import CliRunner

    from superedit.cli import app

    src = SHARED_DATA / "counterfact_sample.json"
    if not src.is_file():
        pytest.skip(f"shared data missing: {src}")
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(app, ["--threads", "1", "edit", "--model", "builtin", "--requests", str(src), "--limit", "2",
                              "--gen-tokens", "0", "--greedy-tokens", "0", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["known_check"]["n_checked"] == 2 and summary["known_check"]["n_unknown"] == 2
    assert "does not know 2 of 2" in res.stderr and "--only-known" in res.stderr
    refused = tmp_path / "refused"
    res = runner.invoke(app, ["--threads", "1", "edit", "--model", "builtin", "--requests", str(src), "--limit", "2",
                              "--only-known", "--out", str(refused), "--json"])
    assert res.exit_code == 2 and "knows none" in res.stdout and not refused.exists()
