"""Closed-form solves, in float64, cast back by the caller.

ROME (rank one, eq. 2 of Meng et al. 2022), for a down-projection with output W k + b:
    u = C⁻¹ k*,   Λ = (v* − (W k* + b)) / (uᵀ k*),   W' = W + Λ uᵀ      ⇒  W' k* + b = v*
(v* is what the module must OUTPUT; without b the edit would land at v* + b.)

MEMIT (eq. 14 of Meng et al. 2023), for keys K (d_in, n) and residuals R (d_out, n):
    Δ = R Kᵀ (λ C + K Kᵀ)⁻¹  =  R (A⁻¹ K)ᵀ   with A = λC + KKᵀ symmetric,
solved with a Cholesky factorisation (LU fallback), never an explicit inverse.
"""

from __future__ import annotations

import torch


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def with_ridge(C: torch.Tensor, ridge: float) -> torch.Tensor:
    """C + ridge · mean(diag C) · I: the ridge rule, written once in :func:`superedit.stats.whitening.with_ridge`."""
    from ..stats.whitening import with_ridge as ridge_rule

    return ridge_rule(C, ridge)


def spd_solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Solve A X = B for symmetric positive (semi)definite A, in float64."""
    A, B = _f64(A), _f64(B)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B if B.dim() == 2 else B.unsqueeze(-1), L).reshape(B.shape)
    return torch.linalg.solve(A, B)


def rome_solve(W: torch.Tensor, C: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-one ROME update factors (left Λ (d_out,), right u (d_in,)) with ΔW = Λ uᵀ, so that the
    module's output at k becomes v: (W + Λ uᵀ) k + b = v.

    Shapes: W (d_out, d_in) with output W k + b; C (d_in, d_in) = E[k kᵀ]; k (d_in,); v (d_out,);
    b (d_out,) the module's bias (None: no bias).
    """
    W, k, v = _f64(W), _f64(k), _f64(v)
    u = spd_solve(C, k)
    denom = torch.dot(u, k)
    if not torch.isfinite(denom) or denom.abs() < 1e-30:
        raise FloatingPointError(f"ROME: kᵀC⁻¹k = {float(denom)}; C is singular along k (add mom2_ridge)")
    out = W @ k if b is None else W @ k + _f64(b).to(W.device)
    left = (v - out) / denom
    return left, u


def memit_solve(R: torch.Tensor, K: torch.Tensor, C: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT update factors (left R (d_out, n), right A⁻¹K (d_in, n)) with Δ = left @ rightᵀ.

    Shapes: R (d_out, n) residuals; K (d_in, n) keys; C (d_in, d_in) = E[k kᵀ]; lam = mom2_update_weight.
    """
    R, K = _f64(R), _f64(K)
    A = lam * _f64(C) + K @ K.T
    return R, spd_solve(A, K)
