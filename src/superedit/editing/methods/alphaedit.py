"""AlphaEdit (Fang et al. 2025): updates projected on the null space of the preserved knowledge.

P = Û Ûᵀ where Û are the eigenvectors of C = E[k kᵀ] whose eigenvalues are below
``nullspace_threshold`` (absolute, as in the paper, or relative to the largest eigenvalue). For a
key k in the span of the preserved keys, P k ≈ 0 and so every update Δ = (…) P leaves W k unchanged.

For a batch with keys K₁ (d_mlp, n) and residuals R (d_model, n) (MEMIT's spread over layers,
``spread.spread_update``)::

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹

where K_p are the keys of earlier edits, kept in the state as the running sum Σ K_p K_pᵀ (O(1)
memory). The transposed system (P G + αI) Y = P K₁ (G = Σ K_p K_pᵀ + K₁K₁ᵀ) gives the low-rank
factors Δ = R Yᵀ. Its solution lies in range(P) (αY = P(K₁ − G Y)), so it is also the solution of
the symmetric positive definite system (P G P + αI) Y = P K₁, and with P = Û Ûᵀ, Y = Û z where

    (Ûᵀ G Û + α I_r) z = Ûᵀ K₁                                  (r × r, r = dim of the null space)

solved in float64 by Cholesky (no d_mlp × d_mlp LU).

Memory (issue #15, d_mlp = 14,336 for Llama-3-8B): P is never formed. ``NullSpaceProjector`` keeps
the smaller orthonormal basis: Û (d × r) when r ≤ d/2 (P x = Û(Ûᵀx)), else the complement V
(d × (d − r), P x = x − V(Vᵀx)); at most d²/2 numbers instead of d². The dense d × d projector of
earlier versions (``nullspace_projector``, kept as the reference) was 1.6 GB in float64 at that width.
The state's Σ K_p K_pᵀ stays dense d × d (float64): it is what the ledger saves and resumes from.

The projector is computed once per state object from the covariance source (``AlphaEditState.projector``);
nothing is cached at module level.
"""

from __future__ import annotations

import torch

from ...models import ModelAdapter
from ..covariance import CovarianceSource
from ..delta import LayerDelta, WeightDelta
from ..hparams import AlphaEditHParams
from ..solve import spd_solve, with_ridge
from .protocol import StepResult
from .spread import spread_update

F64 = torch.float64


def _eigh_split(C: torch.Tensor, threshold: float, relative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of the symmetric part of C (float64) and the mask of those below the threshold."""
    C = C.detach().to(F64)
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.T))
    cut = threshold * float(evals.max()) if relative else threshold
    return evecs, evals < cut


def nullspace_projector(C: torch.Tensor, threshold: float = 1e-2, relative: bool = False) -> torch.Tensor:
    """P = Û Ûᵀ (d, d), dense, over the eigenvectors of C (d, d) with eigenvalue < threshold (× λ_max if
    ``relative``). The reference form; the methods keep :func:`nullspace_basis` (no d × d matrix)."""
    evecs, low = _eigh_split(C, threshold, relative)
    Uh = evecs[:, low]
    return Uh @ Uh.T


class NullSpaceProjector:
    """P = Û Ûᵀ = I − V Vᵀ kept as the smaller of its two orthonormal bases (module docstring).

    ``basis`` (d, m) float64 with orthonormal columns; ``complement`` False: basis = Û (P = B Bᵀ), True:
    basis = V, the eigenvectors above the threshold (P = I − B Bᵀ). ``P @ X`` applies it without forming P."""

    def __init__(self, basis: torch.Tensor, complement: bool):
        self.basis, self.complement = basis, bool(complement)

    @property
    def d(self) -> int:
        return int(self.basis.shape[0])

    @property
    def rank(self) -> int:
        """dim of the null space (the trace of P)."""
        m = int(self.basis.shape[1])
        return self.d - m if self.complement else m

    @property
    def nbytes(self) -> int:
        return self.basis.numel() * self.basis.element_size()

    @property
    def device(self) -> torch.device:
        return self.basis.device

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """P X for X (d,) or (d, n), in float64 on the basis' device."""
        X = X.to(self.basis.device, F64)
        BtX = self.basis.T @ X
        return X - self.basis @ BtX if self.complement else self.basis @ BtX

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        return self.apply(X)

    def to(self, device) -> "NullSpaceProjector":
        return self if torch.device(device) == self.basis.device else NullSpaceProjector(self.basis.to(device),
                                                                                         self.complement)

    def trace(self) -> torch.Tensor:
        return torch.tensor(float(self.rank), dtype=F64)

    def dense(self) -> torch.Tensor:
        """P as a d × d matrix (tests and small models only)."""
        B = self.basis
        return (torch.eye(self.d, dtype=F64, device=B.device) - B @ B.T) if self.complement else B @ B.T


def nullspace_basis(C: torch.Tensor, threshold: float = 1e-2, relative: bool = False) -> NullSpaceProjector:
    """The projector of :func:`nullspace_projector` as a :class:`NullSpaceProjector` (same eigenvectors,
    the smaller basis kept; the d × d eigenvector matrix is freed on return)."""
    evecs, low = _eigh_split(C, threshold, relative)
    r = int(low.sum())
    complement = r > evecs.shape[0] - r
    basis = (evecs[:, ~low] if complement else evecs[:, low]).contiguous()  # a copy: evecs is freed
    return NullSpaceProjector(basis, complement)


def alphaedit_solve(R: torch.Tensor, K: torch.Tensor, P: "torch.Tensor | NullSpaceProjector",
                    KpKp: torch.Tensor | None, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (left R (d_model, n), right Y (d_mlp, n)) with Δ = R Yᵀ = R K₁ᵀ P (G P + αI)⁻¹, in float64.

    With a :class:`NullSpaceProjector` the symmetric positive definite form (module docstring) by Cholesky:
    r × r when the basis is Û, (P G P + αI) when it is the complement V. A dense P (d, d) takes the
    reference path: P G + αI is not symmetric, so an LU solve (``torch.linalg.solve``)."""
    if not isinstance(P, NullSpaceProjector):
        return alphaedit_solve_dense(R, K, P, KpKp, alpha)
    dev = P.device
    R, K = R.to(F64), K.to(dev, F64)
    B = P.basis
    if not P.complement:  # Y = Û z, (Ûᵀ G Û + αI) z = ÛᵀK
        Kh = B.T @ K
        Gh = Kh @ Kh.T if KpKp is None else B.T @ (KpKp.to(dev, F64) @ B) + Kh @ Kh.T
        Gh.diagonal().add_(alpha)
        return R, B @ spd_solve(Gh, Kh)
    G = K @ K.T if KpKp is None else KpKp.to(dev, F64) + K @ K.T  # (d, d), a new tensor
    G.sub_((G @ B) @ B.T)  # G P
    G.sub_(B @ (B.T @ G))  # P G P
    G.diagonal().add_(alpha)
    return R, spd_solve(G, P.apply(K))


def alphaedit_solve_dense(R: torch.Tensor, K: torch.Tensor, P: torch.Tensor, KpKp: torch.Tensor | None,
                          alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: (P G + αI) Y = P K with a dense P (d, d), LU (``torch.linalg.solve``)."""
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
        """``device``: one device, or {layer: device} (each layer's sum lives with its weight)."""
        self.hparams, self.stats = hparams, stats
        where = device if isinstance(device, dict) else {int(l): device for l in layers}
        self.KpKp = {int(l): torch.zeros(d_mlp, d_mlp, dtype=F64, device=where[int(l)]) for l in layers}
        self.n_keys = {int(l): 0 for l in layers}
        self._projectors: dict[int, NullSpaceProjector] = {}

    def projector(self, layer: int) -> NullSpaceProjector:
        if layer not in self._projectors:
            if self.stats is None:
                raise ValueError(f"AlphaEdit at layer {layer} needs the key covariance (stats) for its projector")
            C = with_ridge(self.stats.mom2(layer).to(self.KpKp[layer].device, F64), self.hparams.mom2_ridge)
            self._projectors[layer] = nullspace_basis(C, self.hparams.nullspace_threshold,
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
    return AlphaEditState(sorted(hparams.layers), adapter.d_mlp, hparams, stats,
                          {l: adapter.layer_device(l) for l in hparams.layers})


def alphaedit_step(adapter: ModelAdapter, requests: list, hparams: AlphaEditHParams, stats: CovarianceSource,
                   state: AlphaEditState | None = None) -> StepResult:
    """One AlphaEdit batch on the model as it is; returns the increment and adds the batch's keys to ``state``
    (None: a fresh state, no earlier keys) after the whole solve."""
    state = make_alphaedit_state(adapter, hparams, stats) if state is None else state
    return projected_step(adapter, requests, hparams, state, "alphaedit")


def projected_step(adapter: ModelAdapter, requests: list, hparams: AlphaEditHParams, state: AlphaEditState,
                   method: str, targets=None) -> StepResult:
    """MEMIT's layer loop with AlphaEdit's solve in ``state.projector(layer)``'s range (any state with
    AlphaEdit's interface: AlphaEdit's own, guard's); the batch's keys join ``state`` after the whole solve.
    ``targets``: precomputed z and value summaries (:func:`.spread.spread_update`), None to compute them."""
    journal: dict[str, torch.Tensor] = {}

    def solve(layer: int, K: torch.Tensor, R: torch.Tensor):
        P = state.projector(layer)
        left, right = alphaedit_solve(R, K, P, state.KpKp[layer], hparams.L2)
        journal[f"layer.{layer}.K"] = K
        return LayerDelta(left, right), {"nullspace_dim": P.rank}

    sp = spread_update(adapter, requests, hparams, solve, targets)
    state.add(journal)
    return StepResult(WeightDelta(sp.deltas, method, {"model": adapter.identity(), "hparams": hparams.to_dict(),
                                                      "requests": sp.requests, "layers": sp.layers,
                                                      "timings": sp.timings}), journal)
