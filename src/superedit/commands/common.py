"""Shared CLI plumbing: options, the JSON result line, user-facing errors."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import typer

from ..errors import SupereditError
from ..utils.logs import setup_logging

MODEL_HELP = "HF model directory, hub id, or 'builtin[:SIZE]' (the built-in testbed; default)."
ModelOpt = typer.Option("builtin", "--model", "-m", help=MODEL_HELP)
JsonOpt = typer.Option(False, "--json", help="Print one JSON object with the results as the last line of stdout.")
DeviceOpt = typer.Option(None, "--device", help="torch device (default: cuda if available, else cpu).")


def default_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print ``result``: as one JSON line on stdout with --json, else readable lines on stderr."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=_default) + "\n")
        sys.stdout.flush()
    else:
        for key, value in result.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value, default=_default)
                if len(value) > 300:
                    value = value[:300] + " …"
            typer.echo(f"{key}: {value}", err=True)


def _default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def command(fn: Callable) -> Callable:
    """Decorator: set up logging and turn SupereditError / bad-input errors into a clean exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging(verbose=bool(kwargs.get("verbose", False)))
        try:
            return fn(*args, **kwargs)
        except (SupereditError, FileNotFoundError, IndexError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            if kwargs.get("as_json"):
                sys.stdout.write(json.dumps({"error": str(exc), "type": type(exc).__name__}) + "\n")
            raise typer.Exit(code=2) from None

    return wrapper


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'3,4,5' | '2-6' | 'all' → sorted layer list, each checked against the model."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            layers.update(range(int(a), int(b) + 1))
        else:
            layers.add(int(part))
    bad = [l for l in sorted(layers) if not 0 <= l < n_layers]
    if bad:
        raise IndexError(f"--layers {spec!r}: layer(s) {bad} out of range; this model has layers 0..{n_layers - 1}")
    return sorted(layers)
