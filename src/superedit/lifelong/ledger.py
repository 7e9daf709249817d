"""The edit ledger: a lifelong-editing run on disk, crash-safe, with undo.

Layout of a ledger directory::

    ledger.json                 format, generation g, base model identity + fingerprints of the base
                                weights of the edited layers, method, hparams, and the edits in order
                                (requests, layers, method, timestamp, status applied|undone, file)
    state.<g>.safetensors       the live state, O(1) in the number of edits: per edited layer the
                                current total delta ``layer.L.delta`` (W − W₀, float64), plus the method
                                state's ``state_dict`` (D4S: running sums, X and the factor; AlphaEdit:
                                Σ K_p K_pᵀ), so a resumed run continues with bit-identical numbers
    edits/<i>.safetensors       append-only, one per edit: what undo needs — the step's journal (the
                                terms its state must take out: D4S ``layer.L.R``/``layer.L.K``, AlphaEdit
                                ``layer.L.K``) and, for methods undone by subtraction (registry
                                ``undo="last"``), the increment (``layer.L.left``/``right`` or ``dense``).
                                Keeping these out of the live state keeps it O(1) while any edit stays
                                undoable; the directory grows by O(d·k) per edit for low-rank methods.

The base weights W₀ are never stored: they are re-read from the base model (checked against the
SHA-256 fingerprints in ledger.json).

Integrity: ledger.json records the SHA-256 of every file it commits (``state_sha256``; each edit's
``sha256``) and of its own content (``info_sha256``, over the JSON without that field). Every load
verifies them and refuses a mismatch naming the file; no tensor with NaN/±inf is ever written, committed,
loaded or exported. Ledgers written before the hashes existed load with a warning naming what is not
verified. :func:`verify_ledger` (``superedit ledger verify``) checks every file at once.

Writers: one process at a time. ``lock`` (pid, host, process start, token) is taken by ``create``, by
``open(..., lock=True)`` or at the start of the first write (``step``/``record``/``undo``/``redo``), and
released by ``close()``, when the object is collected, or when a write fails. A lock left by a crashed
process (same host, pid no longer running) is taken over with a warning; a live writer's is refused.
Readers (``open``, ``show``, ``verify``, ``export``) take no lock.

Commit protocol (``record``/``undo``/``redo``): check every tensor is finite, write ``edits/<i>.safetensors``
(atomic), write ``state.<g+1>.safetensors`` (atomic; read back and compared before going on), then
atomically replace ``ledger.json`` with generation g+1 and the new files' hashes — the commit point — and
only then delete older state files. A crash before the json write leaves
generation g (whose state file still exists) as the ledger; stray newer state files are ignored and
cleaned up by the next commit.

Undo: methods whose state determines W − W₀ (registry ``undo="any"``: D4S) can undo/redo ANY edit
exactly (its terms are removed from the sums and the layer re-solved; the result equals never having
made the edit, up to float64 rounding). Methods that edit on top of each other (``undo="last"``: rome,
memit, ft, alphaedit) can only undo the last applied edit exactly (subtract its stored increment; take
its journal out of the state) and redo the edit undone last.

``Ledger.step`` is the one sequential editing loop (``superedit lifelong`` and ``superedit edit
--sequential`` both go through it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from ..editing.methods.protocol import total_key
from ..errors import LedgerError
from ..models import ModelAdapter
from ..utils.integrity import WriterLock, canonical_sha256, check_finite, sha256_file, verify_sha256
from ..utils.io import apply_umask_modes, atomic_path, write_json_atomic
from ..utils.logs import get_logger

log = get_logger(__name__)
F64 = torch.float64
FORMAT = "superedit-ledger/1"
INCREMENT_SUFFIXES = (".left", ".right", ".dense")  #: names of an edit file's increment (the rest is journal)
LOCK_NAME = "lock"


def _before_commit() -> None:
    """Called between writing the new state file and ledger.json (tests patch it to simulate a crash)."""


def weight_fingerprint(adapter: ModelAdapter, layer: int) -> str:
    w = adapter.down_weight_param(layer).detach().cpu().contiguous()
    return hashlib.sha256(w.view(torch.uint8).numpy().tobytes()).hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` atomically, read the file back (it must equal them), return its SHA-256."""
    from safetensors.torch import load_file, save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp))
        digest = sha256_file(tmp)
        back = load_file(str(tmp))
        bad = [k for k in cpu if k not in back or not torch.equal(back[k], cpu[k])]
        if bad or len(back) != len(cpu):
            raise LedgerError(f"{path}: the file just written does not read back as written (tensors {bad[:3]}); "
                              "nothing was committed; check the disk and retry")
    return digest


def _damage_hint(what: str) -> str:
    if what == "state":
        return ("the ledger cannot be used until it is restored from a backup (nothing was changed; "
                "`superedit ledger verify` lists every damaged file)")
    return ("undo/redo of this edit is refused (nothing was changed; the ledger's current state is not affected); "
            "restore the file from a backup; `superedit ledger verify` lists every damaged file")


def _load_tensors(path: Path, what: str, sha256: str | None = None,
                  unverified: str | None = None) -> dict[str, torch.Tensor]:
    """Load a ledger tensor file: its SHA-256 checked against ``sha256`` (when None: a warning naming
    ``unverified``, the reason), every tensor checked finite."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise LedgerError(f"{path}: the {what} file is missing; the ledger directory is incomplete "
                          "(restore it from a copy, or start a new ledger)")
    kind = "state" if what == "state" else "edit"
    if sha256 is not None:
        verify_sha256(path, sha256, what, _damage_hint(kind), LedgerError)
    else:
        log.warning("%s: the %s file is not verified (%s)", path, what, unverified or "no hash recorded")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise LedgerError(f"{path}: cannot read the {what} file ({exc}); it is corrupt; "
                          f"{_damage_hint(kind)}") from exc
    check_finite(tensors, f"{path} (the {what} file)", LedgerError)
    return tensors


def _read_info(directory: Path) -> dict:
    """ledger.json, parsed and checked (fields, format, its own content hash)."""
    path = directory / "ledger.json"
    if not path.is_file():
        raise LedgerError(f"{directory}: no ledger.json here; not a ledger directory (create one with Ledger.create)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: corrupt ledger file ({exc}); restore it from a backup or start a new ledger "
                          "(nothing was changed)") from exc
    missing = [k for k in ("format", "generation", "method", "hparams", "layers", "edits", "state_file", "model")
               if not isinstance(info, dict) or k not in info]
    if missing:
        raise LedgerError(f"{path}: not a superedit ledger (missing field(s) {missing})")
    if info["format"] != FORMAT:
        raise LedgerError(f"{path}: unsupported ledger format {info['format']!r} (this superedit reads {FORMAT})")
    own = info.get("info_sha256")
    if own is None:
        log.warning("%s: written by an older superedit without content hashes; this file and the tensor files "
                    "it names are not verified (the next commit records hashes for the files it writes)", path)
    else:
        actual = canonical_sha256({k: v for k, v in info.items() if k != "info_sha256"})
        if actual != own:
            raise LedgerError(f"{path}: corrupt ledger file: its content hashes to {actual}, but {own} was recorded "
                              "when it was written (a changed byte); restore it from a backup (nothing was changed; "
                              "`superedit ledger verify` lists every damaged file)")
    return info


def _state_of(directory: Path, info: dict) -> dict[str, torch.Tensor]:
    if not info["state_file"]:
        return {}
    return _load_tensors(directory / info["state_file"], "state", info.get("state_sha256"),
                         "ledger.json records no hash for it (older superedit)")


def _edit_of(directory: Path, e: dict) -> dict[str, torch.Tensor]:
    return _load_tensors(directory / e["file"], f"edit #{e['index']}", e.get("sha256"),
                         "its entry in ledger.json records no hash (older superedit)")


def _request_dict(r: Any) -> dict:
    return r.to_dict() if hasattr(r, "to_dict") else dict(r)


class Ledger:
    """A lifelong-editing ledger directory (see module docstring). Use :meth:`create` or :meth:`open`."""

    def __init__(self, directory: Path, info: dict, tensors: dict[str, torch.Tensor]):
        self.dir = Path(directory)
        self.info = info
        self.tensors = tensors
        self.state = None  #: the method's live state (see editing.methods.protocol), once attached
        self._base: dict[int, torch.Tensor] | None = None
        self._base_owner: int | None = None
        self._lock = WriterLock(self.dir / LOCK_NAME, "ledger", LedgerError)
        self._finalizer = weakref.finalize(self, self._lock.release)

    # ----- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | os.PathLike, adapter: ModelAdapter, method: str, hparams) -> "Ledger":
        directory = Path(directory)
        if (directory / "ledger.json").exists():
            raise LedgerError(f"{directory}: a ledger already exists here; open it (Ledger.open) or choose another directory")
        layers = sorted(int(l) for l in hparams.layers)
        for l in layers:
            adapter.check_layer(l)
        info = {"format": FORMAT, "generation": 0, "created": _now(), "model": adapter.identity(),
                "base_fingerprints": {str(l): weight_fingerprint(adapter, l) for l in layers},
                "method": method, "hparams_class": type(hparams).__name__, "hparams": hparams.to_dict(),
                "layers": layers, "edits": [], "state_file": None}
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "edits").mkdir(exist_ok=True)
        ledger = cls(directory, info, {})
        ledger.base_weights(adapter)  # fingerprints checked, base copies kept, prefixes from the base model
        ledger._commit(dict(ledger.info), {})
        return ledger

    @classmethod
    def open(cls, directory: str | os.PathLike, lock: bool = False) -> "Ledger":
        """Read the ledger (every file verified). ``lock=True`` takes the writer lock now (otherwise it is
        taken at the first write)."""
        directory = Path(directory)
        if lock:  # before reading, so that no other writer commits in between
            lk = WriterLock(directory / LOCK_NAME, "ledger", LedgerError)
            lk.acquire()
            try:
                led = cls._read(directory)
            except BaseException:
                lk.release()
                raise
            led._adopt_lock(lk)
            return led
        return cls._read(directory)

    @classmethod
    def _read(cls, directory: Path) -> "Ledger":
        info = _read_info(directory)
        tensors = _state_of(directory, info)
        newer = [p.name for p in directory.glob("state.*.safetensors") if _gen_of(p) > info["generation"]]
        if newer:
            log.warning("%s: ignoring %s from an interrupted commit (generation %d is the last complete one)",
                        directory, ", ".join(sorted(newer)), info["generation"])
        return cls(directory, info, tensors)

    # ----- the writer lock --------------------------------------------------------------------
    def _adopt_lock(self, lock: WriterLock) -> None:
        self._lock = lock
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, lock.release)

    def _writable(self) -> None:
        """Hold the writer lock; a ledger committed by another writer since this object read it is refused."""
        if self._lock.held:
            return
        self._lock.acquire()
        path = self.dir / "ledger.json"
        if path.is_file():
            try:
                on_disk = int(json.loads(path.read_text(encoding="utf-8")).get("generation"))
            except (OSError, ValueError, TypeError, AttributeError, json.JSONDecodeError):
                on_disk = None
            if on_disk != self.generation:
                self._lock.release()
                raise LedgerError(f"{self.dir}: the ledger on disk is at generation {on_disk}, this copy read "
                                  f"generation {self.generation} (another writer committed since); open it again")

    def close(self) -> None:
        """Release the writer lock (if held). The object stays readable; a later write takes the lock again."""
        self._lock.release()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- views ----------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.info["method"]

    @property
    def layers(self) -> list[int]:
        return list(self.info["layers"])

    @property
    def edits(self) -> list[dict]:
        return self.info["edits"]

    @property
    def generation(self) -> int:
        return int(self.info["generation"])

    def active(self) -> list[int]:
        return [e["index"] for e in self.edits if e["status"] == "applied"]

    @property
    def entry(self):
        """The method's registry entry (its capabilities)."""
        from ..editing.methods import get_method

        return get_method(self.method)

    def hparams(self):
        return self.entry.hparams_cls.from_dict(self.info["hparams"], source=str(self.dir / "ledger.json"))

    def total_delta(self, layer: int) -> torch.Tensor:
        """W − W₀ at ``layer`` (float64; zeros before the first edit)."""
        if self.state is not None:
            t = self.state.total_delta(layer)
            if t is not None:
                return t
        t = self.tensors.get(total_key(layer))
        if t is None:
            shape = self._shape(layer)
            return torch.zeros(shape, dtype=F64)
        return t.to(F64)

    def _shape(self, layer: int) -> tuple[int, int]:
        if self._base is not None:
            return tuple(self._base[layer].shape)
        raise LedgerError("the ledger has no edits yet and no model attached; call apply_to(adapter) first")

    def delta(self):
        """The total change W − W₀ as a WeightDelta (dense, float64) for every edited layer."""
        from ..editing.delta import LayerDelta, WeightDelta

        return WeightDelta({l: LayerDelta(dense_=self.total_delta(l).clone()) for l in self.layers}, self.method,
                           {"model": self.info["model"], "delta_kind": "total", "ledger": str(self.dir),
                            "generation": self.generation, "n_active_edits": len(self.active())})

    # ----- the model ------------------------------------------------------------------------
    def base_weights(self, adapter: ModelAdapter) -> dict[int, torch.Tensor]:
        """W₀ per edited layer: read from ``adapter`` (checked against the stored fingerprints), or the copy
        taken when this ledger was last applied to the same model."""
        if self._base is not None and self._base_owner == id(adapter.model):
            return self._base
        if adapter.identity()["config_hash"] != self.info["model"].get("config_hash"):
            raise LedgerError(f"{self.dir}: this ledger was made for model {self.info['model'].get('source')} "
                              f"(config hash {self.info['model'].get('config_hash')}), not {adapter.source}")
        for l in self.layers:
            if weight_fingerprint(adapter, l) != self.info["base_fingerprints"][str(l)]:
                raise LedgerError(f"{self.dir}: layer {l} of {adapter.source} does not hold the base weights this ledger "
                                  "was created on (already edited, or another checkpoint); load a fresh base model")
        self._base = {l: adapter.down_weight(l).detach().clone() for l in self.layers}
        self._base_owner = id(adapter.model)
        self._warm_prefixes(adapter)
        return self._base

    def _warm_prefixes(self, adapter: ModelAdapter) -> None:
        """Generate the context prefixes while the model holds its BASE weights.

        ``context_prefixes`` samples them from the model and caches them per model object, so without
        this a resumed run (model already carrying edits) would average keys over different prefixes
        than the uninterrupted run. The prefixes are recorded in ledger.json and compared on resume.
        """
        hp = self.info["hparams"]
        if "context_lengths" not in hp:
            return
        from ..editing.contexts import context_prefixes

        prefixes = context_prefixes(adapter, hp["context_lengths"], hp["n_prefixes"], hp.get("seed", 0))
        stored = self.info.get("prefixes")
        if stored is None:
            self.info["prefixes"] = prefixes
        elif stored != prefixes:
            log.warning("%s: the context prefixes generated now differ from the recorded ones; keys of new edits "
                        "will not match an uninterrupted run exactly (different torch version or device?)", self.dir)

    @torch.no_grad()
    def apply_to(self, adapter: ModelAdapter) -> ModelAdapter:
        """Set W = W₀ + delta at every edited layer (W₀ from the base model; may be called again later)."""
        base = self.base_weights(adapter)
        for l in self.layers:
            adapter.set_down_weight(l, base[l].to(F64) + self.total_delta(l).to(base[l].device))
        if self.entry.forward is not None:  # edits kept in the state (gated): install a snapshot of it
            if self.state is None:
                self.load_state(adapter)
            self.entry.install(adapter, self.state)
        return adapter

    def load_state(self, adapter: ModelAdapter, stats=None):
        """Rebuild and attach the method's live state from the committed state file (None for stateless
        methods). ``stats`` (the covariance the ledger was made with) is needed by methods that solve with it."""
        base = self.base_weights(adapter)
        state = self.entry.make_state(adapter, self.hparams(), stats, base)
        if state is not None:
            state.load_state_dict(self.tensors)
        self.state = state
        return state

    # ----- commits --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        return self.state.state_dict() if self.state is not None else {}

    def _commit(self, info: dict, tensors: dict[str, torch.Tensor], edit_file: tuple[str, dict] | None = None) -> None:
        """Write the edit file (if any) and the next state file, then ledger.json (the commit point).
        The writer lock is released when anything fails (a crashed writer leaves no live lock behind)."""
        try:
            self._writable()
            gen = int(self.info["generation"]) + 1
            state_name = f"state.{gen}.safetensors"
            check_finite(tensors, f"{self.dir / state_name} (the new state; not committed)", LedgerError)
            if edit_file is not None:
                check_finite(edit_file[1], f"{self.dir / edit_file[0]} (the new edit; not committed)", LedgerError)
                digest = _save_tensors(self.dir / edit_file[0], edit_file[1])
                info = {**info, "edits": [{**e, "sha256": digest} if e["file"] == edit_file[0] else e
                                          for e in info["edits"]]}
            state_sha = _save_tensors(self.dir / state_name, tensors)
            _before_commit()
            info = {**info, "generation": gen, "state_file": state_name, "state_sha256": state_sha, "updated": _now()}
            info.pop("info_sha256", None)
            info["info_sha256"] = canonical_sha256(info)
            write_json_atomic(self.dir / "ledger.json", info)
        except BaseException:
            self._lock.release()
            raise
        self.info, self.tensors = info, tensors
        for p in self.dir.glob("state.*.safetensors"):
            if p.name != state_name:
                try:
                    p.unlink()
                except OSError:  # pragma: no cover
                    pass

    def record(self, requests: list, result) -> int:
        """Commit one completed step (the :class:`~superedit.editing.methods.protocol.StepResult` the method
        returned, with ``self.state`` already updated by it); returns the edit's index."""
        index = len(self.edits)
        rel = f"edits/{index:05d}.safetensors"
        delta = result.delta
        edit_tensors: dict[str, torch.Tensor] = dict(result.journal)
        tensors: dict[str, torch.Tensor] = {}
        for l in self.layers:
            old = self.tensors.get(total_key(l))
            if old is not None:
                tensors[total_key(l)] = old
        for l, d in delta.layers.items():
            if l not in self.layers:
                raise LedgerError(f"the delta edits layer {l}, but this ledger covers layers {self.layers}")
            own = self.state.total_delta(l) if self.state is not None else None
            if own is not None:
                tensors[total_key(l)] = own.detach().to("cpu", copy=True)
            else:
                old = tensors.get(total_key(l), torch.zeros(d.shape, dtype=F64))
                tensors[total_key(l)] = old.to(F64) + d.dense(F64).cpu()
            if self.entry.undo == "last":  # undone by subtracting the increment
                if d.low_rank:
                    edit_tensors[f"layer.{l}.left"], edit_tensors[f"layer.{l}.right"] = d.left, d.right
                else:
                    edit_tensors[f"layer.{l}.dense"] = d.dense_
        tensors.update(self._state_tensors())
        entry = {"index": index, "requests": [_request_dict(r) for r in requests], "layers": self.layers,
                 "method": self.method, "timestamp": _now(), "status": "applied", "file": rel}
        info = {**self.info, "edits": self.edits + [entry]}
        self._commit(info, tensors, (rel, edit_tensors))
        return index

    def _edit(self, index: int) -> dict:
        if not 0 <= index < len(self.edits):
            raise LedgerError(f"{self.dir}: no edit #{index} (the ledger has edits 0..{len(self.edits) - 1})")
        return self.edits[index]

    def _set_status(self, index: int, status: str) -> dict:
        edits = [dict(e) for e in self.edits]
        edits[index]["status"] = status
        edits[index][f"{status}_at"] = _now()
        return {**self.info, "edits": edits}

    def undo(self, index: int | None = None) -> None:
        """Undo edit ``index`` (default: the last applied one) and commit. Re-apply with ``apply_to``."""
        self._change(index, undo=True)

    def redo(self, index: int) -> None:
        """Re-apply an undone edit (exactly its recorded terms; no new optimisation)."""
        self._change(index, undo=False)

    def _change(self, index: int | None, undo: bool) -> None:
        try:
            self._change_and_commit(index, undo)
        except BaseException:  # a failed write holds no lock (a later one takes it again, checking the generation)
            self._lock.release()
            raise

    def _change_and_commit(self, index: int | None, undo: bool) -> None:
        active = self.active()
        if index is None:
            if not active:
                raise LedgerError(f"{self.dir}: no applied edit to undo")
            index = active[-1]
        e = self._edit(index)
        want = "applied" if undo else "undone"
        if e["status"] != want:
            raise LedgerError(f"edit #{index} is {e['status']}; only {want} edits can be {'undone' if undo else 'redone'}")
        if self.entry.undo == "last":
            if undo and index != active[-1]:
                raise LedgerError(f"method {self.method!r} applies edits on top of each other, so only the last applied "
                                  f"edit (#{active[-1]}) can be undone exactly; undo #{active[-1]} first "
                                  "(a method whose state is a sum over edits, such as 'd4s', can undo any edit)")
            if not undo:
                undone_after = [x["index"] for x in self.edits if x["status"] == "undone"
                                and x["index"] > (active[-1] if active else -1)]
                if not undone_after or index != undone_after[0]:
                    raise LedgerError(f"method {self.method!r}: only the edit undone last, right after the last applied "
                                      f"one, can be redone exactly (candidate: {undone_after[:1] or 'none'})")
        data = _edit_of(self.dir, e)
        journal = {k: v for k, v in data.items() if not k.endswith(INCREMENT_SUFFIXES)}
        if self.state is None and (journal or self.entry.undo == "any"):
            raise LedgerError(f"undo/redo of a {self.method} ledger needs its live state: call "
                              "ledger.load_state(adapter, stats) first")
        self._writable()  # before changing anything in memory
        try:
            tensors = self._changed_tensors(index, undo, active, data, journal)
            self._commit(self._set_status(index, "undone" if undo else "applied"), tensors)
        except BaseException:
            if self.entry.stateful:  # the in-memory state may hold half the change: reload it before reuse
                self.state = None
            raise

    def _changed_tensors(self, index: int, undo: bool, active: list[int], data: dict, journal: dict) -> dict:
        """The state tensors after undoing/redoing edit ``index`` (``self.state`` is changed in place)."""
        if self.entry.undo == "any":
            self.state.remove(journal) if undo else self.state.add(journal)
            tensors = {**self.tensors, **self._state_tensors()}
            for l in self.layers:
                if self.state.total_delta(l) is not None:
                    tensors[total_key(l)] = self.state.total_delta(l).detach().to("cpu", copy=True)
        else:
            sign = -1.0 if undo else 1.0
            tensors = dict(self.tensors)
            for l in self.layers:
                if f"layer.{l}.dense" in data:
                    inc = data[f"layer.{l}.dense"].to(F64)
                elif f"layer.{l}.left" in data:
                    inc = data[f"layer.{l}.left"].to(F64) @ data[f"layer.{l}.right"].to(F64).T
                else:
                    continue
                tensors[total_key(l)] = tensors[total_key(l)].to(F64) + sign * inc
            if self.state is not None and journal:
                self.state.remove(journal) if undo else self.state.add(journal)
            tensors.update(self._state_tensors())
        return tensors

    # ----- export ---------------------------------------------------------------------------
    def export(self, directory: str | os.PathLike, mode: str = "deltas", adapter: ModelAdapter | None = None) -> Path:
        """``deltas``: the total W − W₀ as a saved WeightDelta (+ ``edits.json``); ``model``: the edited model
        (``save_pretrained`` of ``adapter`` with the ledger applied; needs the base ``adapter``)."""
        directory = Path(directory)
        if self.entry.forward is not None:
            raise LedgerError(f"{self.dir}: method {self.method!r} keeps its edits in the ledger's state (entries that "
                              "act on the forward pass), not in the weights, so neither its deltas nor a saved model "
                              "carry them; share the ledger directory itself and apply it with Ledger.apply_to")
        if mode == "deltas":
            delta = self.delta()
            check_finite({f"layer.{l}.delta": d.dense_ for l, d in delta.layers.items()},
                         f"{self.dir}: the total delta (not exported)", LedgerError)
            delta.save(directory)
            write_json_atomic(directory / "edits.json", {"ledger": str(self.dir), "generation": self.generation,
                                                         "method": self.method, "edits": self.edits})
            return directory
        if mode == "model":
            if adapter is None:
                raise LedgerError("export(mode='model') needs the base model: pass adapter=")
            self.apply_to(adapter)
            check_finite({f"layer {l} down-projection weight": adapter.down_weight(l) for l in self.layers},
                         f"{self.dir}: the edited model (W₀ + ΔW in the model's dtype; not exported)", LedgerError)
            tmp = directory.with_name(f".{directory.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            adapter.model.save_pretrained(str(tmp), safe_serialization=True)
            if adapter.tokenizer is not None:
                adapter.tokenizer.save_pretrained(str(tmp))
            write_json_atomic(tmp / "superedit_ledger.json", {"ledger": str(self.dir), "generation": self.generation,
                                                              "method": self.method, "edits": self.edits})
            apply_umask_modes(tmp)  # save_pretrained/safetensors write 0600 files
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
            return directory
        raise LedgerError(f"export mode must be 'deltas' or 'model' (got {mode!r})")

    def step(self, adapter: ModelAdapter, requests: list, stats=None, before_commit=None):
        """Run the ledger's method on ``requests`` against the edited model, commit, and update ``adapter``.

        The one sequential editing loop. The adapter must be the model this ledger is applied to (call
        ``apply_to`` first); the state is loaded on first use. ``before_commit(result)`` (optional) runs
        between the method and the commit. Returns ``(index, StepResult)``. When the
        method or the commit fails, nothing is committed and the in-memory state is dropped (the next
        step reloads it from the last commit, so a failed step leaves no trace in the numbers).
        """
        entry = self.entry
        stats = stats if entry.needs_stats else None
        self._writable()  # refused before any work when another process writes to this ledger
        if self.state is None and entry.stateful:
            self.load_state(adapter, stats)
        args = (adapter, requests, self.hparams(), stats)
        try:
            result = entry.fn(*args) if self.state is None else entry.fn(*args, state=self.state)
            if before_commit is not None:
                before_commit(result)
            index = self.record(requests, result)
        except BaseException:
            if entry.stateful:
                self.state = None
            self._lock.release()
            raise
        self.apply_to(adapter)
        return index, result


def verify_ledger(directory: str | os.PathLike) -> dict:
    """Check every file of a ledger without changing anything: ledger.json (parse, fields, own hash),
    the state file and each edit file (present, SHA-256 as recorded, readable, finite).

    Returns ``{"ledger", "ok", "generation", "n_files", "damaged": [{"file", "problem"}],
    "unverified": [file], "notes": [...]}``; ``ok`` is False when anything is damaged or missing."""
    directory = Path(directory)
    out = {"ledger": str(directory), "ok": True, "generation": None, "n_files": 0, "damaged": [], "unverified": [],
           "notes": []}

    def damaged(name: str, exc: Exception) -> None:
        out["damaged"].append({"file": name, "problem": str(exc)})

    out["n_files"] += 1
    try:
        info = _read_info(directory)
    except LedgerError as exc:
        damaged("ledger.json", exc)
        out["ok"] = False
        return out
    out["generation"] = info["generation"]
    if "info_sha256" not in info:
        out["unverified"].append("ledger.json")
    files = []
    if info["state_file"]:
        files.append((info["state_file"], info.get("state_sha256"), lambda: _state_of(directory, info)))
    for e in info["edits"]:
        if isinstance(e, dict) and e.get("file"):
            files.append((e["file"], e.get("sha256"), lambda e=e: _edit_of(directory, e)))
    for name, digest, load in files:
        out["n_files"] += 1
        if digest is None:
            out["unverified"].append(name)
        try:
            load()
        except LedgerError as exc:
            damaged(name, exc)
    known = {name for name, _, _ in files}
    stray = sorted(p.name for p in directory.glob("state.*.safetensors") if p.name not in known)
    if stray:
        out["notes"].append(f"state file(s) {stray} are left from an interrupted commit; the next commit removes them")
    extra = sorted(f"edits/{p.name}" for p in (directory / "edits").glob("*.safetensors")
                   if f"edits/{p.name}" not in known)
    if extra:
        out["notes"].append(f"edit file(s) {extra} belong to no committed edit (an interrupted commit); ignored")
    lock = directory / LOCK_NAME
    if lock.exists():
        out["notes"].append(f"{lock} exists: a writer holds the ledger, or one crashed (the next writer takes a "
                            "stale lock over)")
    out["ok"] = not out["damaged"]
    return out


def _gen_of(p: Path) -> int:
    m = re.match(r"state\.(\d+)\.safetensors$", p.name)
    return int(m.group(1)) if m else -1


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
