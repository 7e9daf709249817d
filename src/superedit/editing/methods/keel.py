"""keel, superedit's own lifelong method: cumulative least squares in the preserved-knowledge null space.

It joins D4S (the whole history is one MEMIT solve, kept as running sums against the ORIGINAL weights
W₀) with AlphaEdit (every update confined to the null space of the preserved-knowledge covariance C).

Per edited layer (MEMIT's spread over layers, ``spread.spread_update``, as D4S does), with

* W₀ (d_model, d_mlp) the original down-projection, value = W k (+ b);
* K_all (d_mlp, N) the keys of all N edits so far and R_all (d_model, N) their residuals against W₀:
  rᵢ = zᵢ − W₀ kᵢ, computed from the residual R on the model as it is (carrying W₀ + Δ_old) as
  R₀ = R + (W_cur − W₀) K, exactly as D4S computes it;
* P (d_mlp, d_mlp) = Û Ûᵀ the projector on the eigenvectors of C (with ``mom2_ridge``) whose eigenvalues
  are below ``nullspace_threshold`` (× λ_max when ``nullspace_relative``), built by AlphaEdit's own
  :func:`.alphaedit.nullspace_projector`;
* the running sums S_rk = Σᵢ rᵢ kᵢᵀ = R_all K_allᵀ (d_model, d_mlp) and S_kk = Σᵢ kᵢ kᵢᵀ = K_all K_allᵀ
  (d_mlp, d_mlp) — O(1) memory in N, raw (unprojected) keys;

the weights after every step are W = W₀ + Δ with

    Δ = argmin_{Δ̃}  ‖(W₀ + Δ̃P) K_all − V_all‖²_F + α ‖Δ̃P‖²_F ,   written Δ = Δ̃P,  V_all = W₀K_all + R_all

Derivation. Δ ranges over the matrices with Δ = ΔP (rows in range(P)). The objective is
‖Δ K_all − R_all‖² + α‖Δ‖²; its gradient restricted to that subspace, [(ΔK_all − R_all)K_allᵀ + αΔ] P,
vanishes: Δ S_kk P + αΔ = S_rk P. With Δ = ΔP this is Δ (P S_kk P + αI) = S_rk P, so

    Δ = S_rk P (P S_kk P + α I)⁻¹ P         A_P := P S_kk P + α I  (d_mlp × d_mlp, symmetric, ≥ α I)

It equals the form S_rk P (S_kk P + αI)⁻¹: Δ (S_kk P + αI) = ΔP S_kk P + αΔ = S_rk P. (S_kk P + αI is
invertible: S_kk P = S_kk P·P has the eigenvalues of P S_kk P ≥ 0.) The symmetric A_P is what is solved:
a Cholesky factorisation in float64 (``editing.solve.spd_solve``), never an explicit inverse; the result
is cast to the weight dtype only when applied.

Push-through / exact protection. P A_P = P S_kk P + αP = A_P P (P² = P), so A_P⁻¹ commutes with P and
Δ k₀ = S_rk P A_P⁻¹ P k₀ = S_rk A_P⁻¹ P k₀ = 0 for every k₀ in C's range (P k₀ = 0). The trailing P,
redundant in exact arithmetic, is applied explicitly: the computed Y = A_P⁻¹ P S_rkᵀ leaves range(P) by
rounding of order ε·κ(A_P), and κ(A_P) = (λ_max(P S_kk P) + α)/α grows with the edits; with the final P
the protection holds to float64 precision whatever the conditioning (tests/test_keel.py:
‖Δ k₀‖ ≤ 1e-10 ‖Δ‖ ‖k₀‖). In the model, W = W₀ + Δ is then rounded to float32 like any weight.

Against AlphaEdit — the same weights, by the recursive-least-squares identity. AlphaEdit's step t solves
only its own batch, on the model as it is: Δ_t = R_t K_tᵀ P (G_t P + αI)⁻¹ with G_t = Σ_{s≤t} K_s K_sᵀ (the
penalty on earlier keys' outputs plus the batch), and its residual on the model carrying the earlier
total Δ_{<t} is R_t = R₀,t − Δ_{<t} K_t. With A_t = P G_t P + αI and Δ_{<t} = Δ_{<t}P (both updates lie in
range(P)): (Δ_{<t} + Δ_t) A_t = Δ_{<t} A_{t−1} + Δ_{<t}K_tK_tᵀP + R₀,tK_tᵀP − Δ_{<t}K_tK_tᵀP = S_rk,t P.
So the intended difference — AlphaEdit only penalising its earlier edits' outputs as they are, keel
re-fitting every earlier edit's target jointly — does not exist in exact arithmetic: AlphaEdit's sum of
increments IS the joint least-squares solve over all targets, and the two methods give the same weights
after every step (``test_alphaedit_increments_add_up_to_keel``: 1e-10 on the solver; through ledgers on a
tiny model, 4e-8 relative after two steps, float32 weights). What keel changes is the form: the total is
a function of the running sums, so ANY edit can be undone exactly (AlphaEdit: only the last), the weights
do not accumulate per-step rounding of increments, and they do not depend on how the history was batched.

Against D4S: D4S solves Δ = S_rk (λC + S_kk)⁻¹ and protects C only softly, through λC; keel protects C's
range exactly, with a small ridge α in the remaining directions. D4S's ``project_nullspace`` option
(keys projected before they enter its sums, λC replaced by L2·I) computes the same Δ as keel with
α = L2 (up to rounding; ``test_keel_equals_d4s_with_its_nullspace_option``): keel is that variant made
a method of its own, with raw sums, a dense solve per step instead of D4S's incrementally updated
factor (no drift, no ill-conditioned downdates, a resumed run trivially bit-identical), the projector
applied last, and its own tuned profiles.

Cost per layer and step: P S_kk P (2 d_mlp³), one Cholesky of A_P (d_mlp³/3) and two triangular solves
against d_model right-hand sides — dense, O(d_mlp³) whatever N. Fine at d_mlp 512 (testbed, ~10 ms)
and 1536 (SmolLM2-135M, about a second per layer on one core); memory O(d_mlp²), no growth with N.

State (:class:`KeelState`): per layer S_rk, S_kk, Δ and the counts (keys, steps), all float64; P is
computed once from the covariance source when the state is made (not saved: a resumed run recomputes it
from the same C, as D4S and AlphaEdit do). Δ is a pure function of (S_rk, S_kk, P), so a resumed run
continues with bit-identical numbers. Journal of a step: ``layer.<l>.R`` (residuals against W₀) and
``layer.<l>.K`` (raw keys); undo = exact downdate of the sums (``remove``) and a fresh solve, so any
edit can be undone (registry ``undo="any"``). NAS norm anchoring of the values is the shared
``norm_anchor`` option (``spread.memit_targets`` / :mod:`.anchors`).
"""

from __future__ import annotations

import torch

from ...models import ModelAdapter
from ..covariance import CovarianceSource
from ..delta import LayerDelta
from ..hparams import KeelHParams
from ..solve import spd_solve, with_ridge
from .alphaedit import nullspace_projector
from .protocol import PerLayerSums, StepResult, total_key
from .spread import residual_against_w0, sums_step

F64 = torch.float64


def keel_solve(S_rk: torch.Tensor, S_kk: torch.Tensor, P: torch.Tensor, alpha: float) -> torch.Tensor:
    """Δ = S_rk P (P S_kk P + αI)⁻¹ P (d_model, d_mlp), float64 (module docstring)."""
    S_rk, S_kk, P = S_rk.to(F64), S_kk.to(F64), P.to(F64)
    A = P @ S_kk @ P
    A = 0.5 * (A + A.T)
    A.diagonal().add_(alpha)
    Y = spd_solve(A, P @ S_rk.T)  # (d_mlp, d_model) = A_P⁻¹ P S_rkᵀ
    return (P @ Y).T.contiguous()  # Yᵀ P: rows exactly in range(P)


class KeelSums:
    """One layer's running sums S_rk, S_kk (raw keys), the projector P, α and the current Δ."""

    def __init__(self, layer: int, W0: torch.Tensor, P: torch.Tensor, alpha: float):
        self.layer, self.alpha = int(layer), float(alpha)
        self.W0 = W0.detach()
        d_model, d_mlp = W0.shape
        if tuple(P.shape) != (d_mlp, d_mlp):
            raise ValueError(f"P has shape {tuple(P.shape)}, expected ({d_mlp}, {d_mlp}) for W0 {tuple(W0.shape)}")
        dev = W0.device
        self.P = P.detach().to(dev, F64)
        self.S_rk = torch.zeros(d_model, d_mlp, dtype=F64, device=dev)
        self.S_kk = torch.zeros(d_mlp, d_mlp, dtype=F64, device=dev)
        self.delta = torch.zeros(d_model, d_mlp, dtype=F64, device=dev)
        self.n_terms = 0
        self.steps = 0

    def _cols(self, R: torch.Tensor, K: torch.Tensor):
        R, K = R.to(self.S_rk.device, F64), K.to(self.S_rk.device, F64)
        R, K = (R[:, None] if R.dim() == 1 else R), (K[:, None] if K.dim() == 1 else K)
        d_model, d_mlp = self.S_rk.shape
        if R.shape[0] != d_model or K.shape[0] != d_mlp or R.shape[1] != K.shape[1]:
            raise ValueError(f"layer {self.layer}: R {tuple(R.shape)} and K {tuple(K.shape)} do not fit "
                             f"W ({d_model}, {d_mlp}) (need R (d_model, k), K (d_mlp, k))")
        return R, K

    def solve(self) -> torch.Tensor:
        """Δ from the sums (dense, float64); zeros before the first edit."""
        if self.n_terms == 0:
            return torch.zeros_like(self.S_rk)
        return keel_solve(self.S_rk, self.S_kk, self.P, self.alpha)

    @torch.no_grad()
    def add(self, R: torch.Tensor, K: torch.Tensor) -> None:
        """Add edits (R (d_model, k) residuals against W₀, K (d_mlp, k) raw keys) and re-solve."""
        R, K = self._cols(R, K)
        self.S_rk.addmm_(R, K.T)
        self.S_kk.addmm_(K, K.T)
        self.n_terms += K.shape[1]
        self.steps += 1
        self.delta = self.solve()

    @torch.no_grad()
    def remove(self, R: torch.Tensor, K: torch.Tensor) -> None:
        """Take edits out again: exact downdate of the sums (up to float64 rounding), then re-solve."""
        R, K = self._cols(R, K)
        self.S_rk.addmm_(R, K.T, alpha=-1.0)
        self.S_kk.addmm_(K, K.T, alpha=-1.0)
        self.n_terms -= K.shape[1]
        self.steps -= 1
        if self.n_terms == 0:  # the empty sum: drop the rounding residue of the downdate
            self.S_rk.zero_()
            self.S_kk.zero_()
        self.delta = self.solve()

    def weights(self) -> torch.Tensor:
        """W₀ + Δ in W₀'s dtype."""
        return (self.W0.to(F64) + self.delta).to(self.W0.dtype)


class KeelState(PerLayerSums):
    """keel's state for every edited layer (layer → :class:`KeelSums`); see the method protocol.

    ``state_dict``: ``layer.<l>.S_rk``, ``layer.<l>.S_kk``, ``layer.<l>.counts`` ([keys, steps]) and Δ under
    :func:`~.protocol.total_key`."""

    def total_delta(self, layer: int) -> torch.Tensor:
        return self.layers[layer].delta

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for l, s in self.layers.items():
            out[f"layer.{l}.S_rk"] = s.S_rk
            out[f"layer.{l}.S_kk"] = s.S_kk
            out[f"layer.{l}.counts"] = torch.tensor([s.n_terms, s.steps], dtype=torch.int64)
            out[total_key(l)] = s.delta
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}  # copies: sums change in place

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> "KeelState":
        """Layers without saved sums stay empty (no edit yet); Δ is re-solved when the file lacks it."""
        for l, s in self.layers.items():
            if f"layer.{l}.S_rk" not in sd:
                continue
            for name in ("S_rk", "S_kk"):
                t = sd.get(f"layer.{l}.{name}")
                if t is None:
                    raise KeyError(f"keel state for layer {l} lacks {name!r}")
                if tuple(t.shape) != tuple(getattr(s, name).shape):
                    raise ValueError(f"keel state layer.{l}.{name} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(getattr(s, name).shape)}")
                setattr(s, name, t.to(s.S_rk.device, F64).clone())
            counts = sd.get(f"layer.{l}.counts")
            if counts is not None:
                s.n_terms, s.steps = (int(v) for v in counts.tolist())
            d = sd.get(total_key(l))
            s.delta = d.to(s.S_rk.device, F64).clone() if d is not None else s.solve()
        return self


def make_keel_state(adapter: ModelAdapter, hparams: KeelHParams, stats: CovarianceSource,
                    base: dict[int, torch.Tensor] | None = None) -> KeelState:
    """Empty sums for ``hparams.layers``; W₀ from ``base`` or the adapter's current weights; P from
    C = ``stats.mom2(l)`` with ``mom2_ridge`` by AlphaEdit's :func:`nullspace_projector`, once, here."""
    layers = {}
    for l in sorted(hparams.layers):
        adapter.check_layer(l)
        W0 = (base[l] if base is not None else adapter.down_weight(l)).detach().clone()
        C = with_ridge(stats.mom2(l).to(W0.device, F64), hparams.mom2_ridge)
        P = nullspace_projector(C, hparams.nullspace_threshold, hparams.nullspace_relative)
        layers[l] = KeelSums(l, W0, P, hparams.L2)
    return KeelState(layers)


def keel_step(adapter: ModelAdapter, requests: list, hparams: KeelHParams, stats: CovarianceSource,
              state: KeelState | None = None) -> StepResult:
    """One keel step: add ``requests`` to the running sums and re-solve; returns the increment Δ_new − Δ_old.

    ``state`` is updated in place (None: fresh sums on the adapter's current weights). The model must
    carry W₀ + Δ (a ledger applied to it). On an exception the terms already added are removed again."""
    state = make_keel_state(adapter, hparams, stats) if state is None else state
    journal: dict[str, torch.Tensor] = {}

    def solve(layer: int, K: torch.Tensor, R: torch.Tensor):
        sums = state[layer]
        R0 = residual_against_w0(adapter, layer, sums.W0, K, R)
        old = sums.delta.clone()
        sums.add(R0, K)
        journal[f"layer.{layer}.R"], journal[f"layer.{layer}.K"] = R0, K
        fit = sums.delta @ K.to(F64) - R0  # this batch's misfit against its targets after the joint solve
        return LayerDelta(dense_=sums.delta - old), {
            "residual_w0_norm": float(R0.norm(dim=0).mean()), "n_terms": sums.n_terms,
            "nullspace_dim": int(round(float(sums.P.trace()))),
            "batch_misfit": float(fit.norm(dim=0).mean())}

    return sums_step(adapter, requests, hparams, solve, state, journal, "keel")
