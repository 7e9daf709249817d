"""Hyperparameter models: bounds, strict types, cross-field rules, YAML loading, error messages."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from superedit.editing.hparams import (AlphaEditHParams, D4SHParams, FTHParams, HParams, HParamsError, KeelHParams,
                                       MEMITHParams, ROMEHParams, load_hparams)
from superedit.editing.methods import REGISTRY
from superedit.errors import SupereditError
from superedit.robust.adaptor import AdaptorHParams

ALL = [ROMEHParams, MEMITHParams, FTHParams, D4SHParams, AlphaEditHParams, KeelHParams, AdaptorHParams]


def _write(tmp_path, text: str):
    p = tmp_path / "h.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_every_packaged_profile_loads_and_round_trips():
    root = resources.files("superedit") / "configs" / "hparams"
    classes = {name: entry.hparams_cls for name, entry in REGISTRY.items()} | {"rep": AdaptorHParams}
    seen = 0
    for method_dir in root.iterdir():
        for f in method_dir.iterdir():
            if not f.name.endswith(".yaml"):
                continue
            cls = classes[method_dir.name]
            hp = load_hparams(cls, method_dir.name, f.name[:-5])
            on_disk = yaml.safe_load(f.read_text()) or {}
            assert {k: getattr(hp, k) for k in on_disk} == on_disk  # every YAML value is what the model holds
            assert cls.from_dict(hp.to_dict()) == hp
            seen += 1
    assert seen >= 10


@pytest.mark.parametrize("cls", ALL)
def test_defaults_valid_and_every_field_has_help(cls):
    hp = cls()
    assert cls.from_dict(hp.to_dict()) == hp
    helps = cls.help()
    assert list(helps) == list(cls.model_fields) and all(text.strip() for text in helps.values())


@pytest.mark.parametrize("field, value, expect", [
    ("v_num_grad_steps", 30.7, "whole number"),
    ("v_num_grad_steps", True, "not true/false"),
    ("v_num_grad_steps", -1, "greater than or equal to 0"),
    ("v_lr", True, "number, not true/false"),
    ("v_lr", 0, "greater than 0"),
    ("v_lr", "fast", "must be a number"),
    ("v_lr", float("nan"), "finite"),
    ("v_lr", float("inf"), "finite"),
    ("kl_factor", -0.1, "greater than or equal to 0"),
    ("clamp_norm_factor", [1], "number, not a list"),
    ("layers", [], "at least 1 item"),
    ("layers", [-1], "greater than or equal to 0"),
    ("layers", [1.5], "whole number"),
    ("layers", 3, "valid list"),
    ("layers", [1, 2], "exactly one layer"),
    ("kl_direction", "both", "'edited_orig' or 'orig_edited'"),
    ("fact_token", "first", "'subject_last', 'subject_first' or 'last'"),
    ("context_lengths", [0], "greater than or equal to 1"),
    ("mom2_corpus", 5, "string"),
    ("mom2_n_tokens", 0, "greater than or equal to 1"),
])
def test_invalid_value_names_file_field_and_what_is_accepted(tmp_path, field, value, expect):
    p = _write(tmp_path, yaml.safe_dump({field: value}))
    with pytest.raises(HParamsError) as ei:
        load_hparams(ROMEHParams, "rome", None, p)
    msg = str(ei.value)
    assert str(p) in msg and f"'{field}" in msg and expect in msg, msg
    assert isinstance(ei.value, SupereditError)


def test_integral_float_and_yaml_exponent_strings_are_accepted(tmp_path):
    p = _write(tmp_path, "v_num_grad_steps: 30.0\nmom2_ridge: 1e-3\nmom2_n_tokens: '1e5'\nlayers: [2.0]\n")
    hp = load_hparams(ROMEHParams, "rome", None, p)
    assert (hp.v_num_grad_steps, hp.mom2_ridge, hp.mom2_n_tokens, hp.layers) == (30, 1e-3, 100000, [2])
    assert type(hp.v_num_grad_steps) is int and type(hp.layers[0]) is int


def test_booleans_are_strict():
    assert D4SHParams.from_dict({"project_nullspace": True}).project_nullspace is True
    for bad in (1, "yes", "true", 0.0):
        with pytest.raises(HParamsError, match="project_nullspace.*true or false"):
            D4SHParams.from_dict({"project_nullspace": bad})


def test_cross_field_rules():
    with pytest.raises(HParamsError, match="L2.*project_nullspace"):
        D4SHParams(project_nullspace=True, L2=0.0)
    assert D4SHParams(project_nullspace=False, L2=0.0).L2 == 0.0  # L2 unused without the projection
    with pytest.raises(HParamsError, match="L2.*greater than 0"):
        AlphaEditHParams(L2=0.0)
    with pytest.raises(HParamsError, match="factor.*'cholesky' or 'inverse'"):
        D4SHParams(factor="lu")
    with pytest.raises(HParamsError, match="only once"):
        MEMITHParams(layers=[2, 2])
    with pytest.raises(HParamsError, match="dropout.*less than 1"):
        AdaptorHParams(dropout=1.0)
    with pytest.raises(HParamsError, match="tau.*less than or equal to 1"):
        AdaptorHParams(tau=1.5)


def test_unknown_fields_are_listed_with_the_valid_ones(tmp_path):
    p = _write(tmp_path, "layerz: [2]\nv_lrr: 1\n")
    with pytest.raises(HParamsError) as ei:
        load_hparams(ROMEHParams, "rome", None, p)
    msg = str(ei.value)
    assert str(p) in msg and "['layerz', 'v_lrr']" in msg and "valid fields" in msg and "'v_lr'" in msg


def test_error_names_the_file_the_bad_value_came_from(tmp_path):
    """The packaged profile is fine; the user's file holds the bad value: the message names the user's file."""
    p = _write(tmp_path, "v_lr: -2\n")
    with pytest.raises(HParamsError) as ei:
        load_hparams(ROMEHParams, "rome", "testbed-small", p)
    assert str(ei.value).startswith(f"{p}: field 'v_lr'")
    with pytest.raises(HParamsError, match=r"command-line options: field 'layers\[0\]' = -3"):
        load_hparams(ROMEHParams, "rome", "testbed-small", None, {"layers": [-3]})


@pytest.mark.parametrize("text, expect", [("[1, 2]", "expected a mapping"), ("a: [", "not valid YAML"),
                                          ("- x\n- y", "expected a mapping")])
def test_malformed_yaml(tmp_path, text, expect):
    with pytest.raises(HParamsError, match=expect):
        load_hparams(ROMEHParams, "rome", None, _write(tmp_path, text))


def test_empty_yaml_is_the_defaults(tmp_path):
    assert load_hparams(ROMEHParams, "rome", None, _write(tmp_path, "# nothing\n")) == ROMEHParams()


def test_replace_and_assignment_validate_and_leave_the_original():
    hp = MEMITHParams(layers=[1, 2])
    new = hp.replace(layers=[3], v_lr=2.0)
    assert (new.layers, new.v_lr, hp.layers, hp.v_lr) == ([3], 2.0, [1, 2], 0.5)
    with pytest.raises(HParamsError, match="<replace>: field 'v_lr'"):
        hp.replace(v_lr=-1)
    with pytest.raises(HParamsError, match="unknown field"):
        hp.replace(nope=1)
    with pytest.raises(HParamsError, match="v_num_grad_steps"):
        hp.v_num_grad_steps = 2.5
    assert hp.v_num_grad_steps == MEMITHParams().v_num_grad_steps


def test_constructor_errors_are_hparams_errors():
    with pytest.raises(HParamsError, match=r"ROMEHParams\(…\): field 'v_num_grad_steps' = 30.7"):
        ROMEHParams(v_num_grad_steps=30.7)


def test_lifelong_shim_reexports_the_same_classes():
    from superedit.lifelong import hparams as shim

    assert shim.D4SHParams is D4SHParams and shim.AlphaEditHParams is AlphaEditHParams
    assert issubclass(D4SHParams, HParams)
