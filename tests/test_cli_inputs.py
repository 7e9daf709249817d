"""CLI input handling: help texts from the registries, user errors as exit 2 without a traceback (and
without output files), bugs keep their traceback, whole values in human output, files with the umask's mode."""

from __future__ import annotations

import json
import os
import stat

import pytest
import typer
from typer.testing import CliRunner

from superedit.cli import app
from superedit.commands.common import command, emit, parse_layers
from superedit.errors import SupereditError, UsageError
from superedit.utils.io import apply_umask_modes, atomic_path, write_json_atomic


def _invoke(args):
    return CliRunner().invoke(app, args)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_help_lists_methods_formats_and_sizes_from_their_registries():
    from superedit.data.loaders import FORMATS
    from superedit.editing.methods import REGISTRY
    from superedit.testbed.sizes import SIZES

    edit_help = _flat(_invoke(["edit", "--help"]).output)
    assert f"Editing method: {', '.join(REGISTRY)}." in edit_help
    assert f"Dataset format: {', '.join(('auto',) + tuple(FORMATS))}." in edit_help
    assert f"Comma-separated methods: {', '.join(REGISTRY)}." in _flat(_invoke(["lifelong", "--help"]).output)
    assert f"testbed size ({', '.join(SIZES)})" in _flat(_invoke(["testbed", "build", "--help"]).output)


def test_help_shows_square_brackets_as_written():
    res = _invoke(["robust", "--help"])
    assert res.exit_code == 0 and "subject -> [rephrases]" in _flat(res.output)


def test_human_output_shows_mappings_whole(capsys):
    long = {f"site_{i}": "transformer.h.{l}.mlp.c_proj (input)" * 3 for i in range(12)}
    emit({"model": "m", "sites": long, "ids": list(range(500))}, as_json=False)
    err = capsys.readouterr().err
    assert "…" not in err.split("ids:")[0]  # the mapping: every entry whole, one per line
    for key, value in long.items():
        assert f"  {key}: {value}\n" in err
    assert "(500 items; --json prints them all)" in err  # only a long list is shortened, and says so


def _wrapped(exc: Exception):
    def run(as_json: bool = False):
        raise exc

    return command(run)


def test_command_wrapper_turns_only_superedit_errors_into_exit_2(capsys):
    with pytest.raises(typer.Exit) as ei:
        _wrapped(UsageError("--x 'y': give a number"))(as_json=True)
    assert ei.value.exit_code == 2
    out = capsys.readouterr()
    assert "error: --x 'y': give a number" in out.err
    assert json.loads(out.out.strip().splitlines()[-1]) == {"error": "--x 'y': give a number", "type": "UsageError"}
    for bug in (ValueError("bug"), IndexError("bug"), FileNotFoundError("bug"), KeyError("bug")):
        with pytest.raises(type(bug)):  # a bug keeps its traceback
            _wrapped(bug)()


def test_bad_layers_option_exits_2_saying_what_is_accepted():
    res = _invoke(["stats", "--layers=-1", "--json"])
    assert res.exit_code == 2
    err = json.loads(res.stdout.strip().splitlines()[-1])
    assert err["type"] == "UsageError" and "negative" in err["error"] and "2-6" in err["error"]
    assert isinstance(res.exception, SystemExit)  # a clean exit, not an exception escaping the command


@pytest.mark.parametrize("spec, expect", [("-1", "negative"), ("6-2", "reversed; write it low-high (2-6)"),
                                          ("9", "out of range"), ("x", "not a layer index"), ("", "no layer"),
                                          ("1,,2", "empty item"), ("all,1", "cannot be combined")])
def test_parse_layers_errors(spec, expect):
    with pytest.raises(UsageError) as ei:
        parse_layers(spec, 8)
    assert expect in str(ei.value) and "1,3,5" in str(ei.value) and "0..7" in str(ei.value)


def test_parse_layers_accepts_the_documented_forms():
    assert parse_layers("3", 8) == [3]
    assert parse_layers("2-6", 8) == [2, 3, 4, 5, 6]
    assert parse_layers("5, 1,3", 8) == [1, 3, 5]
    assert parse_layers("1,3-4,4", 8) == [1, 3, 4]
    assert parse_layers("all", 3) == parse_layers(None, 3) == [0, 1, 2]


def test_edit_with_invalid_hparams_exits_2_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("v_num_grad_steps: 30.7\n", encoding="utf-8")
    out = tmp_path / "run"
    res = _invoke(["edit", "--hparams", str(bad), "--out", str(out), "--json"])
    assert res.exit_code == 2, res.output
    err = json.loads(res.stdout.strip().splitlines()[-1])
    assert err["type"] == "HParamsError"
    assert err["error"].startswith(f"{bad}: field 'v_num_grad_steps' = 30.7: must be a whole number")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_testbed_build_with_unknown_size_exits_2_and_writes_nothing(tmp_path):
    res = _invoke(["testbed", "build", "--size", "huge", "--out", str(tmp_path / "tb"), "--json"])
    assert res.exit_code == 2 and "valid sizes" in res.output
    assert list(tmp_path.iterdir()) == []


# ----- file modes -----------------------------------------------------------------------------------------------
@pytest.fixture
def umask():
    def set_umask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    write_json_atomic(tmp_path / "summary.json", {"a": 1})
    assert _mode(tmp_path / "summary.json") == 0o666 & ~mask
    with atomic_path(tmp_path / "model.safetensors") as tmp:  # a writer that recreates the file 0600 (safetensors)
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(tmp, 0o600)
    assert _mode(tmp_path / "model.safetensors") == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "summary.json"]  # no temp files


def test_failed_atomic_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_apply_umask_modes_fixes_a_tree_written_with_private_modes(tmp_path, umask):
    umask(0o027)
    root = tmp_path / "export"
    (root / "sub").mkdir(parents=True)
    for p in (root / "model.safetensors", root / "sub" / "config.json"):
        p.write_text("{}")
        os.chmod(p, 0o600)
    os.chmod(root, 0o700)
    apply_umask_modes(root)
    assert (_mode(root), _mode(root / "sub")) == (0o750, 0o750)
    assert _mode(root / "model.safetensors") == _mode(root / "sub" / "config.json") == 0o640
    assert sorted(p.name for p in root.iterdir()) == ["model.safetensors", "sub"]  # no probe left behind


def test_corrupt_jsonl_is_a_superedit_error(tmp_path):
    from superedit.utils.io import read_jsonl

    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(SupereditError, match="line 2 is not valid JSON"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n{"b": ')  # a torn last line (crash mid-append) is skipped
    assert read_jsonl(p) == [{"a": 1}]


@pytest.mark.parametrize("kw, option", [({"limit": -1}, "--limit"), ({"limit": 0}, "--limit"), ({"n": -3}, "--n")])
def test_request_counts_below_one_are_usage_errors(tmp_path, kw, option):
    from superedit.commands.common import resolve_requests

    with pytest.raises(UsageError, match=f"{option} must be ≥ 1"):
        resolve_requests(tmp_path, None, **kw)


def test_data_lm_eval_task_writes_known_fact_questions_and_refuses_bad_input(tmp_path):
    import json

    recs = [{"case_id": i, "requested_rewrite": {"prompt": "{} is a citizen of", "subject": s, "relation_id": "P27",
                                                 "target_new": {"str": "Peru"}, "target_true": {"str": c}},
             "paraphrase_prompts": [], "neighborhood_prompts": []}
            for i, (s, c) in enumerate([("Ann Berg", "Sweden"), ("Jon Moss", "Canada"), ("Eve Lang", "Chile"),
                                        ("Ida Holm", "Norway"), ("Tom Berg", "Japan")])]
    (tmp_path / "cf.json").write_text(json.dumps(recs))
    res = _invoke(["data", "lm-eval-task", "--requests", str(tmp_path / "cf.json"), "--out", str(tmp_path / "t"),
                   "--name", "probe", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "t" / "probe_known_mc.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
    assert all(r["choices"][r["answer"]] in {"Sweden", "Canada", "Chile", "Norway", "Japan"} for r in rows)
    bad = _invoke(["data", "lm-eval-task", "--requests", str(tmp_path / "cf.json"), "--out", str(tmp_path / "u"),
                   "--name", "Bad-Name"])
    assert bad.exit_code != 0 and "task name" in bad.output and not (tmp_path / "u").exists()
    nolist = _invoke(["lifelong", "--edits", "1", "--lm-eval-include", str(tmp_path / "nowhere"),
                      "--out", str(tmp_path / "run")])
    assert nolist.exit_code != 0 and "--lm-eval-include" in nolist.output
