"""Atomic file writes and JSON/JSONL helpers.

Every file superedit writes goes through these functions so that a run killed at
any moment leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import FileFormatError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. The file ends up with the
    process umask's mode (0666 & ~umask), even when the writer recreated the temporary file with its
    own mode (safetensors writes 0600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp(path)
    mode = stat.S_IMODE(tmp_path.stat().st_mode)  # 0666 & ~umask, read without changing the umask
    try:
        yield tmp_path
        if stat.S_IMODE(tmp_path.stat().st_mode) != mode:
            os.chmod(tmp_path, mode)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _create_temp(path: Path) -> Path:
    """A new empty file next to ``path`` created with mode 0666 & ~umask, as ``open(path, "w")`` would.

    (``tempfile.mkstemp`` creates 0600 files, and the rename would carry that mode to ``path``.)"""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def apply_umask_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would: files
    0666 & ~umask, directories 0777 & ~umask.

    For trees written by libraries that pick their own modes (safetensors and ``save_pretrained``
    write 0600 files, ``tempfile.mkdtemp`` makes 0700 directories) before they are renamed into place.
    The umask is read from a probe file, without changing it (``os.umask`` is process-wide)."""
    root = Path(root)
    probe = _create_temp(root / ".umask-probe" if root.is_dir() else root)
    probe_dir = probe.with_name(probe.name + ".d")
    try:
        os.mkdir(probe_dir, 0o777)
        file_mode, dir_mode = stat.S_IMODE(probe.stat().st_mode), stat.S_IMODE(probe_dir.stat().st_mode)
    finally:
        probe.unlink()
        if probe_dir.exists():
            probe_dir.rmdir()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink():
            continue
        want = dir_mode if p.is_dir() else file_mode
        if stat.S_IMODE(p.stat().st_mode) != want:
            os.chmod(p, want)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in records))


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one record and fsync (a crash loses at most the record being written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=_json_default) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a torn final line (crash mid-append) is ignored."""
    out = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise FileFormatError(f"{path}: line {i + 1} is not valid JSON ({exc}); only a torn last line "
                                  f"is skipped: repair or remove the file") from exc
    return out


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
