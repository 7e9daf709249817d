"""Measured interference of sequential closed-form edits: the superposition identity, checked.

A rank-one edit of the form ROME makes at one layer,

    ΔWᵢ = δᵢ (C⁻¹kᵢ)ᵀ / (kᵢᵀC⁻¹kᵢ),      δᵢ = vᵢ − (W_{i−1} kᵢ + b),

moves the value of ANY key kⱼ by ``ΔWᵢ kⱼ = p(kᵢ, kⱼ) δᵢ`` with

    p(kᵢ, kⱼ) = kᵢᵀ C⁻¹ kⱼ / kᵢᵀ C⁻¹ kᵢ,

so after n edits ``(W_n − W₀) kⱼ = Σᵢ p(kᵢ, kⱼ) δᵢ`` exactly (edits are never reverted). (b is the
down-projection's bias, part of the module's output that vᵢ is; it cancels in every shift, and δᵢ is
read back from the increment itself, so the identity holds with or without it.)

:class:`InterferenceTracker` keeps, per edit, its key and δ — derived from the increment's rank-one
factors (ROME: ``left = Λ = δ/(kᵀC⁻¹k)``, ``right = u = C⁻¹k`` ⇒ ``k = C u``, ``δ = Λ (uᵀCu)``; any
factor pair whose right side is ∝ C⁻¹k works the same way, e.g. single-layer MEMIT with one request
per batch) — and the value of each edit's key right after its batch was applied (read from the
model's actual weights). At a checkpoint it compares, in float64, the PREDICTED shift Σ p δ with the
MEASURED shift read from the model's current weights:

* ``o`` (untouched facts): keys kⱼ of probe facts never edited; measured ``(W_now − W₀) kⱼ``,
  predicted ``Σ_{all i} p(kᵢ,kⱼ) δᵢ``;
* ``e`` (earlier edits): keys of edits made before the last checkpoint; measured
  ``W_now kⱼ − W_{b(j)} kⱼ`` (``b(j)``: right after j's batch), predicted ``Σ_{i in later batches} p δᵢ``.

Reported per set: the relative error ``‖pred − meas‖_F / ‖meas‖_F`` over all probe keys, the mean
share of each key's shift carried by its 5 largest-|p| terms (the projection of their partial sum on
the total, so the shares of all terms add up to 1), mean/max |p|, and the mean shift norm relative to
the key's original value norm ``‖W₀ kⱼ‖``.

p is computed through an independent Cholesky whitening of C (:class:`~superedit.stats.whitening.Whitener`),
not from the stored factors, so the check covers the solve, the ledger's accumulation and the float32
weights.
"""

from __future__ import annotations

from typing import Any

import torch

from ..utils.logs import get_logger

log = get_logger(__name__)
F64 = torch.float64
TOP_TERMS = 5


def method_covariance(hparams, C: torch.Tensor) -> torch.Tensor:
    """The C the method's solve used (with its ``mom2_ridge`` × mean diagonal, if any)."""
    from ..editing.solve import with_ridge

    return with_ridge(C.detach().to(F64), float(getattr(hparams, "mom2_ridge", 0.0) or 0.0))


class InterferenceTracker:
    """Keys and δ of every edit at one layer, plus the probe keys; see the module docstring.

    Args:
        layer: the edited layer.
        C: the covariance the method solved with (see :func:`method_covariance`).
        W0: base weights (d_model, d_mlp).
        probe_keys: (m, d_mlp) keys of untouched facts at ``layer`` (may be empty).
        max_edit_probes: how many earlier edits' keys the ``e`` set uses (evenly spaced).
    """

    def __init__(self, layer: int, C: torch.Tensor, W0: torch.Tensor, probe_keys: torch.Tensor | None = None,
                 max_edit_probes: int = 50):
        from ..stats.whitening import Whitener

        self.layer = int(layer)
        self.C = C.detach().to(F64)
        self.wh = Whitener(self.C, layer=layer, max_condition=float("inf"))
        self.W0 = W0.detach().to(F64).clone()
        self.max_edit_probes = int(max_edit_probes)
        pk = probe_keys if probe_keys is not None else torch.zeros(0, self.C.shape[0])
        self.probe_keys = pk.detach().to(F64).reshape(-1, self.C.shape[0]).to(self.W0.device)
        self.probe_white = self.wh.whiten(self.probe_keys) if len(self.probe_keys) else self.probe_keys
        self.keys: list[torch.Tensor] = []  #: k̂ᵢ = C uᵢ (d_mlp,)
        self.deltas: list[torch.Tensor] = []  #: δᵢ (d_model,)
        self.after: list[torch.Tensor] = []  #: W_{b(i)} k̂ᵢ right after edit i's batch (d_model,)
        self.batch_of: list[int] = []

    @property
    def n_edits(self) -> int:
        return len(self.keys)

    @torch.no_grad()
    def add_increment(self, left: torch.Tensor, right: torch.Tensor, W_after: torch.Tensor) -> None:
        """Record one batch's increment ``left @ rightᵀ`` (columns = edits) and the weights after it."""
        left, right = left.detach().to(F64), right.detach().to(F64)
        if left.dim() == 1:
            left, right = left[:, None], right[:, None]
        W = W_after.detach().to(F64)
        b = (self.batch_of[-1] + 1) if self.batch_of else 0
        for c in range(right.shape[1]):
            u = right[:, c].to(self.C.device)
            k = self.C @ u  # k̂ ∝ k; p and p·δ are scale-free in k̂
            delta = left[:, c].to(self.C.device) * torch.dot(u, k)  # = ΔW_c k̂
            self.keys.append(k)
            self.deltas.append(delta)
            self.after.append(W.to(k.device) @ k)
            self.batch_of.append(b)

    @torch.no_grad()
    def check(self, W_now: torch.Tensor) -> dict[str, Any]:
        """Predicted vs measured shifts for the untouched (``o``) and earlier-edit (``e``) probe keys."""
        out: dict[str, Any] = {"layer": self.layer, "n_edits": self.n_edits}
        if not self.keys:
            return out
        W = W_now.detach().to(F64).to(self.W0.device)
        K = torch.stack(self.keys)  # (n, d_mlp)
        D = torch.stack(self.deltas)  # (n, d_model)
        Y = self.wh.whiten(K)
        g = (Y * Y).sum(1)  # kᵢᵀC⁻¹kᵢ
        if len(self.probe_keys):
            P = (Y @ self.probe_white.T) / g[:, None]  # (n, m): p(kᵢ, kⱼ)
            pred = P.T @ D
            meas = ((W - self.W0) @ self.probe_keys.T).T
            base = (self.W0 @ self.probe_keys.T).T
            out["o"] = _compare(P, D, pred, meas, base)
        batches = torch.tensor(self.batch_of)
        last = int(batches[-1])
        earlier = [j for j in range(self.n_edits) if self.batch_of[j] < last]
        if earlier:
            step = max(1, len(earlier) // self.max_edit_probes)
            js = earlier[::step][: self.max_edit_probes]
            Pj = (Y @ Y[js].T) / g[:, None]  # (n, |js|)
            mask = (batches[:, None] > batches[js][None, :]).to(F64).to(Pj.device)  # only LATER batches
            Pj = Pj * mask
            pred = Pj.T @ D
            Kj = K[js]
            meas = (W @ Kj.T).T - torch.stack([self.after[j] for j in js])
            base = (self.W0 @ Kj.T).T
            out["e"] = _compare(Pj, D, pred, meas, base)
            out["e"]["edits"] = js
        return out


def _compare(P: torch.Tensor, D: torch.Tensor, pred: torch.Tensor, meas: torch.Tensor, base: torch.Tensor) -> dict:
    """Summary of predicted (m, d) vs measured (m, d) shifts; P (n, m) the coefficients, D (n, d) the δ."""
    err = float((pred - meas).norm() / meas.norm().clamp_min(1e-300))
    k = min(TOP_TERMS, P.shape[0])
    top = P.abs().topk(k, dim=0).indices  # (k, m)
    shares = []
    for j in range(P.shape[1]):
        idx = top[:, j]
        s5 = (P[idx, j][:, None] * D[idx]).sum(0)
        denom = float(pred[j] @ pred[j])
        if denom > 0:
            shares.append(float(s5 @ pred[j]) / denom)
    nz = P[P != 0].abs()
    pn, mn, bn = pred.norm(dim=1), meas.norm(dim=1), base.norm(dim=1).clamp_min(1e-300)
    return {"rel_error": err, "n_keys": int(P.shape[1]),
            "top5_share": sum(shares) / len(shares) if shares else None,
            "p_abs_mean": float(nz.mean()) if nz.numel() else 0.0, "p_abs_max": float(nz.max()) if nz.numel() else 0.0,
            "pred_shift_mean": float(pn.mean()), "meas_shift_mean": float(mn.mean()),
            "rel_shift_mean": float((mn / bn).mean()),
            "pred_norms": [round(float(x), 6) for x in pn], "meas_norms": [round(float(x), 6) for x in mn]}
