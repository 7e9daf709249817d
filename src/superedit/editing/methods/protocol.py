"""The one method protocol: ``fn(adapter, requests, hparams, stats, state=None) -> StepResult``.

A method edits ``requests`` on the model *as it is* and returns the weight increment it computed
(``StepResult.delta``: apply it to that same model to get the edited one); it restores every weight
it touched before returning, so a call never changes the model.

A method with running state across calls (D4S: running sums; AlphaEdit: Σ K_p K_pᵀ of earlier edits)
declares a state factory in its registry entry. ``state`` is updated in place by the call, and the
call returns in ``StepResult.journal`` the tensors ``state.remove`` needs to take exactly this step
out again (and ``state.add`` to put it back). With ``state=None`` the method starts from a fresh
state built on the model as it is (a single edit). On an exception the state is left as it was.

The ledger (``superedit.lifelong.ledger``) keeps the state on disk (``state_dict``) and the journal of
each step (its edit file), so any step can be undone and a run resumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..delta import WeightDelta


def total_key(layer: int) -> str:
    """Name of W − W₀ at ``layer`` in a ledger's state file (and in a state's ``state_dict`` that holds it)."""
    return f"layer.{layer}.delta"


@dataclass
class StepResult:
    """What one method call produced.

    delta: the weight increment (W_after − W_before) per edited layer, with the method's provenance in
        ``delta.meta`` (``requests``: per-request value summaries, ``timings``, …).
    journal: tensors (``layer.<l>.<name>``) that the method's state needs to undo/redo this step;
        empty for methods without state.
    """

    delta: WeightDelta
    journal: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def meta(self) -> dict:
        return self.delta.meta


class MethodState(Protocol):
    """Running state of a sequential method, for every edited layer."""

    def add(self, journal: dict[str, torch.Tensor]) -> None:
        """Put a step's recorded terms (back) in (redo)."""

    def remove(self, journal: dict[str, torch.Tensor]) -> None:
        """Take a step's recorded terms out (undo)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, named ``layer.<l>.<name>`` (safetensors-able, CPU)."""

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> "MethodState":
        """Restore from :meth:`state_dict` (names of other layers/objects are ignored)."""

    def total_delta(self, layer: int) -> torch.Tensor | None:
        """W − W₀ at ``layer`` (float64) when the state determines it (D4S), else None."""


class PerLayerSums:
    """A method state made of running sums per edited layer (D4S, keel): ``layers`` maps a layer to an
    object with ``add(R, K)`` / ``remove(R, K)``, and a step's journal holds ``layer.<l>.R`` (residuals
    against W₀) and ``layer.<l>.K`` (keys) for each layer it touched. Subclasses add the solve and the
    state dict."""

    def __init__(self, layers: dict):
        self.layers = dict(layers)

    def __getitem__(self, layer: int):
        return self.layers[layer]

    def _terms(self, journal: dict[str, torch.Tensor]):
        for l, sums in self.layers.items():
            if f"layer.{l}.R" in journal:
                yield sums, journal[f"layer.{l}.R"], journal[f"layer.{l}.K"]

    def add(self, journal: dict[str, torch.Tensor]) -> None:
        for sums, R, K in self._terms(journal):
            sums.add(R, K)

    def remove(self, journal: dict[str, torch.Tensor]) -> None:
        for sums, R, K in self._terms(journal):
            sums.remove(R, K)
