"""Resolve ``builtin`` / ``builtin:SIZE`` to a testbed model directory (building on first use)."""

from __future__ import annotations

import os
from pathlib import Path

from superedit.errors import SupereditError
from superedit.testbed.sizes import DEFAULT_SEED, DEFAULT_SIZE, SIZES
from superedit.utils.logs import get_logger

log = get_logger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "default"


def superedit_home() -> Path:
    return Path(os.environ.get("SUPEREDIT_HOME") or Path.home() / ".cache" / "superedit")


def is_builtin_spec(spec: str) -> bool:
    return spec == "builtin" or spec.startswith("builtin:")


def parse_builtin(spec: str) -> tuple[str, int]:
    """``builtin`` -> (default size, default seed); ``builtin:SIZE`` -> (SIZE, default seed)."""
    if not is_builtin_spec(spec):
        raise SupereditError(f"{spec!r} is not a builtin spec; use 'builtin' or 'builtin:SIZE'")
    parts = spec.split(":")
    size = parts[1] if len(parts) > 1 and parts[1] else DEFAULT_SIZE
    if size not in SIZES:
        raise SupereditError(f"unknown testbed size {size!r} in {spec!r}; valid sizes: {', '.join(SIZES)} "
                             f"(e.g. builtin:{DEFAULT_SIZE})")
    seed = DEFAULT_SEED
    if len(parts) > 2:
        try:
            seed = int(parts[2])
        except ValueError:
            raise SupereditError(f"bad seed {parts[2]!r} in {spec!r}; use builtin:SIZE:SEED with an integer") from None
    return size, seed


def _complete(d: Path) -> bool:
    return (d / "config.json").exists() and (d / "model.safetensors").exists() and (d / "testbed.json").exists()


def resolve_builtin(spec: str) -> Path:
    """Path of the testbed model dir for ``spec``. The default size (default seed) is shipped with
    the package; other sizes are built once into ``$SUPEREDIT_HOME/testbeds/<size>-<seed>/``."""
    size, seed = parse_builtin(spec)
    if size == DEFAULT_SIZE and seed == DEFAULT_SEED and _complete(SHIPPED_DIR):
        return SHIPPED_DIR
    target = superedit_home() / "testbeds" / f"{size}-{seed}"
    if _complete(target):
        return target
    from superedit.testbed.build import build_testbed

    log.info("testbed %s (seed %d) not built yet; training it into %s (one-time)", size, seed, target)
    return build_testbed(size, target, seed=seed)
