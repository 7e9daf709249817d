"""The edit ledger: a lifelong-editing run on disk, crash-safe, with undo.

Layout of a ledger directory::

    ledger.json                 format, generation g, base model identity + fingerprints of the base
                                weights of the edited layers, method, hparams, and the edits in order
                                (requests, layers, method, timestamp, status applied|undone, file)
    state.<g>.safetensors       the live state, O(1) in the number of edits: per edited layer the
                                current total delta ``layer.L.delta`` (W − W₀, float64), and for D4S the
                                running sums ``layer.L.S_rk``/``layer.L.S_kk``, for AlphaEdit ``layer.L.KpKp``
    edits/<i>.safetensors       append-only, one per edit: what undo needs. D4S: the edit's columns
                                ``layer.L.R``/``layer.L.K`` (residuals against W₀, keys); other methods:
                                the edit's increment (``layer.L.left``/``right`` or ``dense``) and, for
                                AlphaEdit, ``layer.L.K``. Keeping these out of the live state keeps it O(1)
                                while any edit stays undoable; the directory grows by O(d·k) per edit.

The base weights W₀ are never stored: they are re-read from the base model (checked against the
SHA-256 fingerprints in ledger.json).

Commit protocol (``record``/``undo``/``redo``): write ``edits/<i>.safetensors`` (atomic), write
``state.<g+1>.safetensors`` (atomic), then atomically replace ``ledger.json`` with generation g+1 — the
commit point — and only then delete older state files. A crash before the json write leaves
generation g (whose state file still exists) as the ledger; stray newer state files are ignored and
cleaned up by the next commit.

Undo: D4S ledgers can undo/redo ANY edit exactly (its terms are removed from the sums and the layer
re-solved; the result equals never having made the edit, up to float64 rounding). Ledgers of methods
that edit on top of each other (rome, memit, ft, alphaedit) can only undo the last applied edit
exactly (subtract its stored increment) and redo the edit undone last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import LedgerError
from ..models import ModelAdapter
from ..utils.io import atomic_path, write_json_atomic
from ..utils.logs import get_logger

log = get_logger(__name__)
F64 = torch.float64
FORMAT = "superedit-ledger/1"
SUM_METHODS = ("d4s",)  #: ledgers whose state is running sums: any edit can be undone


def _before_commit() -> None:
    """Called between writing the new state file and ledger.json (tests patch it to simulate a crash)."""


def weight_fingerprint(adapter: ModelAdapter, layer: int) -> str:
    w = adapter.down_weight_param(layer).detach().cpu().contiguous()
    return hashlib.sha256(w.view(torch.uint8).numpy().tobytes()).hexdigest()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def _load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise LedgerError(f"{path}: the {what} file is missing; the ledger directory is incomplete "
                          "(restore it from a copy, or start a new ledger)")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise LedgerError(f"{path}: cannot read the {what} file ({exc}); it is corrupt "
                          "(restore it from a copy, or start a new ledger)") from exc


def _request_dict(r: Any) -> dict:
    return r.to_dict() if hasattr(r, "to_dict") else dict(r)


class Ledger:
    """A lifelong-editing ledger directory (see module docstring). Use :meth:`create` or :meth:`open`."""

    def __init__(self, directory: Path, info: dict, tensors: dict[str, torch.Tensor]):
        self.dir = Path(directory)
        self.info = info
        self.tensors = tensors
        self.states: dict | None = None  #: live D4SState/AlphaEditState objects, once attached
        self._base: dict[int, torch.Tensor] | None = None
        self._base_owner: int | None = None

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
    def open(cls, directory: str | os.PathLike) -> "Ledger":
        directory = Path(directory)
        path = directory / "ledger.json"
        if not path.is_file():
            raise LedgerError(f"{directory}: no ledger.json here; not a ledger directory (create one with Ledger.create)")
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{path}: corrupt ledger file ({exc}); restore it from a copy or start a new ledger") from exc
        missing = [k for k in ("format", "generation", "method", "hparams", "layers", "edits", "state_file", "model")
                   if not isinstance(info, dict) or k not in info]
        if missing:
            raise LedgerError(f"{path}: not a superedit ledger (missing field(s) {missing})")
        if info["format"] != FORMAT:
            raise LedgerError(f"{path}: unsupported ledger format {info['format']!r} (this superedit reads {FORMAT})")
        tensors = _load_tensors(directory / info["state_file"], "state") if info["state_file"] else {}
        newer = [p.name for p in directory.glob("state.*.safetensors") if _gen_of(p) > info["generation"]]
        if newer:
            log.warning("%s: ignoring %s from an interrupted commit (generation %d is the last complete one)",
                        directory, ", ".join(sorted(newer)), info["generation"])
        return cls(directory, info, tensors)

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

    def hparams(self):
        from ..editing.methods import get_method

        return get_method(self.method).hparams_cls.from_dict(self.info["hparams"], source=str(self.dir / "ledger.json"))

    def total_delta(self, layer: int) -> torch.Tensor:
        """W − W₀ at ``layer`` (float64; zeros before the first edit)."""
        if self.states is not None and self.method in SUM_METHODS:
            return self.states[layer].delta()
        t = self.tensors.get(f"layer.{layer}.delta")
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
        return adapter

    def load_states(self, adapter: ModelAdapter, stats=None, cache_key: str | None = None) -> dict:
        """Rebuild and attach the live method state (D4S: D4SState per layer, factor re-computed once;
        AlphaEdit: AlphaEditState per layer). ``stats`` is needed for D4S."""
        base = self.base_weights(adapter)
        hp = self.hparams()
        if self.method == "d4s":
            from .d4s import make_states

            if stats is None:
                raise LedgerError("resuming a D4S ledger needs the covariance source (stats) it was made with")
            states = make_states(adapter, hp, stats, base=base, cache_key=cache_key)
            for l, st in states.items():
                if f"layer.{l}.S_rk" in self.tensors:
                    st.load_state_dict({"S_rk": self.tensors[f"layer.{l}.S_rk"], "S_kk": self.tensors[f"layer.{l}.S_kk"],
                                        "X": self.tensors[f"layer.{l}.delta"],
                                        "counts": self.tensors.get(f"layer.{l}.counts", torch.tensor([0, 0]))})
        elif self.method == "alphaedit":
            from .alphaedit import AlphaEditState

            states = {}
            for l in self.layers:
                st = AlphaEditState(l, base[l].shape[1], base[l].device)
                if f"layer.{l}.KpKp" in self.tensors:
                    st.load_state_dict({"KpKp": self.tensors[f"layer.{l}.KpKp"]})
                states[l] = st
        else:
            states = {}
        self.states = states
        return states

    # ----- commits --------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for l, st in (self.states or {}).items():
            if self.method == "d4s":
                sd = st.state_dict(with_factor=False)
                out[f"layer.{l}.S_rk"], out[f"layer.{l}.S_kk"] = sd["S_rk"], sd["S_kk"]
                out[f"layer.{l}.delta"], out[f"layer.{l}.counts"] = sd["X"], sd["counts"]
            elif self.method == "alphaedit":
                out[f"layer.{l}.KpKp"] = st.state_dict()["KpKp"]
        return out

    def _commit(self, info: dict, tensors: dict[str, torch.Tensor], edit_file: tuple[str, dict] | None = None) -> None:
        if edit_file is not None:
            _save_tensors(self.dir / edit_file[0], edit_file[1])
        gen = int(self.info["generation"]) + 1
        state_name = f"state.{gen}.safetensors"
        _save_tensors(self.dir / state_name, tensors)
        _before_commit()
        info = {**info, "generation": gen, "state_file": state_name, "updated": _now()}
        write_json_atomic(self.dir / "ledger.json", info)
        self.info, self.tensors = info, tensors
        for p in self.dir.glob("state.*.safetensors"):
            if p.name != state_name:
                try:
                    p.unlink()
                except OSError:  # pragma: no cover
                    pass

    def record(self, requests: list, delta_or_state, *, state: dict | None = None) -> int:
        """Commit one completed edit; returns its index.

        ``delta_or_state``: for D4S the dict layer → D4SState that ``d4s_step`` updated (the edit's (R, K)
        columns come from their journals); otherwise the increment WeightDelta the method returned
        (pass AlphaEdit's states as ``state=`` to persist Σ K_p K_pᵀ).
        """
        index = len(self.edits)
        rel = f"edits/{index:05d}.safetensors"
        edit_tensors: dict[str, torch.Tensor] = {}
        if self.method in SUM_METHODS:
            if not isinstance(delta_or_state, dict):
                raise LedgerError(f"a {self.method} ledger records the dict of D4S states that d4s_step updated")
            self.states = delta_or_state
            for l, st in delta_or_state.items():
                if st.journal:
                    edit_tensors[f"layer.{l}.R"] = torch.cat([r for r, _ in st.journal], 1)
                    edit_tensors[f"layer.{l}.K"] = torch.cat([k for _, k in st.journal], 1)
            tensors = self._state_tensors()
        else:
            delta = delta_or_state
            if delta.meta.get("delta_kind") == "total":
                raise LedgerError("record() of an increment ledger needs the edit's increment, not a total delta")
            if state is not None:
                self.states = state
            tensors = dict(self._state_tensors())
            for l, d in delta.layers.items():
                if l not in self.layers:
                    raise LedgerError(f"the delta edits layer {l}, but this ledger covers layers {self.layers}")
                if d.low_rank:
                    edit_tensors[f"layer.{l}.left"], edit_tensors[f"layer.{l}.right"] = d.left, d.right
                else:
                    edit_tensors[f"layer.{l}.dense"] = d.dense_
                tensors[f"layer.{l}.delta"] = self.tensors.get(f"layer.{l}.delta", torch.zeros(d.shape, dtype=F64)).to(F64) \
                    + d.dense(F64).cpu()
            for l in self.layers:
                tensors.setdefault(f"layer.{l}.delta", self.tensors.get(f"layer.{l}.delta", torch.zeros(0)))
            tensors = {k: v for k, v in tensors.items() if v.numel()}
            for l, st in (state or {}).items():
                if st.journal:
                    edit_tensors[f"layer.{l}.K"] = torch.cat(st.journal, 1)
        entry = {"index": index, "requests": [_request_dict(r) for r in requests], "layers": self.layers,
                 "method": self.method, "timestamp": _now(), "status": "applied", "file": rel}
        info = {**self.info, "edits": self.edits + [entry]}
        self._commit(info, tensors, (rel, edit_tensors))
        for st in (self.states or {}).values():  # committed: the journals are on disk now
            st.journal = []
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
        active = self.active()
        if index is None:
            if not active:
                raise LedgerError(f"{self.dir}: no applied edit to undo")
            index = active[-1]
        e = self._edit(index)
        want = "applied" if undo else "undone"
        if e["status"] != want:
            raise LedgerError(f"edit #{index} is {e['status']}; only {want} edits can be {'undone' if undo else 'redone'}")
        data = _load_tensors(self.dir / e["file"], f"edit #{index}")
        if self.method in SUM_METHODS:
            if self.states is None:
                raise LedgerError("undo/redo of a D4S ledger needs its live state: call ledger.load_states(adapter, stats) first")
            for l, st in self.states.items():
                if f"layer.{l}.R" in data:
                    R, K = data[f"layer.{l}.R"], data[f"layer.{l}.K"]
                    if undo:
                        st.remove(R, K)
                    else:
                        st.add(R, K, journal=False)
            tensors = self._state_tensors()
        else:
            if undo and index != active[-1]:
                raise LedgerError(f"method {self.method!r} applies edits on top of each other, so only the last applied "
                                  f"edit (#{active[-1]}) can be undone exactly; undo #{active[-1]} first "
                                  "(the 'd4s' method's ledger can undo any edit)")
            if not undo:
                undone_after = [x["index"] for x in self.edits if x["status"] == "undone"
                                and x["index"] > (active[-1] if active else -1)]
                if not undone_after or index != undone_after[0]:
                    raise LedgerError(f"method {self.method!r}: only the edit undone last, right after the last applied "
                                      f"one, can be redone exactly (candidate: {undone_after[:1] or 'none'})")
            sign = -1.0 if undo else 1.0
            tensors = dict(self.tensors)
            for l in self.layers:
                if f"layer.{l}.dense" in data:
                    inc = data[f"layer.{l}.dense"].to(F64)
                elif f"layer.{l}.left" in data:
                    inc = data[f"layer.{l}.left"].to(F64) @ data[f"layer.{l}.right"].to(F64).T
                else:
                    continue
                tensors[f"layer.{l}.delta"] = tensors[f"layer.{l}.delta"].to(F64) + sign * inc
                if f"layer.{l}.K" in data and self.states and l in self.states:
                    K = data[f"layer.{l}.K"]
                    self.states[l].remove_keys(K) if undo else self.states[l].add_keys(K, journal=False)
            tensors.update(self._state_tensors())
        self._commit(self._set_status(index, "undone" if undo else "applied"), tensors)

    # ----- export ---------------------------------------------------------------------------
    def export(self, directory: str | os.PathLike, mode: str = "deltas", adapter: ModelAdapter | None = None) -> Path:
        """``deltas``: the total W − W₀ as a saved WeightDelta (+ ``edits.json``); ``model``: the edited model
        (``save_pretrained`` of ``adapter`` with the ledger applied; needs the base ``adapter``)."""
        directory = Path(directory)
        if mode == "deltas":
            self.delta().save(directory)
            write_json_atomic(directory / "edits.json", {"ledger": str(self.dir), "generation": self.generation,
                                                         "method": self.method, "edits": self.edits})
            return directory
        if mode == "model":
            if adapter is None:
                raise LedgerError("export(mode='model') needs the base model: pass adapter=")
            self.apply_to(adapter)
            tmp = directory.with_name(f".{directory.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            adapter.model.save_pretrained(str(tmp), safe_serialization=True)
            if adapter.tokenizer is not None:
                adapter.tokenizer.save_pretrained(str(tmp))
            write_json_atomic(tmp / "superedit_ledger.json", {"ledger": str(self.dir), "generation": self.generation,
                                                              "method": self.method, "edits": self.edits})
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
            return directory
        raise LedgerError(f"export mode must be 'deltas' or 'model' (got {mode!r})")

    def step(self, adapter: ModelAdapter, requests: list, stats=None, cache_key: str | None = None) -> int:
        """Run the ledger's method on ``requests`` against the edited model, commit, and update ``adapter``.

        The adapter must be the model this ledger is applied to (call ``apply_to`` first); the states are
        loaded on first use.
        """
        from ..editing.methods import get_method

        hp = self.hparams()
        if self.states is None and self.method in ("d4s", "alphaedit"):
            self.load_states(adapter, stats, cache_key)
        fn = get_method(self.method).fn
        if self.method in ("d4s", "alphaedit"):
            delta = fn(adapter, requests, hp, stats, self.states, cache_key=cache_key)
        else:
            delta = fn(adapter, requests, hp, stats)
        index = self.record(requests, self.states if self.method in SUM_METHODS else delta,
                            state=self.states if self.method == "alphaedit" else None)
        self.apply_to(adapter)
        return index


def _gen_of(p: Path) -> int:
    m = re.match(r"state\.(\d+)\.safetensors$", p.name)
    return int(m.group(1)) if m else -1


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
