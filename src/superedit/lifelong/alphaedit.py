"""AlphaEdit (Fang et al. 2025): updates projected on the null space of the preserved knowledge.

P = Û Ûᵀ where Û are the eigenvectors of C = E[k kᵀ] whose eigenvalues are below
``nullspace_threshold`` (absolute, as in the paper, or relative to the largest eigenvalue). For a
key k in the span of the preserved keys, P k ≈ 0 and so every update Δ = (…) P leaves W k unchanged.

For a batch with keys K₁ (d_mlp, n) and residuals R (d_model, n) (MEMIT's spread over layers)::

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹

where K_p are the keys of earlier edits, kept as the running sum Σ K_p K_pᵀ (O(1) memory). Solved in
float64 with ``torch.linalg.solve`` on the transposed system (P G + αI) Y = P K₁ (G = Σ K_p K_pᵀ + K₁K₁ᵀ),
giving the low-rank factors Δ = R Yᵀ.

Projector cache: ``nullspace_projector`` caches P under (key, layer, threshold, relative). ``key`` is
the caller's statistics cache key (the covariance's identity: model, corpus, token count); with
``key=None`` nothing is cached.
"""

from __future__ import annotations

import torch

from ..editing.contexts import context_prefixes
from ..editing.covariance import CovarianceSource
from ..editing.delta import LayerDelta, WeightDelta
from ..editing.keys import compute_keys, keys_at
from ..editing.methods.memit import memit_targets
from ..editing.solve import with_ridge
from ..models import ModelAdapter
from .hparams import AlphaEditHParams

F64 = torch.float64
_PROJECTORS: dict[tuple, torch.Tensor] = {}


def nullspace_projector(C: torch.Tensor, threshold: float = 1e-2, relative: bool = False, key: str | None = None,
                        layer: int | None = None) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of C with eigenvalue < threshold (× λ_max if ``relative``)."""
    ck = (key, layer, float(threshold), bool(relative)) if key is not None else None
    if ck is not None and ck in _PROJECTORS:
        return _PROJECTORS[ck].to(C.device)
    C = C.detach().to(F64)
    evals, evecs = torch.linalg.eigh(0.5 * (C + C.T))
    cut = threshold * float(evals.max()) if relative else threshold
    Uh = evecs[:, evals < cut]
    P = Uh @ Uh.T
    if ck is not None:
        _PROJECTORS[ck] = P
    return P


def clear_projector_cache() -> None:
    _PROJECTORS.clear()


def alphaedit_solve(R: torch.Tensor, K: torch.Tensor, P: torch.Tensor, KpKp: torch.Tensor | None,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (left R (d_model, n), right Y (d_mlp, n)) with Δ = R Yᵀ = R K₁ᵀ P (G P + αI)⁻¹."""
    R, K, P = R.to(F64), K.to(F64), P.to(F64)
    G = K @ K.T if KpKp is None else KpKp.to(F64) + K @ K.T
    A = P @ G + alpha * torch.eye(G.shape[0], dtype=F64, device=G.device)
    Y = torch.linalg.solve(A, P @ K)
    return R, Y


class AlphaEditState:
    """Σ K_p K_pᵀ of the edits so far at one layer (plus the keys added since the last ledger commit)."""

    def __init__(self, layer: int, d_mlp: int, device=None):
        self.layer = int(layer)
        self.KpKp = torch.zeros(d_mlp, d_mlp, dtype=F64, device=device)
        self.n_keys = 0
        self.projector: torch.Tensor | None = None
        self.journal: list[torch.Tensor] = []

    def add_keys(self, K: torch.Tensor, journal: bool = True) -> None:
        K = K.to(self.KpKp.device, F64)
        self.KpKp.add_(K @ K.T)
        self.n_keys += K.shape[1]
        if journal:
            self.journal.append(K.clone())

    def remove_keys(self, K: torch.Tensor) -> None:
        K = K.to(self.KpKp.device, F64)
        self.KpKp.sub_(K @ K.T)
        self.n_keys -= K.shape[1]

    def take_journal(self) -> torch.Tensor | None:
        if not self.journal:
            return None
        K = torch.cat(self.journal, 1)
        self.journal = []
        return K

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"KpKp": self.KpKp.detach().contiguous().cpu(), "counts": torch.tensor([self.n_keys], dtype=torch.int64)}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> "AlphaEditState":
        if tuple(sd["KpKp"].shape) != tuple(self.KpKp.shape):
            raise ValueError(f"KpKp has shape {tuple(sd['KpKp'].shape)}, expected {tuple(self.KpKp.shape)}")
        self.KpKp = sd["KpKp"].to(self.KpKp.device, F64).clone()
        self.n_keys = int(sd["counts"][0]) if "counts" in sd else 0
        self.journal = []
        return self


def alphaedit_step(adapter: ModelAdapter, requests: list, hparams: AlphaEditHParams, stats: CovarianceSource,
                   state: dict[int, AlphaEditState] | None = None, cache_key: str | None = None) -> WeightDelta:
    """One AlphaEdit batch on the model as it is; returns the INCREMENT (``meta["delta_kind"] == "increment"``).

    ``state`` (layer → AlphaEditState) is updated in place with this batch's keys after the solve; the
    adapter's weights are restored on return (apply the delta to continue editing).
    """
    layers = sorted(hparams.layers)
    for l in layers:
        adapter.check_layer(l)
    state = {} if state is None else state
    for l in layers:
        if l not in state:
            state[l] = AlphaEditState(l, adapter.d_mlp, adapter.device)
    prefixes = context_prefixes(adapter, hparams.context_lengths, hparams.n_prefixes, hparams.seed)
    prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
    zs, summaries = memit_targets(adapter, requests, hparams, prefixes)
    originals = {l: adapter.down_weight(l).detach().clone() for l in layers}
    deltas: dict[int, LayerDelta] = {}
    keys: dict[int, torch.Tensor] = {}
    info = []
    try:
        for i, layer in enumerate(layers):
            K = compute_keys(adapter, prompts, subjects, [layer], prefixes, hparams.fact_token)[layer].T.to(F64)
            cur = keys_at(adapter, prompts, subjects, [layers[-1]], hparams.fact_token, site="resid")[layers[-1]]
            R = (zs - cur).T.to(F64) / (len(layers) - i)
            C = with_ridge(stats.mom2(layer).to(adapter.device, F64), hparams.mom2_ridge)
            P = nullspace_projector(C, hparams.nullspace_threshold, hparams.nullspace_relative, key=cache_key, layer=layer)
            state[layer].projector = P
            left, right = alphaedit_solve(R, K, P, state[layer].KpKp, hparams.L2)
            d = LayerDelta(left, right)
            adapter.add_to_down_weight(layer, d.dense(F64))
            deltas[layer], keys[layer] = d, K
            info.append({"layer": layer, "residual_norm": float(R.norm(dim=0).mean()),
                         "key_norm": float(K.norm(dim=0).mean()), "nullspace_dim": int(round(float(P.trace())))})
    finally:
        for l, w in originals.items():
            adapter.set_down_weight(l, w)
    for l, K in keys.items():
        state[l].add_keys(K)
    return WeightDelta(deltas, "alphaedit", {"model": adapter.identity(), "hparams": hparams.to_dict(),
                                             "delta_kind": "increment", "requests": summaries, "layers": info})
