"""Interference forecast: which protected facts a pending ROME edit will disturb, at which layer.

A ROME edit at layer l writes ``ΔW = δ (C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*)`` with ``δ = v* − W k*``, so the value of
any other key kⱼ moves by exactly

    ΔW kⱼ = p(k*, kⱼ) · δ,      p(k*, kⱼ) = k*ᵀC⁻¹kⱼ / k*ᵀC⁻¹k*.

:func:`forecast_interference` computes, per candidate layer, k* (averaged over ROME's context
prefixes), v* (``editing.values.optimize_value`` at site "value", ROME's hparams), δ, p for every
protected fact (its key at its own prompt), the predicted shifts ‖p·δ‖, the facts most at risk, and
recommends the layer with the least total predicted interference Σⱼ‖pⱼ·δ‖.

:func:`check_forecast` then performs the ROME edit at a layer and measures, for each protected fact,
the actual value change ‖ΔW kⱼ‖ and the change in log-probability of its true answer, and reports
Spearman rank correlations between the predicted and measured changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import SupereditError
from ..stats.whitening import Whitener
from ..utils.logs import get_logger
from .superposition import _clean, check_layers, item_record

log = get_logger(__name__)

__all__ = ["LayerForecast", "ForecastResult", "forecast_interference", "check_forecast"]


@dataclass
class LayerForecast:
    layer: int
    delta_norm: float  #: ‖δ‖ = ‖v* − W k*‖
    key_norm: float
    v_nll_end: float
    p: list[float]  #: p(k*, kⱼ) per protected fact
    predicted: list[float]  #: ‖pⱼ δ‖ = |pⱼ|·‖δ‖
    interference: float  #: Σⱼ ‖pⱼ δ‖
    condition_number: float
    top: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "delta_norm": self.delta_norm, "key_norm": self.key_norm,
                "v_nll_end": self.v_nll_end, "interference": self.interference,
                "mean_abs_p": float(np.mean(np.abs(self.p))) if self.p else None,
                "condition_number": self.condition_number, "p": self.p, "predicted": self.predicted, "top": self.top}


@dataclass
class ForecastResult:
    request: dict[str, Any]
    protected: list[dict[str, Any]]
    layers: dict[int, LayerForecast]
    recommended_layer: int
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _clean({"request": self.request, "recommended_layer": self.recommended_layer, "config": self.config,
                       "layers": [l.to_dict() for l in self.layers.values()], "protected": self.protected})


def _hparams(hparams, ridge):
    from ..editing.hparams import ROMEHParams

    hp = hparams if hparams is not None else ROMEHParams()
    if ridge is not None:
        hp = hp.replace(mom2_ridge=float(ridge))
    return hp


def _filter_protected(request, protected: Sequence) -> list:
    target = request.filled_prompt()
    kept = [p for p in protected if not (p.filled_prompt() == target and p.subject == request.subject)]
    if len(kept) < len(protected):
        log.warning("dropped %d protected fact(s) identical to the edited request", len(protected) - len(kept))
    if not kept:
        raise SupereditError("no protected facts to forecast for (give --protected FILE or --protected-n N ≥ 1 "
                             "other than the edited request)")
    return kept


def forecast_interference(adapter, request, protected: Sequence, cov, layers: Sequence[int] | None = None,
                          hparams=None, ridge: float | None = None, top_k: int = 10) -> ForecastResult:
    """Predicted interference of a ROME edit of ``request`` on each of ``protected`` at each layer.

    Args:
        adapter: the model.
        request: the pending EditRequest (edited to ``target_new``).
        protected: EditRequests whose current facts (prompt → target_true) must not move.
        cov: a CovarianceSource (``mom2(layer)``) — the same C a ROME edit would use.
        layers: candidate layers (default: all).
        hparams: ROMEHParams (context prefixes, value optimisation, fact token, mom2_ridge).
        ridge: overrides ``hparams.mom2_ridge`` (fraction of C's mean diagonal).
        top_k: protected facts listed per layer, by predicted ‖p·δ‖.
    """
    from ..editing.contexts import context_prefixes
    from ..editing.keys import compute_keys, keys_at
    from ..editing.values import optimize_value
    from ..utils.progress import progress

    hp = _hparams(hparams, ridge)
    layers = check_layers(layers, adapter.n_layers)
    protected = _filter_protected(request, protected)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    k_star = compute_keys(adapter, [request.prompt], [request.subject], layers, prefixes, hp.fact_token)
    k_prot = keys_at(adapter, [p.prompt for p in protected], [p.subject for p in protected], layers, hp.fact_token)
    records = [item_record(i, p) for i, p in enumerate(protected)]
    out: dict[int, LayerForecast] = {}
    for l in progress(layers, total=len(layers), desc="forecast"):
        W = Whitener(cov.mom2(l), ridge=hp.mom2_ridge, layer=l)
        k = k_star[l][0].to(torch.float64)
        yk = W.whiten(k)
        yj = W.whiten(k_prot[l])
        p = (yj @ yk) / (yk @ yk)
        val = optimize_value(adapter, request.prompt, request.subject, request.target_new, l, "value", hp, prefixes,
                             request.relation_id)
        Wl = adapter.down_weight(l).detach().to(torch.float64)
        delta = val.target.to(torch.float64) - Wl @ k.to(Wl.device)
        dn = float(delta.norm())
        pred = (p.abs() * dn).cpu().numpy()
        order = np.argsort(-pred, kind="stable")[:top_k]
        top = [{"protected_index": int(j), "p": float(p[j]), "predicted_shift": float(pred[j]), **records[j]}
               for j in order]
        out[l] = LayerForecast(layer=l, delta_norm=dn, key_norm=float(k.norm()), v_nll_end=val.final_nll,
                               p=[float(x) for x in p.cpu()], predicted=[float(x) for x in pred],
                               interference=float(pred.sum()), condition_number=W.condition_number, top=top)
        log.info("layer %d: ‖δ‖ %.3f, Σ‖pδ‖ %.4f", l, dn, float(pred.sum()))
    best = min(out.values(), key=lambda f: (f.interference if math.isfinite(f.interference) else math.inf, f.layer))
    return ForecastResult(request=item_record(-1, request), protected=records, layers=out,
                          recommended_layer=best.layer,
                          config={"layers": layers, "ridge": hp.mom2_ridge, "fact_token": hp.fact_token,
                                  "n_protected": len(protected), "top_k": top_k, "hparams": hp.to_dict()})


def _spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    r = float(spearmanr(a[ok], b[ok]).statistic)
    return r if math.isfinite(r) else None


def check_forecast(adapter, request, protected: Sequence, cov, layer: int, hparams=None, ridge: float | None = None,
                   forecast: ForecastResult | None = None) -> dict[str, Any]:
    """Perform the ROME edit at ``layer`` and compare predicted with measured changes.

    Measured per protected fact: ‖Δv‖ = ‖ΔW kⱼ‖ at ``layer`` and Δ log p(target_true | prompt) (facts
    without ``target_true`` get None). Returns a dict with both lists, the edit's own Δ log p of
    ``target_new``, and Spearman correlations (None when undefined, e.g. fewer than 3 facts). The
    model's weights are left unchanged.
    """
    from ..editing.keys import keys_at
    from ..editing.methods import get_method
    from ..eval.scoring import score_targets

    hp = _hparams(hparams, ridge)
    adapter.check_layer(layer)
    protected = _filter_protected(request, protected)
    if forecast is None or layer not in forecast.layers:
        forecast = forecast_interference(adapter, request, protected, cov, [layer], hp)
    fc = forecast.layers[layer]
    if len(fc.predicted) != len(protected):
        raise SupereditError(f"the forecast covers {len(fc.predicted)} protected facts, not {len(protected)}")
    delta = get_method("rome").fn(adapter, [request], hp.replace(layers=[layer]), cov).delta
    dW = delta.layers[layer].dense(torch.float64)
    K = keys_at(adapter, [p.prompt for p in protected], [p.subject for p in protected], [layer], hp.fact_token)[layer]
    dv = (K.to(device=dW.device, dtype=torch.float64) @ dW.T).norm(dim=1).cpu().numpy()

    has_true = [p.target_true is not None for p in protected]
    prompts = [p.filled_prompt() for p, t in zip(protected, has_true) if t]
    answers = [p.target_true for p, t in zip(protected, has_true) if t]
    edit_prompt, edit_target = [request.filled_prompt()], [request.target_new]
    before = [sc.logprob for sc in score_targets(adapter, prompts + edit_prompt, answers + edit_target)]
    with delta.applied(adapter):
        after = [sc.logprob for sc in score_targets(adapter, prompts + edit_prompt, answers + edit_target)]
    it = iter(a - b for a, b in zip(after[:-1], before[:-1]))
    dlogp = [next(it) if t else None for t in has_true]
    abs_dlogp = [abs(x) if x is not None else float("nan") for x in dlogp]
    rows = [{"protected_index": j, "predicted_shift": fc.predicted[j], "p": fc.p[j], "measured_dv": float(dv[j]),
             "delta_logp_true": dlogp[j], "prompt": protected[j].filled_prompt(), "target_true": protected[j].target_true}
            for j in range(len(protected))]
    return _clean({
        "layer": layer,
        "predicted_shift": fc.predicted,
        "measured_dv": [float(x) for x in dv],
        "delta_logp_true": dlogp,
        "spearman_value": _spearman(fc.predicted, dv),
        "spearman_logp": _spearman(fc.predicted, abs_dlogp),
        "edit_delta_logp_new": after[-1] - before[-1],
        "edit_logp_new_before": before[-1],
        "edit_logp_new_after": after[-1],
        "predicted_total": fc.interference,
        "measured_total_dv": float(dv.sum()),
        "rows": rows,
    })
