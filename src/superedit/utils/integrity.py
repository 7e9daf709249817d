"""Integrity of the tensor files superedit writes: content hashes, finiteness checks, a writer lock.

* :func:`sha256_file` — SHA-256 of a file's bytes, read in chunks (never the whole file in memory).
* :func:`verify_sha256` — compare a file with the hash recorded in the JSON that committed it; a
  mismatch raises the caller's error class naming the file, both hashes and what to do.
* :func:`canonical_sha256` — SHA-256 of a JSON-able object (sorted keys), for a JSON file that carries
  the hash of its own content.
* :func:`check_finite` — refuse tensors holding NaN or ±inf, naming the tensor and the file.
* :class:`WriterLock` — ``<dir>/lock`` holding pid, hostname, process start and a token, created
  atomically (``os.link`` of a complete temporary file, falling back to ``O_EXCL``). A lock whose
  process is gone (same host, pid not alive or reused) is stale and taken over with a warning; a live
  one, or one from another host, is refused naming its owner.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Mapping

from ..errors import SupereditError
from .logs import get_logger

log = get_logger(__name__)
CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file's bytes, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def canonical_sha256(obj: Any) -> str:
    """Hex SHA-256 of ``obj`` as compact JSON with sorted keys (independent of the file's layout; values
    converted as ``utils.io`` writes them, so the object and the file read back hash the same)."""
    from .io import _json_default

    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, what: str, hint: str,
                  error: type[SupereditError] = SupereditError) -> None:
    """Raise ``error`` when ``path``'s SHA-256 is not ``expected`` (the message names the file, the ``what``
    it is, the expected and the actual hash, and ends with ``hint``: what to do)."""
    actual = sha256_file(path)
    if actual != expected:
        raise error(f"{path}: the {what} file is damaged: its SHA-256 is {actual}, but {expected} was recorded "
                    f"when it was written; {hint}")


def check_finite(tensors: Mapping[str, Any], where: str, error: type[SupereditError] = SupereditError) -> None:
    """Raise ``error`` naming the first tensor of ``tensors`` holding NaN or ±inf (``where``: the file or
    object they belong to). Integer tensors are always finite."""
    import torch

    for name, t in tensors.items():
        if t is None or not torch.is_floating_point(t) or t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise error(f"{where}: tensor {name!r} holds non-finite values ({n_nan} NaN, {n_inf} ±inf of "
                        f"{t.numel()}); refusing to use it")


# ------------------------------------------------------------------------------------------ the lock
def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), to tell a reused pid apart;
    None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat: starttime (the first two fields precede the split)
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


class WriterLock:
    """An exclusive lock file for one writer of a directory (see the module docstring).

    ``acquire()`` raises ``error`` when another live writer holds it; ``release()`` removes the file only
    while it still holds this lock's token (safe to call twice, or after the directory is gone)."""

    def __init__(self, path: str | os.PathLike, what: str, error: type[SupereditError] = SupereditError):
        self.path = Path(path)
        self.what = what
        self.error = error
        self.token = secrets.token_hex(8)
        self.held = False

    def _record(self) -> dict:
        return {"pid": os.getpid(), "hostname": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": self.token}

    def _read(self, path: Path | None = None) -> dict | None:
        try:
            rec = json.loads((path or self.path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        return rec if isinstance(rec, dict) else {}

    def _create(self) -> bool:
        """Create the lock file with its full content in one step; False if it exists."""
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(self._record()) + "\n", encoding="utf-8")
        try:
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(tmp.read_text(encoding="utf-8"))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _stale(self, rec: dict) -> bool:
        if rec.get("hostname") != socket.gethostname() or not isinstance(rec.get("pid"), int):
            return False
        pid = rec["pid"]
        if pid == os.getpid():
            return False  # another writer object of this process holds it
        if not _pid_alive(pid):
            return True
        now = _proc_start(pid)
        return rec.get("proc_start") is not None and now is not None and now != rec["proc_start"]

    def _refuse(self, rec: dict) -> SupereditError:
        if not rec:
            return self.error(f"{self.path}: the lock file of this {self.what} is unreadable; if no process is "
                              f"writing to the {self.what}, delete {self.path} and retry")
        same_pid = rec.get("pid") == os.getpid() and rec.get("hostname") == socket.gethostname()
        who = ("another writer object in this process" if same_pid else
               f"process {rec.get('pid')} on host {rec.get('hostname')} (since {rec.get('started')})")
        extra = ("" if rec.get("hostname") == socket.gethostname() else
                 f"; if that process is gone, delete {self.path} and retry")
        return self.error(f"{self.path.parent}: this {self.what} is open for writing by {who}; wait for it to "
                          f"finish (readers such as show/verify need no lock){extra}")

    def acquire(self) -> None:
        if self.held:
            return
        for _ in range(3):
            if self._create():
                self.held = True
                return
            rec = self._read()
            if rec is None:
                continue  # released meanwhile
            if not self._stale(rec):
                raise self._refuse(rec)
            # take the stale lock over: move it aside, make sure it is the one judged stale
            aside = self.path.with_name(f".{self.path.name}.stale-{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = self._read(aside)
            if moved is not None and moved.get("token") != rec.get("token"):  # a fresh lock taken meanwhile
                try:
                    os.link(aside, self.path)
                except OSError:
                    pass
                aside.unlink(missing_ok=True)
                raise self._refuse(moved)
            aside.unlink(missing_ok=True)
            log.warning("%s: took over a stale lock of process %s on %s (started %s; it is no longer running)",
                        self.path, rec.get("pid"), rec.get("hostname"), rec.get("started"))
        raise self.error(f"{self.path}: could not take the lock of this {self.what} (it changed hands repeatedly); "
                         "retry")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        rec = self._read()
        if rec and rec.get("token") == self.token:
            try:
                self.path.unlink()
            except OSError:  # pragma: no cover
                pass
