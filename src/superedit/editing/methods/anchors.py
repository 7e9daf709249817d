"""NAS, Norm-Anchor Scaling (Liu et al. 2026, "Norm Anchors Make Model Edits Last"), written once for
every closed-form method (ROME, and MEMIT, D4S, AlphaEdit through ``spread.memit_targets``).

Sequential locate-and-edit runs collapse when solved value vectors and edited weights amplify each
other (a positive norm-feedback loop: larger weights → larger v* needed → larger weights). NAS breaks
the loop by rescaling each solved value vector to a norm measured once on the ORIGINAL model::

    v*     = v₀ + δ                 v₀ (d_model,): the MLP output at the subject's last token of the
                                    plain prompt on the model as it is; δ: the optimised value delta
    v*_NAS = a · v* / ‖v*‖          a = hparams.norm_anchor (a scalar per method configuration)

ROME optimises v* at the MLP output itself (site "value"), so v*_NAS is its target. MEMIT, D4S and
AlphaEdit optimise z = h_L + δ at the residual stream after the last edited layer L (site "resid");
as in the paper's code, v* = v₀ + δ is read at L's MLP output and the target becomes

    z_NAS = (h_L − v₀) + v*_NAS     (the residual without L's MLP output, plus the anchored value)

The anchor a is, in the paper, the mean ‖v*‖ of 1,000 CounterFact edits optimised on the unedited
model with the top 5 % dropped; :func:`reference_value_norm` measures it for any request sample. It is
passed as a number (``norm_anchor``) so it is part of the hyperparameters a ledger records, and a
resumed run anchors to exactly the same value. ``norm_anchor: 0`` (the default) leaves every value as
optimised (the code path is not entered).
"""

from __future__ import annotations

import math

import torch

from ...models import ModelAdapter
from ..contexts import context_prefixes
from ..keys import keys_at
from ..values import ValueResult, optimize_values

F64 = torch.float64


def anchored(v: torch.Tensor, anchor: float) -> torch.Tensor:
    """Rows of ``v`` ((d,) or (n, d)) rescaled to norm ``anchor``, in float64 (a zero row stays zero)."""
    if not anchor > 0:
        raise ValueError(f"norm anchor must be > 0, got {anchor}")
    v64 = v.detach().to(F64)
    norms = v64.norm(dim=-1, keepdim=True)
    return v64 * torch.where(norms > 0, anchor / norms, torch.ones_like(norms))


def value_site_outputs(adapter: ModelAdapter, requests: list, layer: int) -> torch.Tensor:
    """v₀ (n, d_model): the MLP output at ``layer`` at each request's last subject token of the plain prompt
    (the position ``editing.values`` optimises at), on the model as it is."""
    return keys_at(adapter, [r.prompt for r in requests], [r.subject for r in requests], [layer],
                   "subject_last", site="value")[layer]


def anchor_residual_targets(adapter: ModelAdapter, requests: list, values: list[ValueResult], layer: int,
                            anchor: float) -> tuple[torch.Tensor, list[dict]]:
    """z_NAS (n, d_model, float64) for residual-stream values (site "resid" at ``layer``), plus per-request info.

    ``values[i].init`` is h_L and ``values[i].delta`` is δ of request i (module docstring)."""
    v0 = value_site_outputs(adapter, requests, layer).to(F64)
    h = torch.stack([v.init for v in values]).to(F64)
    v_star = v0 + torch.stack([v.delta for v in values]).to(F64)
    z = h - v0 + anchored(v_star, anchor)
    return z, [nas_info(n, anchor) for n in v_star.norm(dim=1).tolist()]


def nas_info(v_star_norm: float, anchor: float) -> dict:
    """What NAS did to one value: its norm before and the factor applied."""
    return {"nas_v_star_norm": v_star_norm, "nas_scale": anchor / v_star_norm if v_star_norm > 0 else 1.0}


def value_norms(adapter: ModelAdapter, requests: list, hparams, site: str) -> list[float]:
    """‖v*‖ of each request, optimised (with ``hparams``'s value settings) on the model as it is, at
    ``site`` of the last of ``hparams.layers``: "value" (ROME: v* is the target itself) or "resid"
    (MEMIT family: v* = v₀ + δ at that layer's MLP output)."""
    layer = sorted(hparams.layers)[-1]
    prefixes = context_prefixes(adapter, hparams.context_lengths, hparams.n_prefixes, hparams.seed)
    vals = optimize_values(adapter, [(r.prompt, r.subject, r.target_new) for r in requests], layer, site,
                           hparams, prefixes,
                           relations=[r.relation_id for r in requests])
    if site == "value":
        return [float(v.target.to(F64).norm()) for v in vals]
    v0 = value_site_outputs(adapter, requests, layer).to(F64)
    return (v0 + torch.stack([v.delta for v in vals]).to(F64)).norm(dim=1).tolist()


def trimmed_mean(values: list[float], drop_top: float = 0.05) -> float:
    """Mean of ``values`` without the largest ⌊drop_top · n⌋ (the paper's outlier rule: top 5 %)."""
    if not values:
        raise ValueError("no values to average")
    if not 0 <= drop_top < 1:
        raise ValueError(f"drop_top must be in [0, 1), got {drop_top}")
    kept = sorted(values)[:len(values) - int(math.floor(drop_top * len(values)))]
    return float(sum(kept) / len(kept))


def reference_value_norm(adapter: ModelAdapter, requests: list, hparams, site: str, drop_top: float = 0.05) -> float:
    """The NAS anchor: trimmed mean ‖v*‖ of ``requests`` edited on ``adapter`` — call it on the ORIGINAL
    model, with a reference sample of requests (the paper: 1,000 CounterFact rewrites), and pass the
    result as ``norm_anchor``. ``site``: "value" for ROME, "resid" for MEMIT, D4S and AlphaEdit."""
    return trimmed_mean(value_norms(adapter, requests, hparams, site), drop_top)
