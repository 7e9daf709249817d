"""Hyperparameters of the lifelong methods (torch-free: imported by the method registry)."""

from __future__ import annotations

from dataclasses import dataclass

from ..editing.hparams import HParamsError, MEMITHParams, _f

FACTOR_KINDS = ("cholesky", "inverse")


@dataclass
class D4SHParams(MEMITHParams):
    """D4S (Huang et al. 2024): one MEMIT solve over every edit so far, kept as running sums.

    ``W_l = W₀,l + S_rk (λC + S_kk)⁻¹`` with λ = ``mom2_update_weight``. With ``project_nullspace``
    the keys are first projected on the null space of C (AlphaEdit) and λC is replaced by ``L2``·I:
    ``W_l = W₀,l + S_rk P (P S_kk P + L2·I)⁻¹ P``.
    """

    factor: str = _f("cholesky", "How A = λC + S_kk is kept between steps: cholesky (rank-k factor updates, "
                                 "backward stable) | inverse (Woodbury updates of A⁻¹, fastest).")
    refresh_every: int = _f(0, "Re-solve from the running sums every N steps to cancel rounding drift (0: never).")
    project_nullspace: bool = _f(False, "Project keys on the null space of C (D4S sums + AlphaEdit projection).")
    nullspace_threshold: float = _f(1e-2, "Eigenvalues of C below this span the null space (AlphaEdit).")
    nullspace_relative: bool = _f(False, "Read nullspace_threshold relative to C's largest eigenvalue.")
    L2: float = _f(10.0, "α, the ridge replacing λC when project_nullspace is on.")

    def validate(self, source="<hparams>"):
        super().validate(source)
        if self.factor not in FACTOR_KINDS:
            raise HParamsError(f"{source}: factor must be one of {FACTOR_KINDS} (got {self.factor!r})")
        if self.refresh_every < 0:
            raise HParamsError(f"{source}: refresh_every must be ≥ 0 (got {self.refresh_every})")
        if self.project_nullspace and self.L2 <= 0:
            raise HParamsError(f"{source}: L2 must be > 0 when project_nullspace is on (got {self.L2})")


@dataclass
class AlphaEditHParams(MEMITHParams):
    """AlphaEdit (Fang et al. 2025): MEMIT-style updates projected on the null space of C.

    ``Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹`` (``mom2_update_weight`` is not used).
    """

    nullspace_threshold: float = _f(1e-2, "Eigenvalues of C below this span the null space (paper: 1e-2).")
    nullspace_relative: bool = _f(False, "Read nullspace_threshold relative to C's largest eigenvalue.")
    L2: float = _f(10.0, "α in (K_p K_pᵀ P + K₁ K₁ᵀ P + α I).")

    def validate(self, source="<hparams>"):
        super().validate(source)
        if self.L2 <= 0:
            raise HParamsError(f"{source}: L2 must be > 0 (got {self.L2})")
        if self.nullspace_threshold < 0:
            raise HParamsError(f"{source}: nullspace_threshold must be ≥ 0 (got {self.nullspace_threshold})")
