"""WeightDelta: the weight change an editing method computes (``StepResult.delta``), kept apart from the
model (PEFT-style).

A delta maps layer → ΔW in the adapter's (d_model, d_mlp) orientation, stored as low-rank factors
(ΔW = left @ rightᵀ) where the method produced them, dense otherwise. ``apply`` adds it and keeps
a copy of the original weights so ``revert`` restores them bit-exactly; ``save``/``load`` use
safetensors + a JSON sidecar (never pickle). The sidecar records the SHA-256 of the tensor file
(``tensors_sha256``) and of its own content (``json_sha256``); ``load`` verifies both (a delta saved before the hash existed loads with a warning)
and refuses tensors holding NaN/±inf, as ``save`` refuses to write them.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SupereditError
from ..models import ModelAdapter
from ..utils.integrity import canonical_sha256, check_finite, sha256_file, verify_sha256
from ..utils.io import atomic_path, write_json_atomic
from ..utils.logs import get_logger

log = get_logger(__name__)
FORMAT = "superedit-delta/1"


class DeltaError(SupereditError):
    pass


@dataclass
class LayerDelta:
    """ΔW at one layer: ``left @ right.T`` (low rank) or ``dense``; shape (d_model, d_mlp)."""

    left: torch.Tensor | None = None  #: (d_model, r)
    right: torch.Tensor | None = None  #: (d_mlp, r)
    dense_: torch.Tensor | None = None  #: (d_model, d_mlp)

    def __post_init__(self):
        if self.dense_ is None and (self.left is None or self.right is None):
            raise DeltaError("a LayerDelta needs either dense_ or both left and right factors")
        if self.left is not None and self.left.dim() == 1:
            self.left, self.right = self.left[:, None], self.right[:, None]

    @property
    def low_rank(self) -> bool:
        return self.dense_ is None

    @property
    def rank_bound(self) -> int:
        return self.left.shape[1] if self.low_rank else min(self.dense_.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense_.shape) if not self.low_rank else (self.left.shape[0], self.right.shape[0])

    def dense(self, dtype=None, device=None) -> torch.Tensor:
        d = self.dense_ if not self.low_rank else self.left.to(torch.float64) @ self.right.to(torch.float64).T
        return d.to(dtype=dtype or d.dtype, device=device or d.device)

    def __add__(self, other: "LayerDelta") -> "LayerDelta":
        if self.low_rank and other.low_rank:
            return LayerDelta(torch.cat([self.left, other.left], 1), torch.cat([self.right, other.right], 1))
        return LayerDelta(dense_=self.dense(torch.float64) + other.dense(torch.float64, self.dense().device))


@dataclass
class WeightDelta:
    """Per-layer weight changes produced by one editing call, plus its provenance."""

    layers: dict[int, LayerDelta]
    method: str
    meta: dict[str, Any] = field(default_factory=dict)
    _originals: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    # ----- model interplay ---------------------------------------------------------------
    def _check(self, adapter: ModelAdapter) -> None:
        model_id = self.meta.get("model")
        if model_id and model_id.get("config_hash") != adapter.identity()["config_hash"]:
            raise DeltaError(f"this {self.method} delta was made for a model with config hash {model_id.get('config_hash')} "
                             f"({model_id.get('source')}), not {adapter.identity()['config_hash']} ({adapter.source})")
        for layer, d in self.layers.items():
            adapter.check_layer(layer)
            if tuple(d.shape) != tuple(adapter.down_weight(layer).shape):
                raise DeltaError(f"delta at layer {layer} has shape {d.shape}, the model's W is {tuple(adapter.down_weight(layer).shape)}")

    @property
    def is_applied(self) -> bool:
        return bool(self._originals)

    @torch.no_grad()
    def apply(self, adapter: ModelAdapter) -> "WeightDelta":
        """W += ΔW on every layer (all checks first: nothing is half-applied)."""
        if self.is_applied:
            raise DeltaError("this delta is already applied; revert it first")
        self._check(adapter)
        originals = {l: adapter.down_weight(l).detach().clone() for l in self.layers}
        try:
            for layer, d in self.layers.items():
                w = adapter.down_weight(layer)
                adapter.add_to_down_weight(layer, d.dense(torch.float64, w.device))
        except BaseException:
            for layer, w0 in originals.items():
                adapter.set_down_weight(layer, w0)
            raise
        self._originals = originals
        return self

    @torch.no_grad()
    def revert(self, adapter: ModelAdapter) -> None:
        """Restore the weights saved by :meth:`apply`, bit-exactly."""
        if not self.is_applied:
            raise DeltaError("this delta is not applied (nothing to revert)")
        for layer, w0 in self._originals.items():
            adapter.set_down_weight(layer, w0)
        self._originals = {}

    @contextmanager
    def applied(self, adapter: ModelAdapter):
        self.apply(adapter)
        try:
            yield adapter
        finally:
            self.revert(adapter)

    # ----- persistence -------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``delta.safetensors`` + ``delta.json`` (with the tensor file's SHA-256) into ``directory``
        (each atomically; the JSON last). Refuses a delta holding NaN/±inf, writing nothing."""
        from safetensors.torch import save_file

        directory = Path(directory)
        tensors = {}
        for l, d in self.layers.items():
            if d.low_rank:
                tensors[f"layer.{l}.left"] = d.left.detach().contiguous().cpu()
                tensors[f"layer.{l}.right"] = d.right.detach().contiguous().cpu()
            else:
                tensors[f"layer.{l}.dense"] = d.dense_.detach().contiguous().cpu()
        check_finite(tensors, f"{directory / 'delta.safetensors'} ({self.method} delta; not saved)", DeltaError)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "delta.safetensors") as tmp:
            save_file(tensors, str(tmp))
            digest = sha256_file(tmp)
        info = {"format": FORMAT, "method": self.method, "layers": sorted(self.layers), "meta": self.meta,
                "tensors_sha256": digest}
        info["json_sha256"] = canonical_sha256(info)
        write_json_atomic(directory / "delta.json", info)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "WeightDelta":
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path, tensor_path = directory / "delta.json", directory / "delta.safetensors"
        if not meta_path.is_file() or not tensor_path.is_file():
            raise DeltaError(f"{directory}: not a saved delta (needs delta.json and delta.safetensors)")
        try:
            info = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DeltaError(f"{meta_path}: cannot read the saved delta's description ({exc}); the file is damaged: "
                             "restore it from a backup or save the delta again") from exc
        missing = [k for k in ("method", "layers") if not isinstance(info, dict) or k not in info]
        if missing:
            raise DeltaError(f"{meta_path}: not a saved delta's description (missing field(s) {missing}); "
                             "restore it from a backup or save the delta again")
        own = info.get("json_sha256")
        if own is not None and canonical_sha256({k: v for k, v in info.items() if k != "json_sha256"}) != own:
            raise DeltaError(f"{meta_path}: the saved delta's description is damaged (its content does not hash to the "
                             f"recorded {own}); restore it from a backup or save the delta again (nothing was applied)")
        digest = info.get("tensors_sha256")
        if digest is None:
            log.warning("%s: no content hash recorded (saved by an older superedit); %s is not verified",
                        meta_path, tensor_path)
        else:
            verify_sha256(tensor_path, digest, "saved delta's tensor",
                          "restore it from a backup or save the delta again (nothing was applied)", DeltaError)
        try:
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # noqa: BLE001
            raise DeltaError(f"{tensor_path}: cannot read the saved delta ({exc}); the file is damaged: restore it "
                             "from a backup or save the delta again") from exc
        check_finite(tensors, f"{tensor_path} (saved delta)", DeltaError)
        layers = {}
        for l in info["layers"]:
            try:
                if f"layer.{l}.dense" in tensors:
                    layers[int(l)] = LayerDelta(dense_=tensors[f"layer.{l}.dense"])
                else:
                    layers[int(l)] = LayerDelta(tensors[f"layer.{l}.left"], tensors[f"layer.{l}.right"])
            except (KeyError, ValueError, TypeError) as exc:
                raise DeltaError(f"{tensor_path}: no tensors for layer {l!r}, which {meta_path} lists ({exc}); "
                                 "the delta's files do not belong together: save the delta again") from exc
        return cls(layers=layers, method=info["method"], meta=info.get("meta", {}))
