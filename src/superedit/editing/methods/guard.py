"""guard (superedit): AlphaEdit whose update space also leaves out the directions subject keys share.

Why (measured on SmolLM2-135M, layers 1–4, ``docs/results/lifelong.md`` "guard"): with AlphaEdit's
projector P the interference identity reads

    shift of an untouched key k_j's value after edit i  =  p_P(i, j) · δ_i,   p_P = k_iᵀ P k_j / k_iᵀ P k_i

(the rank-one form of ``Δ = R K₁ᵀ P (…)⁻¹``). Between the edits of a real stream and the retention
probe's subjects, mean |p_P| under AlphaEdit's P (0.030–0.034) is no smaller than under ROME/MEMIT's
C⁻¹ (0.028–0.031): the null space of C (839–1,224 of 1,536 directions at the paper's threshold) still
holds 48–72% of an edit key's energy. Part of p_P is shared by every pair — its mean over edits
|E_i p_P(i, j)| is 0.007–0.012 — and a shared part adds up linearly over a stream (N · E_i p_P) where
the rest grows like √N. That shared part lives in few directions: the top eigenvectors of subject
keys' second moment. Removing the top m = 16 directions, estimated on subjects the stream never
evaluates (a tuning split), from the update space cut the shared part by 37–64% at every layer on
held-out subjects, for 2–4% (relative) of the edit keys' energy in the update space.

So guard's projector is P' = P − Q Qᵀ, Q an orthonormal basis of P S, S (d_mlp, m) the top-m
eigenvectors of E[k_s k_sᵀ] over the guard requests' subject keys (ROME's k*, read once on the
unedited model and kept in the state, so a resumed run uses the same S). Everything else is
AlphaEdit's solve (``alphaedit_solve`` with P'): Δ = R K₁ᵀ P' (K_p K_pᵀ P' + K₁ K₁ᵀ P' + α I)⁻¹.
"""

from __future__ import annotations

import torch

from ...errors import UsageError
from ...models import ModelAdapter
from ..contexts import context_prefixes
from ..covariance import CovarianceSource
from ..hparams import GuardHParams
from ..keys import compute_keys
from ..solve import with_ridge
from .alphaedit import AlphaEditState, NullSpaceProjector, nullspace_basis, projected_step
from .protocol import StepResult

F64 = torch.float64


def shared_directions(keys: torch.Tensor, m: int) -> torch.Tensor:
    """The top-``m`` eigenvectors (d, m) float64 of the keys' second moment E[k kᵀ] (keys (n, d))."""
    K = keys.detach().to(F64)
    _, vecs = torch.linalg.eigh(K.T @ K / max(1, K.shape[0]))
    return vecs[:, vecs.shape[1] - m:].contiguous() if m else vecs[:, :0]


def without_directions(P: NullSpaceProjector, S: torch.Tensor) -> NullSpaceProjector:
    """P' = P − Q Qᵀ with Q an orthonormal basis of P S (the part of span S inside P's range).

    Kept, like P, as the smaller of its two bases: with the complement V (P = I − V Vᵀ) the new
    complement is [V, Q] (Q ⊥ V); with Û (P = Û Ûᵀ) the new basis spans Û − Q Qᵀ Û."""
    if S.shape[1] == 0:
        return P
    PS = P.apply(S)
    U, s, _ = torch.linalg.svd(PS, full_matrices=False)
    Q = U[:, s > 1e-8 * max(1.0, float(s.max()))]
    if P.complement:
        return NullSpaceProjector(torch.cat([P.basis, Q], dim=1), True)
    B = P.basis - Q @ (Q.T @ P.basis)
    U2, s2, _ = torch.linalg.svd(B, full_matrices=False)
    return NullSpaceProjector(U2[:, s2 > 0.5].contiguous(), False)


class GuardState(AlphaEditState):
    """AlphaEdit's state plus the guard directions S per layer (``layer.<l>.guard``, (d_mlp, m)), read
    from the unedited model on first use (the first step's solve, before its delta is applied) or
    restored from a committed state."""

    def __init__(self, adapter: ModelAdapter, layers: list[int], hparams: GuardHParams,
                 stats: CovarianceSource | None, device=None):
        super().__init__(layers, adapter.d_mlp, hparams, stats, device)
        self.adapter = adapter
        self.guard: dict[int, torch.Tensor] = {}

    def _read_guard(self) -> None:
        from ...data import load_requests
        from ...errors import RequestFormatError

        hp = self.hparams
        d = next(iter(self.KpKp.values())).shape[0]
        if hp.guard_directions > d:
            raise UsageError(f"method guard: guard_directions {hp.guard_directions} exceeds the key width d_mlp = {d}")
        if hp.guard_directions == 0:  # plain AlphaEdit: nothing to read
            self.guard = {l: torch.zeros(G.shape[0], 0, dtype=F64, device=G.device) for l, G in self.KpKp.items()}
            return
        if not hp.guard_requests:
            raise UsageError("method guard: set guard_requests (an hparams field) to a dataset file whose subjects' "
                             "keys it protects, disjoint from what you evaluate (e.g. the tune split written by "
                             "`superedit data known`)")
        try:
            reqs = load_requests(hp.guard_requests, limit=hp.guard_max_requests)
        except (FileNotFoundError, RequestFormatError) as exc:
            raise UsageError(f"method guard: guard_requests {hp.guard_requests!r} cannot be read: {exc}") from exc
        if len(reqs) < hp.guard_directions:
            raise UsageError(f"method guard: guard_requests {hp.guard_requests!r} has {len(reqs)} requests, fewer than "
                             f"guard_directions ({hp.guard_directions}); give more requests or fewer directions")
        prefixes = context_prefixes(self.adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
        keys = compute_keys(self.adapter, [r.prompt for r in reqs], [r.subject for r in reqs], sorted(self.KpKp),
                            prefixes, hp.fact_token)
        for l, K in keys.items():
            self.guard[l] = shared_directions(K, hp.guard_directions).to(self.KpKp[l].device)

    def projector(self, layer: int) -> NullSpaceProjector:
        if layer not in self._projectors:
            if self.stats is None:
                raise ValueError(f"guard at layer {layer} needs the key covariance (stats) for its projector")
            if layer not in self.guard:
                self._read_guard()
            C = with_ridge(self.stats.mom2(layer).to(self.KpKp[layer].device, F64), self.hparams.mom2_ridge)
            P = nullspace_basis(C, self.hparams.nullspace_threshold, self.hparams.nullspace_relative)
            self._projectors[layer] = without_directions(P, self.guard[layer].to(P.device, F64))
        return self._projectors[layer]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = super().state_dict()
        for l, S in self.guard.items():
            out[f"layer.{l}.guard"] = S.detach().to("cpu", copy=True)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> "GuardState":
        super().load_state_dict(sd)
        for l in self.KpKp:
            S = sd.get(f"layer.{l}.guard")
            if S is not None:
                if S.shape[0] != self.KpKp[l].shape[0] or S.shape[1] != self.hparams.guard_directions:
                    raise ValueError(f"layer.{l}.guard has shape {tuple(S.shape)}, expected "
                                     f"({self.KpKp[l].shape[0]}, {self.hparams.guard_directions})")
                self.guard[l] = S.to(self.KpKp[l].device, F64).clone()
                self._projectors.pop(l, None)
        return self


def make_guard_state(adapter: ModelAdapter, hparams: GuardHParams, stats: CovarianceSource | None,
                     base: dict[int, torch.Tensor] | None = None) -> GuardState:
    """An empty state (no earlier keys; guard directions read on first use) for ``hparams.layers``."""
    for l in hparams.layers:
        adapter.check_layer(l)
    return GuardState(adapter, sorted(hparams.layers), hparams, stats,
                      {l: adapter.layer_device(l) for l in hparams.layers})


def guard_step(adapter: ModelAdapter, requests: list, hparams: GuardHParams, stats: CovarianceSource,
               state: GuardState | None = None) -> StepResult:
    """One guard batch on the model as it is: AlphaEdit's step with the guarded projector."""
    state = make_guard_state(adapter, hparams, stats) if state is None else state
    return projected_step(adapter, requests, hparams, state, "guard")
