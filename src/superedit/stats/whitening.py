"""Whitening by the key second moment C = E[k kᵀ]: the ridge rule and a Cholesky-factorised C.

Every closed-form edit and every analysis of keys reads C through the inner product

    ⟨a, b⟩_C = aᵀ C⁻¹ b = (L⁻¹a)·(L⁻¹b),      C = L Lᵀ  (Cholesky),

so a key k is *whitened* by the triangular solve ``L⁻¹k`` and C is never inverted.

The ridge rule (ROME's ``mom2_ridge`` convention, written here once): a fraction ``ridge`` of C's mean
diagonal is added to the diagonal,

    C_λ = C + ridge · mean(diag C) · I.

A corpus covariance of a layer with dead units is numerically singular (on the wide testbed's layer 1,
191 of 512 eigenvalues are below 1e-6 × the mean); a solve with C there fits the edit keys' tiny
components in those directions with huge weights (‖ΔW‖_F 4e8 after 100 D4S edits), which the ridge
prevents.
"""

from __future__ import annotations

import math

import torch

from ..errors import StatsError
from ..utils.logs import get_logger

log = get_logger(__name__)

F64 = torch.float64
#: condition number of C (+ ridge) above which :class:`Whitener` refuses a C without a ridge
MAX_CONDITION = 1e12

__all__ = ["MAX_CONDITION", "Whitener", "check_ridge", "with_ridge"]


def check_ridge(ridge: float | None, where: str = "") -> float:
    """``ridge`` as a float ≥ 0 (None → 0); anything else raises :class:`StatsError`."""
    if ridge is None:
        return 0.0
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(float(ridge)) or ridge < 0:
        raise StatsError(f"{where}ridge must be a finite number ≥ 0, a fraction of C's mean diagonal "
                         f"(e.g. 1e-3); got {ridge!r}")
    return float(ridge)


def with_ridge(C: torch.Tensor, ridge: float) -> torch.Tensor:
    """``C + ridge · mean(diag C) · I`` in C's dtype and device; ``ridge == 0`` returns C itself.

    Shapes: C (d, d). Raises :class:`StatsError` for a negative or non-finite ridge."""
    ridge = check_ridge(ridge)
    if ridge == 0:
        return C
    return C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


class Whitener:
    """C (+ ridge) factorised once, in float64 on C's device: ``C_λ = L Lᵀ``.

    ``whiten(K)`` gives rows ``L⁻¹k`` with ``(L⁻¹a)·(L⁻¹b) = aᵀC_λ⁻¹b``; ``solve(K)`` gives ``C_λ⁻¹k``;
    ``inner(A, B)`` the matrix of ``aᵢᵀC_λ⁻¹bⱼ``; ``cosine(K, k)`` the whitening cosine
    ``kᵢᵀC_λ⁻¹k / √(kᵢᵀC_λ⁻¹kᵢ · kᵀC_λ⁻¹k)``, differentiable in K.

    Args:
        C: (d, d) second moment E[kkᵀ] (any float dtype; symmetrised and used in float64).
        ridge: the ridge rule's fraction (see :func:`with_ridge`).
        layer: only for messages.
        max_condition: a C whose condition number exceeds this (or whose Cholesky factorisation
            fails) raises :class:`StatsError` when no ridge is given; with a ridge it only warns.
    """

    def __init__(self, C: torch.Tensor, ridge: float | None = 0.0, layer: int | None = None,
                 max_condition: float = MAX_CONDITION):
        where = f"layer {layer}: " if layer is not None else ""
        self.ridge = check_ridge(ridge, where)
        C = C.detach().to(F64)
        if C.dim() != 2 or C.shape[0] != C.shape[1]:
            raise StatsError(f"{where}covariance must be a square matrix, got shape {tuple(C.shape)}")
        if not torch.isfinite(C).all():
            raise StatsError(f"{where}covariance C contains NaN/inf; recompute the key statistics")
        C = (C + C.T) / 2
        self.ridge_abs = self.ridge * float(C.diagonal().mean())
        C = with_ridge(C, self.ridge)
        self.C = C
        self.layer = layer
        eig = torch.linalg.eigvalsh(C)
        lo, hi = float(eig[0]), float(eig[-1])
        self.eig_min, self.eig_max = lo, hi
        self.condition_number = hi / lo if lo > 0 else float("inf")
        L, info = torch.linalg.cholesky_ex(C)
        bad = int(info) != 0 or not self.condition_number <= max_condition
        hint = ("pass a ridge (e.g. --ridge 1e-3 or mom2_ridge: 1e-3, a fraction of C's mean diagonal) or use more "
                "corpus tokens (--mom2-tokens)")
        if bad and self.ridge == 0:
            why = "Cholesky factorisation failed" if int(info) != 0 else f"condition number {self.condition_number:.3g}"
            raise StatsError(f"{where}the key covariance C is singular or ill-conditioned ({why}, "
                             f"λmin={lo:.3g}, λmax={hi:.3g}, d={C.shape[0]}); {hint}")
        if int(info) != 0:
            raise StatsError(f"{where}C + ridge {self.ridge:g}·mean(diag C)·I is still not positive definite "
                             f"(λmin={lo:.3g}); increase the ridge")
        if not self.condition_number <= max_condition:
            log.warning("%scondition number %.3g even with ridge %g", where, self.condition_number, self.ridge)
        self.L = L

    @property
    def dim(self) -> int:
        return self.L.shape[0]

    def _check_width(self, K: torch.Tensor) -> None:
        if K.shape[-1] != self.dim:
            raise StatsError(f"keys of width {K.shape[-1]} do not match the covariance size {self.dim}")

    def whiten(self, K: torch.Tensor) -> torch.Tensor:
        """Rows ``L⁻¹kᵢ`` for K of shape (n, d) (or (d,)), float64 on C's device, detached."""
        return self._whiten(K.detach())

    def _whiten(self, K: torch.Tensor) -> torch.Tensor:
        K = K.to(device=self.L.device, dtype=F64)
        self._check_width(K)
        one = K.dim() == 1
        K2 = K[None] if one else K
        Y = torch.linalg.solve_triangular(self.L, K2.T, upper=False).T
        return Y[0] if one else Y

    def solve(self, K: torch.Tensor) -> torch.Tensor:
        """``C⁻¹k`` for each row of K (n, d) or for k (d,), float64."""
        K = K.detach().to(device=self.L.device, dtype=F64)
        self._check_width(K)
        B = K.T if K.dim() == 2 else K[:, None]
        X = torch.cholesky_solve(B, self.L)
        return X.T if K.dim() == 2 else X[:, 0]

    def inner(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``aᵢᵀ C⁻¹ bⱼ`` for rows of A (n, d) and B (m, d): (n, m)."""
        return self.whiten(A) @ self.whiten(B).T

    def cosine(self, K: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Whitening cosine of each row of K (n, d) with k (d,): shape (n,), in K's dtype and device.

        Gradients flow into K (the solve runs in float64); ``k`` is treated as a constant."""
        Y = self._whiten(K)
        y = self.whiten(k)
        cos = (Y @ y) / (Y.norm(dim=-1) * y.norm()).clamp_min(1e-30)
        return cos.to(device=K.device, dtype=K.dtype)
