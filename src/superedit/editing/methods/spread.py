"""The MEMIT layer loop (Meng et al. 2023, Alg. 1), written once for MEMIT, D4S, AlphaEdit and keel.

1. z_i: the residual stream after the last edited layer L at the subject's last token that makes the
   model say target_new (``editing.values`` at site "resid"), one per request, on the model as it is;
   with ``norm_anchor`` > 0 its value part is rescaled to the anchor norm (NAS, ``anchors``).
2. For each edited layer l, in order (i = 0 … |layers| − 1):
   K = k*(l) (d_mlp, n) read on the model carrying the increments of the earlier layers;
   R = (z − h_L) / (|layers| − i) (d_model, n), h_L read on that same model (MEMIT eq. 19: the
   residual is spread over the layers left); the method's own per-layer solver turns (K, R) into the
   increment Δ_l, which is applied before moving on, so later layers only carry what earlier ones did not.
3. Every weight is restored; the increments are returned.

R is measured on the model's actual output (the resid site), so a down-projection bias b cancels
out of every residual: no solver ever needs it. Where the family normalises the MLP output before the
residual (``mlp_out_norm``, Gemma 3), each layer's R is mapped to the value move whose normalised
output moves the residual by R (:mod:`superedit.editing.out_norm`) before the solve, and z comes from
a value-site optimisation (:func:`memit_targets`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ...models import ModelAdapter
from ...utils.progress import progress
from ..contexts import context_prefixes
from ..delta import LayerDelta
from ..keys import compute_keys, keys_at
from ..out_norm import value_targets_through_norm
from ..values import optimize_values, requests_per_pass
from .anchors import anchor_residual_targets

F64 = torch.float64
VALUE_ROWS_PER_PASS = 512  # prompt rows per forward pass when optimising several requests' z at once

#: (layer, K (d_mlp, n) float64, R (d_model, n) float64) → (increment Δ_l, extra per-layer info)
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor], "tuple[LayerDelta, dict]"]


def memit_targets(adapter: ModelAdapter, requests: list, hparams, prefixes: list[str]):
    """z_i (n, d_model) at the last edited layer's resid, plus per-request value summaries.

    For a family with an ``mlp_out_norm`` (Gemma 3) z = h_L + N(v*) − N(v₀), v* optimised at the value
    site (reachable through the norm by construction; the clamp bounds ‖v* − v₀‖ as in ROME).

    With ``hparams.norm_anchor`` > 0 each z is NAS-anchored (:mod:`.anchors`: the value part v* = v₀ + δ
    rescaled to that norm) and returned in float64; with 0 the optimised z as they are."""
    z_layer = sorted(hparams.layers)[-1]
    out_norm = adapter.mlp_out_norm(z_layer)
    if out_norm is not None and hparams.norm_anchor > 0:
        from ...errors import UsageError

        raise UsageError(f"norm_anchor (NAS) {hparams.norm_anchor}: this family ({adapter.family}) normalises the "
                         "MLP output before the residual, so a value's norm has no effect there; set norm_anchor: 0")
    # where the residual adds N(value) (Gemma 3), only values the norm can output are reachable: optimise
    # the value (ROME's site) and take z = h_L + N(v*) − N(v₀); elsewhere optimise the residual itself
    site = "resid" if out_norm is None else "value"
    zs, summaries = [], []
    per_pass = requests_per_pass(len(prefixes), VALUE_ROWS_PER_PASS)
    with progress(total=len(requests), desc="MEMIT values") as bar:
        for i in range(0, len(requests), per_pass):
            chunk = requests[i:i + per_pass]
            vals = optimize_values(adapter, [(r.prompt, r.subject, r.target_new) for r in chunk], z_layer, site,
                                   hparams, prefixes, chunk_rows=VALUE_ROWS_PER_PASS,
                                   relations=[r.relation_id for r in chunk])
            targets, extra = [v.target for v in vals], [{} for _ in vals]
            if out_norm is not None:
                h = keys_at(adapter, [r.prompt for r in chunk], [r.subject for r in chunk], [z_layer],
                            hparams.fact_token, site="resid")[z_layer]
                with torch.no_grad():
                    moved = [out_norm(v.target[None].to(h.dtype))[0] - out_norm(v.init[None].to(h.dtype))[0]
                             for v in vals]
                targets = [h_i + m_i.to(h_i.device) for h_i, m_i in zip(h, moved)]
            if hparams.norm_anchor > 0:  # NAS: z = (h_L − v₀) + anchored v*, float64 (see .anchors)
                z, extra = anchor_residual_targets(adapter, chunk, vals, z_layer, hparams.norm_anchor)
                targets = list(z)
            for req, val, target, info in zip(chunk, vals, targets, extra):
                zs.append(target)
                summaries.append({"case_id": req.case_id, **val.summary(), **info})
            bar.update(len(chunk))
    return torch.stack(zs), summaries


#: hyperparameters only the per-layer solves read: z (:func:`memit_targets`) does not depend on them, so
#: saved targets stay valid when they change (a sweep over AlphaEdit's threshold and α, or MEMIT's λ)
SOLVE_ONLY_FIELDS = ("nullspace_threshold", "nullspace_relative", "L2", "mom2_update_weight")


def _z_settings(hparams) -> dict:
    return {k: v for k, v in hparams.to_dict().items() if k not in SOLVE_ONLY_FIELDS}


def _request_keys(requests: list) -> list[list]:
    return [[r.case_id, r.prompt, r.subject, r.target_new] for r in requests]


def save_targets(path, targets: tuple, requests: list, hparams) -> None:
    """Write :func:`memit_targets`' (z, summaries) for ``requests`` with the settings z depends on (atomically)."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"z": targets[0], "summaries": targets[1], "case_ids": [r.case_id for r in requests],
                "requests": _request_keys(requests), "hparams": hparams.to_dict()}, tmp)
    tmp.replace(path)


def load_targets(path, requests: list, hparams) -> tuple:
    """(z, summaries) saved by :func:`save_targets`; ValueError unless they were made for these requests (in
    this order: case_id, prompt, subject, target_new) and the same value settings (every hyperparameter but :data:`SOLVE_ONLY_FIELDS`)."""
    saved = torch.load(path)
    made = {k: v for k, v in saved["hparams"].items() if k not in SOLVE_ONLY_FIELDS}
    same = (saved["requests"] == _request_keys(requests) if "requests" in saved  # files before 30 Nov: ids only
            else saved["case_ids"] == [r.case_id for r in requests])
    if not same:
        raise ValueError(f"{path}: z was made for other requests (or another order)")
    if made != _z_settings(hparams):
        diff = sorted(k for k in set(made) | set(_z_settings(hparams)) if made.get(k) != _z_settings(hparams).get(k))
        raise ValueError(f"{path}: z was made with other value settings ({', '.join(diff)})")
    return saved["z"], saved["summaries"]


@dataclass
class Spread:
    """What :func:`spread_update` computed: per-layer increments, value summaries, per-layer info, timings."""

    deltas: dict[int, LayerDelta]
    requests: list[dict]
    layers: list[dict]
    timings: dict[str, float] = field(default_factory=dict)


def spread_update(adapter: ModelAdapter, requests: list, hparams, solve_layer: LayerSolver,
                  targets: "tuple[torch.Tensor, list[dict]] | None" = None) -> Spread:
    """Run the MEMIT layer loop (module docstring) with ``solve_layer`` as the per-layer solve.

    ``hparams`` needs MEMIT's fields (layers, context_lengths, n_prefixes, seed, fact_token and the
    value settings). ``targets``: (z (n, d_model), value summaries) from :func:`memit_targets` on this
    model as it is now, for these requests and value settings, to reuse across solves that differ only in
    the solve (a hyperparameter sweep); None computes them. The model's weights are restored on return,
    also on an exception.
    """
    layers = sorted(hparams.layers)
    for l in layers:
        adapter.check_layer(l)
    prefixes = context_prefixes(adapter, hparams.context_lengths, hparams.n_prefixes, hparams.seed)
    prompts, subjects = [r.prompt for r in requests], [r.subject for r in requests]
    t0 = time.perf_counter()
    if targets is None:
        zs, summaries = memit_targets(adapter, requests, hparams, prefixes)
    else:
        zs, summaries = targets
        if zs.shape[0] != len(requests) or len(summaries) != len(requests):
            raise ValueError(f"targets hold {zs.shape[0]} z and {len(summaries)} summaries for {len(requests)} requests")
    timings = {"values": time.perf_counter() - t0, "keys": 0.0, "solve": 0.0}
    originals = {l: adapter.down_weight(l).detach().clone() for l in layers}
    deltas: dict[int, LayerDelta] = {}
    info = []
    try:
        for i, layer in enumerate(layers):
            t1 = time.perf_counter()
            dev = adapter.layer_device(layer)  # K, R and the solve gather at the edited weight
            K = compute_keys(adapter, prompts, subjects, [layer], prefixes, hparams.fact_token)[layer].T.to(dev, F64)
            cur = keys_at(adapter, prompts, subjects, [layers[-1]], hparams.fact_token, site="resid")[layers[-1]]
            t2 = time.perf_counter()
            timings["keys"] += t2 - t1
            R = (zs.to(dev) - cur.to(dev)).T.to(F64) / (len(layers) - i)  # (d_model, n)
            residual_norm = float(R.norm(dim=0).mean())
            norm = adapter.mlp_out_norm(layer)
            extra_norm = {}
            if norm is not None:  # the residual adds N(value): move the value so that N(value) moves by R
                m = keys_at(adapter, prompts, subjects, [layer], hparams.fact_token, site="value")[layer]
                dm, err = value_targets_through_norm(norm, m.to(dev), R.T)
                R = dm.T.contiguous()  # from here on the value move the solve must produce
                extra_norm = {"value_move_norm": float(R.norm(dim=0).mean()),
                              "out_norm_rel_error_max": float(err.max()), "out_norm_rel_error_mean": float(err.mean())}
            d, extra = solve_layer(layer, K, R)
            adapter.add_to_down_weight(layer, d.dense(F64))
            deltas[layer] = d
            timings["solve"] += time.perf_counter() - t2
            info.append({"layer": layer, "residual_norm": residual_norm,
                         "key_norm": float(K.norm(dim=0).mean()), **extra_norm, **extra})
    finally:
        for l, w in originals.items():
            adapter.set_down_weight(l, w)
    return Spread(deltas, summaries, info, timings)


def sums_step(adapter: ModelAdapter, requests, hparams, solve: Callable, state, journal: dict, method: str):
    """One step of a running-sums method (D4S, keel): the MEMIT spread with ``solve`` adding each layer's
    terms to ``state`` and ``journal``; if anything fails, the terms added so far are taken out again, so
    the state is as before the step. Returns the :class:`~.protocol.StepResult`."""
    from ..delta import WeightDelta
    from .protocol import StepResult

    try:
        sp = spread_update(adapter, requests, hparams, solve)
    except BaseException:
        state.remove(journal)
        raise
    return StepResult(WeightDelta(sp.deltas, method, {"model": adapter.identity(), "hparams": hparams.to_dict(),
                                                      "requests": sp.requests, "layers": sp.layers,
                                                      "timings": sp.timings}), journal)


def residual_against_w0(adapter: ModelAdapter, layer: int, W0: torch.Tensor, K: torch.Tensor,
                        R: torch.Tensor) -> torch.Tensor:
    """R₀ = R + (W_cur − W₀) K (d_model, k), float64: the residual ``R`` measured on the model as it is
    (carrying W₀ + Δ_old), re-expressed against the original weights W₀ — what running-sums methods add."""
    W_cur = adapter.down_weight(layer).detach().to(torch.float64)
    return R + (W_cur - W0.to(W_cur.device, torch.float64)) @ K
