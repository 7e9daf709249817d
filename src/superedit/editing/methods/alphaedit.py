"""AlphaEdit (Fang et al. 2025): updates projected on the null space of the preserved knowledge.

P = Û Ûᵀ where Û are the eigenvectors of C = E[k kᵀ] whose eigenvalues are below
``nullspace_threshold`` (absolute, as in the paper, or relative to the largest eigenvalue). For a
key k in the span of the preserved keys, P k ≈ 0 and so every update Δ = (…) P leaves W k unchanged.

For a batch with keys K₁ (d_mlp, n) and residuals R (d_model, n) (MEMIT's spread over layers,
``spread.spread_update``)::

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹

where K_p are the keys of earlier edits, kept in the state as the running sum Σ K_p K_pᵀ (O(1)
memory). Solved in float64 on the transposed system (P G + αI) Y = P K₁ (G = Σ K_p K_pᵀ + K₁K₁ᵀ),
giving the low-rank factors Δ = R Yᵀ.

The projector is computed once per state object from the covariance source (``AlphaEditState.projector``);
nothing is cached at module level.
"""

from __future__ import annotations

import torch

from ...models import ModelAdapter
from ..covariance import CovarianceSource
from ..delta import LayerDelta, WeightDelta
from ..hparams import AlphaEditHParams
from ..solve import with_ridge
from .protocol import StepResult
from .spread import spread_update

F64 = torch.float64


def nullspace_projector(C: torch.Tensor, threshold: float = 1e-2, relative: bool = False) -> torch.Tensor:
    """P = Û Ûᵀ (d, d) over the eigenvectors of C (d, d) with eigenvalue < threshold (× λ_max if ``relative``)."""
    C = C.detach().to(F64)
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.T))
    cut = threshold * float(evals.max()) if relative else threshold
    Uh = evecs[:, evals < cut]
    return Uh @ Uh.T


def alphaedit_solve(R: torch.Tensor, K: torch.Tensor, P: torch.Tensor, KpKp: torch.Tensor | None,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (left R (d_model, n), right Y (d_mlp, n)) with Δ = R Yᵀ = R K₁ᵀ P (G P + αI)⁻¹.

    P G + αI is not symmetric, so this is an LU solve (``torch.linalg.solve``), not a Cholesky one."""
    R, K, P = R.to(F64), K.to(F64), P.to(F64)
    G = K @ K.T if KpKp is None else KpKp.to(F64) + K @ K.T
    A = P @ G + alpha * torch.eye(G.shape[0], dtype=F64, device=G.device)
    Y = torch.linalg.solve(A, P @ K)
    return R, Y


class AlphaEditState:
    """Σ K_p K_pᵀ of the edits so far per layer, and the null-space projector P per layer.

    Journal of a step: ``layer.<l>.K`` (d_mlp, n), the keys the step added. The projector comes from
    ``stats`` (C with ``hparams.mom2_ridge``) on first use and lives on this object.
    """

    def __init__(self, layers: list[int], d_mlp: int, hparams: AlphaEditHParams, stats: CovarianceSource | None,
                 device=None):
        self.hparams, self.stats = hparams, stats
        self.KpKp = {int(l): torch.zeros(d_mlp, d_mlp, dtype=F64, device=device) for l in layers}
        self.n_keys = {int(l): 0 for l in layers}
        self._projectors: dict[int, torch.Tensor] = {}

    def projector(self, layer: int) -> torch.Tensor:
        if layer not in self._projectors:
            if self.stats is None:
                raise ValueError(f"AlphaEdit at layer {layer} needs the key covariance (stats) for its projector")
            C = with_ridge(self.stats.mom2(layer).to(self.KpKp[layer].device, F64), self.hparams.mom2_ridge)
            self._projectors[layer] = nullspace_projector(C, self.hparams.nullspace_threshold,
                                                          self.hparams.nullspace_relative)
        return self._projectors[layer]

    def _keys(self, journal: dict[str, torch.Tensor]):
        for l in self.KpKp:
            if f"layer.{l}.K" in journal:
                yield l, journal[f"layer.{l}.K"].to(self.KpKp[l].device, F64)

    def add(self, journal: dict[str, torch.Tensor]) -> None:
        for l, K in self._keys(journal):
            self.KpKp[l].add_(K @ K.T)
            self.n_keys[l] += K.shape[1]

    def remove(self, journal: dict[str, torch.Tensor]) -> None:
        for l, K in self._keys(journal):
            self.KpKp[l].sub_(K @ K.T)
            self.n_keys[l] -= K.shape[1]

    def total_delta(self, layer: int) -> None:
        return None  # increments add up in the ledger

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for l, G in self.KpKp.items():
            out[f"layer.{l}.KpKp"] = G.detach().to("cpu", copy=True)  # a copy: KpKp changes in place
            out[f"layer.{l}.counts"] = torch.tensor([self.n_keys[l]], dtype=torch.int64)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> "AlphaEditState":
        for l, G in self.KpKp.items():
            name = f"layer.{l}.KpKp"
            if name not in sd:
                continue
            if tuple(sd[name].shape) != tuple(G.shape):
                raise ValueError(f"{name} has shape {tuple(sd[name].shape)}, expected {tuple(G.shape)}")
            self.KpKp[l] = sd[name].to(G.device, F64).clone()
            counts = sd.get(f"layer.{l}.counts")
            self.n_keys[l] = int(counts[0]) if counts is not None else 0
        return self


def make_alphaedit_state(adapter: ModelAdapter, hparams: AlphaEditHParams, stats: CovarianceSource | None,
                         base: dict[int, torch.Tensor] | None = None) -> AlphaEditState:
    """An empty state (no earlier keys) for ``hparams.layers``."""
    for l in hparams.layers:
        adapter.check_layer(l)
    return AlphaEditState(sorted(hparams.layers), adapter.d_mlp, hparams, stats, adapter.device)


def alphaedit_step(adapter: ModelAdapter, requests: list, hparams: AlphaEditHParams, stats: CovarianceSource,
                   state: AlphaEditState | None = None) -> StepResult:
    """One AlphaEdit batch on the model as it is; returns the increment and adds the batch's keys to ``state``
    (None: a fresh state, no earlier keys) after the whole solve."""
    state = make_alphaedit_state(adapter, hparams, stats) if state is None else state
    journal: dict[str, torch.Tensor] = {}

    def solve(layer: int, K: torch.Tensor, R: torch.Tensor):
        P = state.projector(layer)
        left, right = alphaedit_solve(R, K, P, state.KpKp[layer], hparams.L2)
        journal[f"layer.{layer}.K"] = K
        return LayerDelta(left, right), {"nullspace_dim": int(round(float(P.trace())))}

    sp = spread_update(adapter, requests, hparams, solve)
    state.add(journal)
    return StepResult(WeightDelta(sp.deltas, "alphaedit", {"model": adapter.identity(), "hparams": hparams.to_dict(),
                                                           "requests": sp.requests, "layers": sp.layers,
                                                           "timings": sp.timings}), journal)
