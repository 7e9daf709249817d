"""Property-based tests (hypothesis): malformed request records, hparams YAML and option strings give a
SupereditError with a message (never another exception), and a failed load writes nothing."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from superedit.commands.common import parse_layers  # noqa: E402
from superedit.data import EditRequest, load_requests  # noqa: E402
from superedit.editing.hparams import (AlphaEditHParams, D4SHParams, FTHParams, HParamsError, MEMITHParams,  # noqa: E402
                                       ROMEHParams, load_hparams)
from superedit.errors import SupereditError, UsageError  # noqa: E402
from superedit.robust.adaptor import AdaptorHParams  # noqa: E402

SETTINGS = settings(max_examples=int(os.environ.get("HYP_N", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, width=32)
                | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)

# one valid record of each format
BASE = {
    "counterfact": {"case_id": 0, "pararel_idx": 1,
                    "requested_rewrite": {"prompt": "{} is owned by", "relation_id": "P127", "subject": "Google Trends",
                                          "target_new": {"id": "Q1", "str": "Seoul"},
                                          "target_true": {"id": "Q2", "str": "Google"}},
                    "paraphrase_prompts": ["Google Trends owner"], "neighborhood_prompts": ["Cloud Datalab, by"],
                    "attribute_prompts": ["Gangnam Station owner"],
                    "generation_prompts": ["The trademark of Google Trends is owned by"]},
    "easyedit": {"case_id": 3, "prompt": "Apple A5 was created by", "target_new": "Google", "target_true": "Apple",
                 "subject": "Apple A5", "rephrase_prompt": ["The A5 was created by the company"],
                 "locality_prompt": ["MessagePad, created by"], "locality_ground_truth": "Apple",
                 "subject_rephrase": ["A5 chip from Apple"]},
    "zsre": {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
             "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
             "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
             "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"},
    "superedit": EditRequest(prompt="{} is owned by", subject="Google Trends", target_new="Seoul",
                             target_true="Google", paraphrase_prompts=["Google Trends owner"]).to_dict(),
}


def _paths(record: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in record.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out.extend(_paths(value, prefix + (key,)))
    return out


@st.composite
def mutated_records(draw):
    fmt = draw(st.sampled_from(sorted(BASE)))
    record = copy.deepcopy(BASE[fmt])
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(record)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = record
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["set", "delete", "same_target", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "set":
            parent[path[-1]] = draw(json_values)
        elif action == "add":
            parent[draw(st.text(min_size=1, max_size=6))] = draw(json_values)
        elif fmt in ("easyedit", "superedit"):
            record["target_new"] = record.get("target_true")
    return fmt, record


def _check_requests(reqs):
    for r in reqs:
        assert isinstance(r, EditRequest)
        assert r.prompt.count("{}") == 1 and r.subject and r.target_new
        assert r.target_new != r.target_true


@SETTINGS
@given(mutated_records(), st.booleans(), st.sampled_from(["auto", "given"]))
def test_malformed_request_records_give_a_clear_error(case, jsonl, how):
    fmt, record = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("r.jsonl" if jsonl else "r.json")
        path.write_text(json.dumps(record) + "\n" if jsonl else json.dumps([record]), encoding="utf-8")
        before = sorted(os.listdir(d))
        try:
            reqs = load_requests(path, fmt="auto" if how == "auto" else fmt)
        except SupereditError as exc:
            assert str(exc).strip()
            assert str(path) in str(exc) or path.name in str(exc), str(exc)
        else:
            _check_requests(reqs)
        assert sorted(os.listdir(d)) == before  # loading never writes


@SETTINGS
@given(st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8")))
def test_arbitrary_request_file_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.json"
        path.write_bytes(data)
        try:
            _check_requests(load_requests(path))
        except SupereditError as exc:
            assert str(exc).strip()


def test_target_new_equal_to_target_true_is_rejected_naming_the_record(tmp_path):
    record = dict(BASE["easyedit"], target_new="Apple")
    path = tmp_path / "r.json"
    path.write_text(json.dumps([BASE["easyedit"], record]), encoding="utf-8")
    with pytest.raises(SupereditError) as ei:
        load_requests(path)
    msg = str(ei.value)
    assert f"{path}, record #1" in msg and "target_new" in msg and "target_true" in msg and "remove this record" in msg


# ----- hparams YAML ------------------------------------------------------------------------------------------
HP_CLASSES = [ROMEHParams, MEMITHParams, FTHParams, D4SHParams, AlphaEditHParams, AdaptorHParams]


@st.composite
def hparams_documents(draw):
    cls = draw(st.sampled_from(HP_CLASSES))
    names = sorted(cls.model_fields) + ["layerz", "lr_"]
    values = json_scalars | st.lists(st.integers(-3, 12) | st.floats(-2, 12, allow_nan=False), max_size=3) | json_values
    doc = draw(st.dictionaries(st.sampled_from(names), values, max_size=4))
    return cls, doc


@SETTINGS
@given(hparams_documents())
def test_hparams_yaml_either_validates_or_names_the_file(case):
    cls, doc = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        try:
            hp = load_hparams(cls, "x", None, path)
        except HParamsError as exc:
            assert str(path) in str(exc), str(exc)
        else:
            assert cls.from_dict(hp.to_dict()) == hp
            for name, info in cls.model_fields.items():
                if info.annotation is int or "int" in str(info.annotation):
                    value = getattr(hp, name)
                    assert all(type(v) is int for v in (value if isinstance(value, list) else [value]))
            for name, value in doc.items():
                if isinstance(value, bool):  # a YAML true/false was only accepted by a boolean field
                    assert type(getattr(hp, name)) is bool


@SETTINGS
@given(st.sampled_from(["v_num_grad_steps", "n_prefixes", "mom2_n_tokens", "seed"]),
       st.floats(0, 1e6, allow_nan=False).filter(lambda x: not float(x).is_integer()))
def test_fractional_value_for_an_integer_field_is_an_error_naming_it(name, value):
    with pytest.raises(HParamsError, match=f"'{name}' = "):
        ROMEHParams.from_dict({name: value}, source="f.yaml")


@SETTINGS
@given(st.text(max_size=80))
@example("?")  # YAML for {None: None}: a key that is no text (found by this test)
@example("1: 2")
def test_arbitrary_yaml_text(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "h.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_hparams(MEMITHParams, "x", None, path)
        except HParamsError as exc:
            assert str(path) in str(exc)


# ----- option strings ----------------------------------------------------------------------------------------
layer_specs = st.one_of(
    st.text(alphabet="0123456789-, al", max_size=12),
    st.text(max_size=8),
    st.lists(st.integers(-2, 9), min_size=1, max_size=4).map(lambda xs: ",".join(map(str, xs))),
    st.tuples(st.integers(-2, 9), st.integers(-2, 9)).map(lambda ab: f"{ab[0]}-{ab[1]}"),
)


@SETTINGS
@given(layer_specs, st.integers(1, 8))
def test_layer_specs_parse_or_say_what_is_accepted(spec, n_layers):
    try:
        layers = parse_layers(spec, n_layers)
    except UsageError as exc:
        msg = str(exc)
        assert msg.startswith(f"--layers {spec!r}:") and "'all'" in msg and f"0..{n_layers - 1}" in msg
    else:
        assert layers == sorted(set(layers)) and layers and all(0 <= l < n_layers for l in layers)


@SETTINGS
@given(st.sets(st.integers(0, 7), min_size=1), st.integers(0, 7), st.integers(0, 7))
def test_layer_specs_mean_what_they_say(chosen, a, b):
    assert parse_layers(",".join(map(str, sorted(chosen, reverse=True))), 8) == sorted(chosen)
    lo, hi = min(a, b), max(a, b)
    assert parse_layers(f"{lo}-{hi}", 8) == list(range(lo, hi + 1))
    if a > b:
        with pytest.raises(UsageError, match="reversed"):
            parse_layers(f"{a}-{b}", 8)


@pytest.mark.parametrize("text", ["[" * 50000 + "]" * 50000, "{\"a\":" * 50000 + "1" + "}" * 50000])
def test_deeply_nested_json_is_a_request_format_error(tmp_path, text):
    path = tmp_path / "r.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SupereditError, match="nested too deeply"):
        load_requests(path)
