"""ROME: rank-one model editing (Meng et al. 2022) → StepResult (no state).

For each request in turn (later requests see earlier ones, as in ROME's sequential application):
k* from ``editing.keys``, v* from ``editing.values`` at the MLP output, then
``W' = W + Λ (C⁻¹k*)ᵀ`` with ``Λ = (v* − (W k* + b)) / (k*ᵀ C⁻¹ k*)`` (``editing.solve.rome_solve``):
v* is the module's output, so the residual is taken against its actual output W k* + b (GPT-2,
GPT-J and GPT-NeoX have a down-projection bias b), as ROME's code does. With ``norm_anchor`` > 0, v*
is first rescaled to that norm (NAS, :mod:`.anchors`).
"""

from __future__ import annotations

import time

import torch

from ...models import ModelAdapter
from ...utils.progress import progress
from ..contexts import context_prefixes
from ..covariance import CovarianceSource
from ..delta import LayerDelta, WeightDelta
from ..hparams import ROMEHParams
from ..keys import compute_keys
from ..solve import rome_solve, with_ridge
from ..values import optimize_value
from .anchors import anchored, nas_info
from .protocol import StepResult


def rome_delta(adapter: ModelAdapter, requests: list, hparams: ROMEHParams, stats: CovarianceSource,
               state=None) -> StepResult:
    layer = hparams.layers[0]
    adapter.check_layer(layer)
    C = with_ridge(adapter.on_layer(layer, stats.mom2(layer), torch.float64), hparams.mom2_ridge)
    prefixes = context_prefixes(adapter, hparams.context_lengths, hparams.n_prefixes, hparams.seed)
    timings = {"keys": 0.0, "values": 0.0, "solve": 0.0}
    total: LayerDelta | None = None
    per_request = []
    w_orig = adapter.down_weight(layer).detach().clone()
    try:
        for req in progress(requests, desc="ROME", total=len(requests)):
            t0 = time.perf_counter()
            k = compute_keys(adapter, [req.prompt], [req.subject], [layer], prefixes, hparams.fact_token)[layer][0]
            k = adapter.on_layer(layer, k)
            t1 = time.perf_counter()
            val = optimize_value(adapter, req.prompt, req.subject, req.target_new, layer, "value", hparams, prefixes,
                                 req.relation_id)
            target, info = val.target, {}
            if hparams.norm_anchor > 0:  # NAS: v* rescaled to the anchor norm (see .anchors)
                target = anchored(val.target, hparams.norm_anchor)
                info = nas_info(float(val.target.to(torch.float64).norm()), hparams.norm_anchor)
            t2 = time.perf_counter()
            W = adapter.down_weight(layer)
            left, right = rome_solve(W, C, k, adapter.on_layer(layer, target), adapter.down_bias(layer))
            timings["keys"] += t1 - t0
            timings["values"] += t2 - t1
            timings["solve"] += time.perf_counter() - t2
            wdt = adapter.layer_dtype(layer)  # solved in float64, cast back to the weight's dtype
            d = LayerDelta(left.to(wdt), right.to(wdt))
            adapter.add_to_down_weight(layer, d.dense(torch.float64))  # later requests see this edit
            total = d if total is None else total + d
            per_request.append({"case_id": req.case_id, "layer": layer, "key_norm": float(k.norm()),
                                **val.summary(), **info})
    finally:
        adapter.set_down_weight(layer, w_orig)
    return StepResult(WeightDelta({layer: total}, "rome", {"model": adapter.identity(), "hparams": hparams.to_dict(),
                                                            "requests": per_request, "timings": timings}))
