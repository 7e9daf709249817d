"""MEMIT: mass-editing memory in a transformer (Meng et al. 2023) → StepResult.

The layer loop (z at the last layer, residuals spread over the layers left, apply, restore) is
:func:`~superedit.editing.methods.spread.spread_update`; MEMIT's per-layer solve (eq. 14) is

    Δ_l = R Kᵀ (λC + KKᵀ)⁻¹      K (d_mlp, n) keys at l, R (d_model, n) residuals, λ = mom2_update_weight

kept as low-rank factors (rank ≤ n). No state: each call edits the model as it is.
"""

from __future__ import annotations

import torch

from ...models import ModelAdapter
from ..covariance import CovarianceSource
from ..delta import LayerDelta, WeightDelta
from ..hparams import MEMITHParams
from ..solve import memit_solve, with_ridge
from .protocol import StepResult
from .spread import LayerSolver, spread_update


def memit_layer_solver(adapter: ModelAdapter, hparams: MEMITHParams, stats: CovarianceSource) -> LayerSolver:
    """MEMIT's per-layer solve (eq. 14, module docstring) as a :data:`.spread.LayerSolver`."""
    def solve(layer: int, K: torch.Tensor, R: torch.Tensor):
        C = with_ridge(adapter.on_layer(layer, stats.mom2(layer), torch.float64), hparams.mom2_ridge)
        left, right = memit_solve(R, K, C, hparams.mom2_update_weight)
        wdt = adapter.layer_dtype(layer)  # solved in float64, cast back to the weight's dtype
        return LayerDelta(left.to(wdt), right.to(wdt)), {}

    return solve


def memit_delta(adapter: ModelAdapter, requests: list, hparams: MEMITHParams, stats: CovarianceSource,
                state=None, targets=None) -> StepResult:
    """One MEMIT batch on the model as it is. ``targets``: precomputed z and value summaries
    (:func:`.spread.spread_update`), None to compute them."""
    sp = spread_update(adapter, requests, hparams, memit_layer_solver(adapter, hparams, stats), targets)
    return StepResult(WeightDelta(sp.deltas, "memit", {"model": adapter.identity(), "hparams": hparams.to_dict(),
                                                       "requests": sp.requests, "layers": sp.layers,
                                                       "timings": sp.timings}))
