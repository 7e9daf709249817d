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

from ..errors import ModelNotFoundError
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


def load_model(spec: str = "builtin", device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               revision: str | None = None) -> ModelAdapter:
    """Load model + tokenizer and wrap them in a :class:`ModelAdapter` (eval mode, no grads).

    Raises ModelNotFoundError for a missing path or an unloadable id, UnsupportedFamilyError for a
    family missing from the table (checked before the weights are read).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, is_local = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, local_files_only=is_local)
    except Exception as exc:  # noqa: BLE001 - translated into a user-facing error
        raise ModelNotFoundError(f"could not load the config of --model {spec!r}: {exc}") from exc
    family_of(config)  # fail fast, before reading weights
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            from ..errors import UsageError

            raise UsageError(f"--dtype {dtype!r} is not known; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype is None:
        dtype = torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=is_local)
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, local_files_only=is_local, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise ModelNotFoundError(f"could not load --model {spec!r}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelNotFoundError(f"--model {spec!r}: superedit needs a fast tokenizer (offset mappings); got {type(tokenizer).__name__}")
    if device is not None:
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rev = local_revision(path) if is_local else (revision or "main")
    log.info("loaded %s (%s, %d params)", spec, config.model_type, sum(p.numel() for p in model.parameters()))
    return ModelAdapter(model=model, tokenizer=tokenizer, source=str(spec), revision=rev)
