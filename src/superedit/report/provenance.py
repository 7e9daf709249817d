"""Which command produced a run folder: ``OUT/command.json``, written by the command, read by the reports.

The reports render from saved files only, so the command line shown in a page's footer and under
each figure has to be saved with the results. :func:`command_line` rebuilds it from the active click
context (so it is right for ``superedit demo``'s in-process runs too, where ``sys.argv`` is the
demo's): ``superedit <command>`` followed by every option given a value other than its default.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ..utils.io import write_json_atomic

COMMAND_FILE = "command.json"


def current_context():
    """The active command context: typer ≥ 0.29 vendors click as ``typer._click``; older ones use click."""
    import importlib

    for name in ("typer._click.globals", "click.globals"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        ctx = mod.get_current_context(silent=True)
        if ctx is not None:
            return ctx
    return None


def _option_words(param, value) -> list[str]:
    """The words that set ``param`` to ``value`` on a command line ([] when it cannot be written)."""
    kind = getattr(param, "param_type_name", "")
    if kind == "argument":
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    opts = list(getattr(param, "opts", None) or [])
    if kind != "option" or not opts:
        return []
    if getattr(param, "is_flag", False):
        secondary = list(getattr(param, "secondary_opts", None) or [])
        if not value:
            return secondary[:1]
        return opts[:1]
    if isinstance(value, (list, tuple)):
        return [w for v in value for w in (opts[0], str(v))]
    return [opts[0], str(value)]


def command_line(ctx=None) -> str:
    """``superedit <cmd> --opt value …`` of the running command (non-default options only), else argv."""
    ctx = ctx or current_context()
    if ctx is None:
        return shlex.join(["superedit", *sys.argv[1:]]) if sys.argv else "superedit"
    chain = []
    while ctx is not None:
        chain.append(ctx)
        ctx = ctx.parent
    words = ["superedit"]
    for c in reversed(chain):
        if c.parent is not None:
            words.append(c.info_name)
        for param in c.command.params:
            if param.name not in c.params:
                continue
            value = c.params[param.name]
            if value is None or value == param.default:
                continue
            words += _option_words(param, value)
    return shlex.join(words)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def record_command(out_dir: str | Path, ctx=None) -> dict:
    """Write ``out_dir/command.json`` (the command line, its parameters, the time); returns what it wrote."""
    ctx = ctx or current_context()
    params = {k: _jsonable(v) for k, v in (ctx.params.items() if ctx is not None else [])}
    rec = {"command": command_line(ctx), "params": params,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(Path(out_dir) / COMMAND_FILE, rec)
    return rec


def read_command(out_dir: str | Path) -> dict:
    """``out_dir/command.json`` as a dict ({} when the folder has none or it is unreadable)."""
    path = Path(out_dir) / COMMAND_FILE
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}
