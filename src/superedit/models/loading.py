"""Load any supported HF causal LM + tokenizer into a ModelAdapter.

``spec`` is one of:
  * a local directory with an HF model (no download is attempted when it exists);
  * ``builtin`` or ``builtin:SIZE`` — the built-in testbed (built on first use);
  * ``pretrained:NAME`` — a real model installed from the package registry and converted once
    (``models/pretrained.py``: ``smollm2-135m``, ``gemma3-270m``);
  * a hub id such as ``gpt2-xl`` (downloaded by transformers when the network allows).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import ModelNotFoundError, UsageError
from ..utils.logs import get_logger
from .adapter import ModelAdapter
from .families import family_of

log = get_logger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def resolve_model_path(spec: str) -> tuple[str, bool]:
    """Return ``(path_or_id, is_local)`` for a ``--model`` value."""
    if spec is None or spec == "" or spec == "builtin" or str(spec).startswith("builtin:"):
        from ..testbed.registry import resolve_builtin

        return str(resolve_builtin(spec or "builtin")), True
    from .pretrained import ensure_pretrained, is_pretrained_spec

    if is_pretrained_spec(spec):
        return str(ensure_pretrained(spec)), True
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise ModelNotFoundError(f"--model {spec!r} exists but is not an HF model directory (no config.json in it)")
        return str(p), True
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1] or spec.count("/") > 1
    if looks_like_path:
        raise ModelNotFoundError(f"--model {spec!r}: no such directory. Pass an HF model directory, a hub id, "
                                 "'pretrained:NAME' or 'builtin[:SIZE]'.")
    return spec, False


def local_revision(path: str | Path) -> str:
    """A cheap content fingerprint of a local model dir: names, sizes, and head/tail bytes of weights."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".json", ".model")):
            size = f.stat().st_size
            h.update(f.name.encode() + str(size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > (2 << 20):
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return "local-" + h.hexdigest()[:16]


DEVICE_MAP_ACCEPTED = ("'auto', 'balanced', 'balanced_low_0', 'sequential', a device ('cuda:0', 'cpu'), or a JSON "
                       "object of module name → device such as '{\"\": \"cuda:0\"}'")
_DEVICE_MAP_WORDS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value: str | dict | None) -> str | dict | None:
    """The ``--device-map`` value as transformers' ``from_pretrained(device_map=...)`` takes it.

    ``auto``/``balanced``/``balanced_low_0``/``sequential`` pass through; a JSON object (module name →
    device, e.g. ``{"": "cuda:0"}`` or per-layer entries) is parsed; a single device name ``cuda:1`` means
    the whole model there (``{"": "cuda:1"}``). Raises UsageError naming ``--device-map`` otherwise."""
    if value is None or isinstance(value, dict):
        if isinstance(value, dict):
            _check_devices(value)
        return value
    text = str(value).strip()
    if text in _DEVICE_MAP_WORDS:
        return text
    if text.startswith("{"):
        import json

        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--device-map {value!r} is not valid JSON ({exc.msg}); give {DEVICE_MAP_ACCEPTED}") from None
        if not isinstance(parsed, dict) or not parsed:
            raise UsageError(f"--device-map {value!r}: the JSON must be a non-empty object; give {DEVICE_MAP_ACCEPTED}")
        _check_devices(parsed)
        return parsed
    _check_devices({"": text})
    return {"": text}


def _check_devices(mapping: dict) -> None:
    for name, dev in mapping.items():
        if isinstance(dev, int) and dev >= 0:
            continue
        if dev == "disk":
            raise UsageError(f"--device-map: module {name!r} → 'disk' offloads weights; superedit edits weights in "
                             "place and needs every module resident on a device")
        try:
            torch.device(dev)
        except (RuntimeError, TypeError):
            raise UsageError(f"--device-map: {dev!r} (for module {name!r}) is not a torch device; "
                             f"give {DEVICE_MAP_ACCEPTED}") from None


def load_model(spec: str = "builtin", device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               revision: str | None = None, device_map: str | dict | None = None) -> ModelAdapter:
    """Load model + tokenizer and wrap them in a :class:`ModelAdapter` (eval mode, no grads).

    ``dtype``: the weights' dtype (``float32`` default, ``bfloat16``, ``float16``; solves still run in
    float64 and are cast back). ``device_map``: for a model that does not fit one device, placed by
    accelerate/transformers (:func:`parse_device_map`; needs ``accelerate``); ``device`` must then be
    None. Raises ModelNotFoundError for a missing path or an unloadable id, UnsupportedFamilyError for a
    family missing from the table (checked before the weights are read), UsageError for a bad
    ``--dtype``/``--device-map``.
    """
    device_map = parse_device_map(device_map)
    if device_map is not None:
        if device is not None:
            raise UsageError(f"--device {device!r} and --device-map {device_map!r} both place the model; give one of them")
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise UsageError("--device-map needs the 'accelerate' package: pip install accelerate "
                             "(or pip install 'superedit[pretrained]')")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, is_local = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, local_files_only=is_local)
    except Exception as exc:  # noqa: BLE001 - translated into a user-facing error
        raise ModelNotFoundError(f"could not load the config of --model {spec!r}: {exc}") from exc
    family_of(config)  # fail fast, before reading weights
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UsageError(f"--dtype {dtype!r} is not known; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is None:
        dtype = torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=is_local)
        extra = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, local_files_only=is_local, dtype=dtype,
                                                     **extra)
    except Exception as exc:  # noqa: BLE001
        raise ModelNotFoundError(f"could not load --model {spec!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelNotFoundError(f"--model {spec!r}: superedit needs a fast tokenizer (offset mappings); got {type(tokenizer).__name__}")
    if device is not None:
        model.to(device)
    if device_map is not None:
        offloaded = sorted({str(p.device) for p in model.parameters()} & {"meta"})
        if offloaded:
            log.warning("--device-map %s offloaded part of the model (weights on the meta device): layers whose "
                        "down-projection is offloaded cannot be edited", device_map)
        log.info("device map: %s", getattr(model, "hf_device_map", device_map))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rev = local_revision(path) if is_local else (revision or "main")
    log.info("loaded %s (%s, %d params)", spec, config.model_type, sum(p.numel() for p in model.parameters()))
    return ModelAdapter(model=model, tokenizer=tokenizer, source=str(spec), revision=rev)
