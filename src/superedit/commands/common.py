"""Shared CLI plumbing: options, the JSON result line, user-facing errors."""

from __future__ import annotations

import functools
import json
import re
import sys
from typing import Any, Callable

import typer

from ..errors import SupereditError, UsageError
from ..utils.logs import setup_logging

MODEL_HELP = ("HF model directory, hub id, 'pretrained:NAME' (a real model installed offline from the package "
              "registry: smollm2-135m, gemma3-270m; see `superedit models list`), or 'builtin[:SIZE]' (the built-in "
              "testbed; default).")
ModelOpt = typer.Option("builtin", "--model", "-m", help=MODEL_HELP)
JsonOpt = typer.Option(False, "--json", help="Print one JSON object with the results as the last line of stdout.")
DeviceOpt = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu).")
DtypeOpt = typer.Option(None, "--dtype", help="Weights' dtype: float32 (default), bfloat16 or float16 (bf16, fp16); "
                        "keys, values and solves still gather in float64 and are cast back to the weight's dtype.")
DeviceMapOpt = typer.Option(None, "--device-map", help="Place a model that does not fit one device with "
                            "accelerate/transformers: 'auto', 'balanced', 'balanced_low_0', 'sequential', one device, or "
                            "a JSON object module → device. Every edited layer must stay resident (no disk/CPU "
                            "offload); instead of --device. Needs accelerate (pip install accelerate).")


def method_choices() -> str:
    """The registered editing methods, for help texts ("rome, memit, ft, d4s, alphaedit")."""
    from ..editing.methods import REGISTRY

    return ", ".join(REGISTRY)


def format_choices() -> str:
    """The dataset formats the loaders read, for help texts ("auto, counterfact, …")."""
    from ..data.loaders import FORMATS

    return ", ".join(("auto",) + tuple(FORMATS))


def size_choices() -> str:
    """The testbed sizes, for help texts ("micro, tiny, small, base, wide")."""
    from ..testbed.sizes import SIZES

    return ", ".join(SIZES)


def default_device(device: str | None, device_map: str | None = None) -> str | None:
    """``--device`` as given, else cuda when available, else cpu; None when ``--device-map`` places the model."""
    if device:
        return device
    if device_map is not None:
        return None
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


LIST_PREVIEW_CHARS = 300


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print ``result``: as one JSON line on stdout with --json, else readable lines on stderr.

    Human output shows scalars and mappings whole (a mapping one ``key: value`` line per entry); only a
    list longer than ``LIST_PREVIEW_CHARS`` as JSON is shortened, saying how many items it has."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=_default) + "\n")
        sys.stdout.flush()
        return
    for line in human_lines(result):
        typer.echo(line, err=True)


def human_lines(result: dict[str, Any], indent: str = "") -> list[str]:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.extend(human_lines(value, indent + "  "))
            continue
        if isinstance(value, (dict, list, tuple)):
            text = json.dumps(value, default=_default)
            if len(text) > LIST_PREVIEW_CHARS:
                text = f"{text[:LIST_PREVIEW_CHARS]} … ({len(value)} items; --json prints them all)"
            value = text
        lines.append(f"{indent}{key}: {value}")
    return lines


def _default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def command(fn: Callable) -> Callable:
    """Decorator: set up logging and turn a :class:`SupereditError` (bad input: the message says what to do)
    into a clean exit 2. Any other exception is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging(verbose=bool(kwargs.get("verbose", False)))
        try:
            return fn(*args, **kwargs)
        except SupereditError as exc:
            typer.echo(f"error: {exc}", err=True)
            if kwargs.get("as_json"):
                sys.stdout.write(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
            raise typer.Exit(code=2) from None

    return wrapper


LAYERS_ACCEPTED = "a layer (3), a range (2-6), a list (1,3,5 or 1,3-5) or 'all'"
_LAYER_PART = re.compile(r"^([0-9]+)(?:\s*-\s*([0-9]+))?$", re.ASCII)


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'3' | '2-6' | '1,3,5' | '1,3-5' | 'all' (or None) → sorted layer list, each checked against the model.

    Raises :class:`UsageError` naming the part that is wrong and what is accepted."""
    if spec is None or str(spec).strip().lower() == "all":
        return list(range(n_layers))
    spec = str(spec)
    where = f"this model has layers 0..{n_layers - 1}"

    def bad(problem: str) -> UsageError:
        return UsageError(f"--layers {spec!r}: {problem}; give {LAYERS_ACCEPTED}; {where}")

    layers: set[int] = set()
    parts = [part.strip() for part in spec.split(",")]
    if not any(parts):
        raise bad("no layer given")
    for part in parts:
        if not part:
            raise bad("empty item between commas")
        m = _LAYER_PART.match(part)
        if m is None:
            if re.fullmatch(r"-\s*[0-9]+(\s*-.*)?", part, re.ASCII):
                raise bad(f"{part!r} is negative; layers count from 0 (no negative indices)")
            if part.lower() == "all":
                raise bad("'all' cannot be combined with other layers")
            raise bad(f"{part!r} is not a layer index or a range a-b of them")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise bad(f"range {part!r} is reversed; write it low-high ({b}-{a})")
        if b >= n_layers:
            out = f"{a}" if a == b else f"{a}-{b}"
            raise bad(f"layer(s) {out} out of range")
        layers.update(range(a, b + 1))
    return sorted(layers)


# ----- model directory, hyperparameters, requests, statistics (shared by the editing commands) -------------
DEFAULT_TESTBED_N = 20


def local_model_dir(model: str):
    """The local directory of ``--model`` (builtin specs resolved), or None for a hub id."""
    from pathlib import Path

    from ..models.loading import resolve_model_path

    path, is_local = resolve_model_path(model)
    return Path(path) if is_local else None


def testbed_meta(model_dir) -> dict | None:
    """The testbed.json of a testbed model directory, else None."""
    if model_dir is None or not (model_dir / "testbed.json").is_file():
        return None
    try:
        return json.loads((model_dir / "testbed.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def hparams_profile(adapter, model_dir) -> str:
    """Packaged hyperparameter profile, by model identity: ``testbed-<size>`` for a testbed model, the
    profile its provenance file names for a converted pretrained model (``pretrained:smollm2-135m`` →
    ``smollm2-135m``), else the model family."""
    from ..models.pretrained import read_provenance

    prov = read_provenance(model_dir)
    if prov is not None and prov.get("profile"):
        return str(prov["profile"])
    meta = testbed_meta(model_dir)
    if meta is not None:
        size = meta.get("size")
        if not size:
            return "testbed"
        from ..testbed.sizes import SIZES

        spec = SIZES.get(size)
        return f"testbed-{(spec.hparams_size if spec and spec.hparams_size else size)}"
    return adapter.family


def resolve_requests(model_dir, requests: str | None, fmt: str = "auto", limit: int | None = None,
                     n: int | None = None, seed: int = 0, default_n: int = DEFAULT_TESTBED_N) -> list:
    """``--requests FILE`` (first ``limit``, then a seeded sample of ``n``), else a testbed's own
    counterfactual requests (``n`` or ``limit`` or ``default_n`` of them)."""
    from ..errors import SupereditError

    for option, value in (("--limit", limit), ("--n", n)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be ≥ 1 (got {value}); leave it out to use every request")
    if requests:
        from ..data import load_requests, sample_requests

        reqs = load_requests(requests, fmt=fmt, limit=limit)
        if n is not None:
            reqs = sample_requests(reqs, n, seed)
    else:
        if testbed_meta(model_dir) is None:
            raise SupereditError("--requests is required for non-testbed models: pass a dataset file "
                                 "(CounterFact, MQuAKE, EasyEdit, zsRE-MEND or superedit JSONL)")
        from ..testbed.access import default_edit_requests

        reqs = list(default_edit_requests(model_dir, n or limit or default_n, seed))[:limit]
    if not reqs:
        raise SupereditError(f"no edit requests to run (--requests {requests!r}, --limit {limit})")
    return reqs


def build_hparams(method: str, profile: str, path: str | None, n_layers: int, layers: str | None = None,
                  mom2_tokens: int | None = None, corpus: str | None = None):
    """Packaged YAML for (method, profile) < ``--hparams`` < --layers/--mom2-tokens/--corpus; layers checked."""
    from ..editing.hparams import HParamsError, load_hparams
    from ..editing.methods import get_method

    cls = get_method(method).hparams_cls
    names = set(cls.model_fields)
    overrides: dict[str, Any] = {}
    if layers:
        overrides["layers"] = parse_layers(layers, n_layers)
    if mom2_tokens is not None:
        if "mom2_n_tokens" not in names:
            raise HParamsError(f"--mom2-tokens does not apply to {method} (it uses no key statistics)")
        overrides["mom2_n_tokens"] = mom2_tokens
    if corpus and "mom2_corpus" in names:
        overrides["mom2_corpus"] = str(corpus)
    hp = load_hparams(cls, method, profile, path, overrides)
    for l in hp.layers:
        if not 0 <= l < n_layers:
            raise HParamsError(f"hparams for {method}/{profile}: layer {l} is out of range for this model "
                               f"(layers 0..{n_layers - 1}); pass --layers or --hparams FILE")
    return hp


def load_with_profile(model: str, method: str):
    """(adapter, model directory, the method's packaged hparams for this model's profile): how benchmarks and
    studies start."""
    from ..models import load_model

    adapter = load_model(model)
    mdir = local_model_dir(model)
    return adapter, mdir, build_hparams(method, hparams_profile(adapter, mdir), None, adapter.n_layers)


def make_stats(adapter, hp, cache_dir: str | None = None, corpus=None):
    """C = E[kkᵀ] for the method's layers from ``hp.mom2_corpus`` (or ``corpus``; default: the testbed's)."""
    from ..editing.covariance import CorpusCovariance

    return CorpusCovariance(adapter, getattr(hp, "mom2_corpus", "") or corpus, n_tokens=getattr(hp, "mom2_n_tokens", 100_000),
                            max_length=getattr(hp, "mom2_max_length", 128), cache_dir=cache_dir, layers=list(hp.layers))
