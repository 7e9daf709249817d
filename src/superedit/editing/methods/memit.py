"""MEMIT: mass-editing memory in a transformer (Meng et al. 2023) as a pure function → WeightDelta.

1. For each request, z_i = residual stream after layer L = layers[-1] at the subject's last token
   that makes the model say target_new (``editing.values`` at site "resid").
2. For each layer l in ``layers`` (in order): K = k*(l) for all requests (d_in, n);
   R = (z − h_L(current weights)) / (number of layers left); Δ_l = R Kᵀ (λC + KKᵀ)⁻¹ applied before
   moving on, so later layers only carry what earlier ones did not.
The model is restored at the end; the returned delta holds Δ_l as low-rank factors (rank ≤ n).
"""

from __future__ import annotations

import time

import torch

from ...models import ModelAdapter
from ...utils.progress import progress
from ..contexts import context_prefixes
from ..covariance import CovarianceSource
from ..delta import LayerDelta, WeightDelta
from ..hparams import MEMITHParams
from ..keys import compute_keys, keys_at
from ..solve import memit_solve, with_ridge
from ..values import optimize_values, requests_per_pass

VALUE_ROWS_PER_PASS = 512  # prompt rows per forward pass when optimising several requests' z at once


def memit_targets(adapter: ModelAdapter, requests: list, hparams: MEMITHParams, prefixes: list[str]):
    """z_i (n, d_model) at the last MEMIT layer, plus per-request value summaries."""
    z_layer = hparams.layers[-1]
    zs, summaries = [], []
    per_pass = requests_per_pass(len(prefixes), VALUE_ROWS_PER_PASS)
    with progress(total=len(requests), desc="MEMIT values") as bar:
        for i in range(0, len(requests), per_pass):
            chunk = requests[i:i + per_pass]
            vals = optimize_values(adapter, [(r.prompt, r.subject, r.target_new) for r in chunk], z_layer, "resid",
                                   hparams, prefixes, chunk_rows=VALUE_ROWS_PER_PASS)
            for req, val in zip(chunk, vals):
                zs.append(val.target)
                summaries.append({"case_id": req.case_id, **val.summary()})
            bar.update(len(chunk))
    return torch.stack(zs), summaries


def memit_delta(adapter: ModelAdapter, requests: list, hparams: MEMITHParams, stats: CovarianceSource) -> WeightDelta:
    layers = sorted(hparams.layers)
    for l in layers:
        adapter.check_layer(l)
    prefixes = context_prefixes(adapter, hparams.context_lengths, hparams.n_prefixes, hparams.seed)
    prompts = [r.prompt for r in requests]
    subjects = [r.subject for r in requests]
    t0 = time.perf_counter()
    zs, summaries = memit_targets(adapter, requests, hparams, prefixes)
    timings = {"values": time.perf_counter() - t0, "keys": 0.0, "solve": 0.0}
    originals = {l: adapter.down_weight(l).detach().clone() for l in layers}
    deltas: dict[int, LayerDelta] = {}
    info = []
    try:
        for i, layer in enumerate(layers):
            t1 = time.perf_counter()
            K = compute_keys(adapter, prompts, subjects, [layer], prefixes, hparams.fact_token)[layer]  # (n, d_in)
            cur = keys_at(adapter, prompts, subjects, [layers[-1]], hparams.fact_token, site="resid")[layers[-1]]
            t2 = time.perf_counter()
            timings["keys"] += t2 - t1
            R = (zs - cur).T / (len(layers) - i)  # (d_model, n)
            C = with_ridge(stats.mom2(layer).to(adapter.device), hparams.mom2_ridge)
            left, right = memit_solve(R, K.T, C, hparams.mom2_update_weight)
            d = LayerDelta(left.to(adapter.dtype), right.to(adapter.dtype))
            adapter.add_to_down_weight(layer, d.dense(torch.float64))
            deltas[layer] = d
            timings["solve"] += time.perf_counter() - t2
            info.append({"layer": layer, "residual_norm": float(R.norm(dim=0).mean()),
                         "key_norm": float(K.norm(dim=1).mean())})
    finally:
        for l, w in originals.items():
            adapter.set_down_weight(l, w)
    return WeightDelta(deltas, "memit", {"model": adapter.identity(), "hparams": hparams.to_dict(),
                                         "requests": summaries, "layers": info, "timings": timings})
