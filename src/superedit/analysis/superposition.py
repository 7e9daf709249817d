"""Knowledge in superposition: how far keys of different facts overlap in the whitening space C^-1/2.

A rank-one (ROME-style) edit of item i, ``ΔW = δᵢ (C⁻¹kᵢ)ᵀ / (kᵢᵀC⁻¹kᵢ)``, shifts the value of any
other key kⱼ by ``p(kᵢ,kⱼ)·δᵢ`` with

    p(kᵢ, kⱼ) = kᵢᵀ C⁻¹ kⱼ / kᵢᵀ C⁻¹ kᵢ.

Lifelong editing interferes exactly when these are not zero. For m items this module builds, per
layer,

* ``P[i, j] = kᵢᵀC⁻¹kⱼ / kᵢᵀC⁻¹kᵢ``  (not symmetric, diagonal 1),
* ``Q[i, j] = kᵢ·kⱼ``                 (raw dot products),
* the whitening cosine ``kᵢᵀC⁻¹kⱼ / √(kᵢᵀC⁻¹kᵢ · kⱼᵀC⁻¹kⱼ)`` and the activation cosine,

and summarises the off-diagonal entries (mean, std, mean |p|, Fisher excess kurtosis, share of
|p| > 0.1, a Gaussian KDE, angle modes) plus the kurtosis on nested subsets of the items
(m-convergence) and the most superposed pairs.

Numerics: float64 throughout; C is factorised once per layer (:class:`~superedit.stats.whitening.Whitener`,
Cholesky ``C = L Lᵀ``) and keys are whitened by a triangular solve ``L⁻¹k`` — C is never inverted. A
singular or ill-conditioned C (condition number > 1e12, or a failed Cholesky) raises
:class:`~superedit.errors.StatsError` unless a ridge (fraction of C's mean diagonal) is given.

Items are taken in the order of one seeded permutation of the requests, so the first m' items of
an m-item run are exactly the items of an m'-item run with the same seed, and ``P[:m', :m']`` is the
m'-item matrix (P only depends on the pair and on C).
"""

from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import SupereditError
from ..stats.whitening import Whitener
from ..utils.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
from ..utils.logs import get_logger

log = get_logger(__name__)

DEFAULT_THRESHOLD = 0.1
MATRIX_NAMES = ("P", "Q", "wcos", "acos")

__all__ = [
    "SuperpositionError", "LayerSuperposition", "SuperpositionResult", "select_items", "item_keys",
    "superposition_matrices", "offdiag", "excess_kurtosis", "angles_deg", "angle_mode", "offdiag_stats",
    "kde_curve", "m_steps", "m_convergence", "top_pairs", "analyze_keys", "analyze_superposition",
    "model_info", "scaling_records", "save_scaling", "item_record", "MATRIX_NAMES",
]


class SuperpositionError(SupereditError):
    """Bad input for a superposition analysis (too few items, bad option values)."""


# ---------------------------------------------------------------------------------------- core math
def superposition_matrices(K: torch.Tensor, C: torch.Tensor | Whitener, ridge: float = 0.0,
                           layer: int | None = None) -> dict[str, Any]:
    """P, Q, whitening cosine and activation cosine (numpy float64, (m, m)) for keys K (m, d).

    Returns a dict with keys ``P``, ``Q``, ``wcos``, ``acos``, ``condition_number``, ``ridge``.
    Raises StatsError for a singular C without ridge, SuperpositionError for a zero key.
    """
    W = C if isinstance(C, Whitener) else Whitener(C, ridge=ridge, layer=layer)
    K64 = K.detach().to(device=W.L.device, dtype=torch.float64)
    if K64.dim() != 2:
        raise SuperpositionError(f"keys must be (m, d), got shape {tuple(K64.shape)}")
    Y = W.whiten(K64)
    G = Y @ Y.T  # kᵢᵀ C⁻¹ kⱼ, symmetric by construction
    g = G.diagonal().clone()
    Q = K64 @ K64.T
    q = Q.diagonal().clone()
    if (g <= 0).any() or (q <= 0).any():
        bad = int(torch.nonzero((g <= 0) | (q <= 0))[0, 0])
        where = f"layer {layer}: " if layer is not None else ""
        raise SuperpositionError(f"{where}item {bad} has a zero key; P is undefined for it (drop the item)")
    P = G / g[:, None]
    P.diagonal().fill_(1.0)
    wcos = (G / torch.sqrt(g[:, None] * g[None, :])).clamp(-1.0, 1.0)
    acos = (Q / torch.sqrt(q[:, None] * q[None, :])).clamp(-1.0, 1.0)
    wcos.diagonal().fill_(1.0)
    acos.diagonal().fill_(1.0)
    return {"P": P.cpu().numpy(), "Q": Q.cpu().numpy(), "wcos": wcos.cpu().numpy(), "acos": acos.cpu().numpy(),
            "condition_number": W.condition_number, "ridge": W.ridge}


def offdiag(M: np.ndarray) -> np.ndarray:
    """The off-diagonal entries of a square matrix, row-major, as a 1-D array."""
    M = np.asarray(M)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {M.shape}")
    return M[~np.eye(M.shape[0], dtype=bool)]


def excess_kurtosis(x) -> float:
    """Fisher excess kurtosis (normal → 0; scipy.stats.kurtosis with fisher=True, bias=True)."""
    from scipy.stats import kurtosis

    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size < 2 or float(np.std(x)) == 0.0:
        return float("nan")
    return float(kurtosis(x, fisher=True, bias=True))


def angles_deg(cos) -> np.ndarray:
    """Angles in degrees from cosines (clipped to [-1, 1])."""
    return np.degrees(np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)))


def angle_mode(angles, bin_width: float = 1.0) -> float:
    """Centre of the fullest histogram bin over [0°, 180°] (the distribution's mode)."""
    a = np.asarray(angles, dtype=np.float64).ravel()
    if a.size == 0:
        return float("nan")
    edges = np.arange(0.0, 180.0 + bin_width, bin_width)
    counts, edges = np.histogram(a, bins=edges)
    i = int(np.argmax(counts))
    return float((edges[i] + edges[i + 1]) / 2)


def offdiag_stats(P: np.ndarray, wcos: np.ndarray | None = None, acos: np.ndarray | None = None,
                  threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Distribution statistics of the off-diagonal entries of P (and of the angles, when given)."""
    x = offdiag(P)
    out = {
        "m": int(P.shape[0]),
        "n_offdiag": int(x.size),
        "mean": float(np.mean(x)),
        "std": float(np.std(x)),
        "mean_abs": float(np.mean(np.abs(x))),
        "max_abs": float(np.max(np.abs(x))) if x.size else float("nan"),
        "kurtosis": excess_kurtosis(x),
        "frac_abs_gt": float(np.mean(np.abs(x) > threshold)),
        "threshold": float(threshold),
    }
    for name, cos in (("whitening", wcos), ("activation", acos)):
        if cos is not None:
            a = angles_deg(offdiag(cos))
            out[f"angle_mode_{name}"] = angle_mode(a)
            out[f"angle_mean_{name}"] = float(np.mean(a))
            out[f"angle_std_{name}"] = float(np.std(a))
    return out


def kde_curve(x, n_points: int = 200, lo_q: float = 0.001, hi_q: float = 0.999) -> dict[str, list[float]]:
    """Gaussian KDE (scipy.stats.gaussian_kde) of ``x`` on a grid spanning its [lo_q, hi_q] quantiles."""
    from scipy.stats import gaussian_kde

    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"x": [], "y": []}
    lo, hi = np.quantile(x, [lo_q, hi_q])
    pad = 0.1 * (hi - lo) if hi > lo else 0.5
    grid = np.linspace(lo - pad, hi + pad, n_points)
    try:
        y = gaussian_kde(x)(grid)
    except (np.linalg.LinAlgError, ValueError):  # degenerate sample (all equal)
        y = np.zeros_like(grid)
        y[np.argmin(np.abs(grid - x.mean()))] = 1.0 / (grid[1] - grid[0])
    return {"x": grid.tolist(), "y": y.tolist()}


def m_steps(m: int, start: int = 16) -> list[int]:
    """16, 32, 64, … below m, then m itself."""
    steps, s = [], start
    while s < m:
        steps.append(s)
        s *= 2
    return steps + [m]


def m_convergence(P: np.ndarray, steps: Sequence[int] | None = None,
                  threshold: float = DEFAULT_THRESHOLD) -> list[dict[str, float]]:
    """Statistics of the off-diagonal P on the nested subsets of the first m' items, for m' in ``steps``."""
    m = P.shape[0]
    out = []
    for s in (steps or m_steps(m)):
        if s < 2 or s > m:
            raise SuperpositionError(f"m-convergence step {s} is outside 2..{m}")
        x = offdiag(P[:s, :s])
        out.append({"m": int(s), "kurtosis": excess_kurtosis(x), "std": float(np.std(x)),
                    "mean_abs": float(np.mean(np.abs(x))), "frac_abs_gt": float(np.mean(np.abs(x) > threshold))})
    return out


def item_record(index: int, req) -> dict[str, Any]:
    """What the outputs say about one item (an EditRequest or any object with the same attributes)."""
    get = lambda name: getattr(req, name, None)  # noqa: E731
    prompt = req.filled_prompt() if hasattr(req, "filled_prompt") else str(get("prompt"))
    return {"index": int(index), "source": get("source"), "case_id": get("case_id"), "subject": get("subject"),
            "prompt": prompt, "relation": get("relation_id"), "target_true": get("target_true"),
            "target_new": get("target_new")}


def top_pairs(P: np.ndarray, items: Sequence[dict] | None = None, k: int = 20, by: str = "value",
              wcos: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The k largest off-diagonal entries of P (``by="value"``, or of |P| with ``by="abs"``).

    Each entry has ``i``, ``j``, ``p`` (= P[i, j]), ``p_ji``, the whitening cosine when given, and
    both items' records (prompt, subject, relation, targets) when ``items`` is given.
    """
    if by not in ("value", "abs"):
        raise SuperpositionError(f"top pairs by {by!r}: choose 'value' or 'abs'")
    m = P.shape[0]
    scores = (np.abs(P) if by == "abs" else P.astype(np.float64)).copy()
    np.fill_diagonal(scores, -np.inf)
    k = max(0, min(int(k), m * (m - 1)))
    flat = np.argsort(-scores, axis=None, kind="stable")[:k]
    out = []
    for rank, f in enumerate(flat):
        i, j = divmod(int(f), m)
        rec: dict[str, Any] = {"rank": rank + 1, "i": i, "j": j, "p": float(P[i, j]), "p_ji": float(P[j, i])}
        if wcos is not None:
            rec["whitening_cos"] = float(wcos[i, j])
        if items is not None:
            rec["item_i"], rec["item_j"] = items[i], items[j]
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------- items & keys
def select_items(requests: Sequence, m: int, seed: int = 0) -> list[tuple[int, Any]]:
    """``m`` (index, request) pairs in the order of one seeded permutation of ``requests``.

    The set equals ``superedit.data.sample_requests(requests, m, seed)``; the order is the
    permutation's, so smaller m gives a prefix (nested subsets).
    """
    n = len(requests)
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise SuperpositionError(f"--m must be an integer ≥ 2 (got {m!r})")
    if m > n:
        raise SuperpositionError(f"--m {m} is larger than the {n} items available; pass --m {n} or fewer, "
                                 "or give more requests")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [(i, requests[i]) for i in order[:m]]


def item_keys(adapter, requests: Sequence, layers: Sequence[int], fact_token: str = "subject_last",
              batch_size: int = 32) -> dict[int, torch.Tensor]:
    """Keys of each request's filled prompt at ``fact_token``, all layers in one pass per batch."""
    from ..editing.keys import FACT_TOKENS, keys_at

    if fact_token not in FACT_TOKENS:
        raise SuperpositionError(f"--fact-token {fact_token!r} is not one of {', '.join(FACT_TOKENS)}")
    layers = list(layers)
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    from ..utils.progress import progress

    starts = range(0, len(requests), batch_size)
    for s in progress(starts, total=len(starts), desc="keys"):
        chunk = requests[s:s + batch_size]
        ks = keys_at(adapter, [r.prompt for r in chunk], [r.subject for r in chunk], layers, fact_token,
                     batch_size=batch_size)
        for l in layers:
            out[l].append(ks[l].to(torch.float64))
    return {l: torch.cat(v) for l, v in out.items()}


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    layers = list(layers)
    if not layers:
        raise SuperpositionError("no layers selected; pass --layers all or e.g. --layers 3,4")
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n_layers]
    if bad:
        raise IndexError(f"layer(s) {bad} out of range: this model has layers 0..{n_layers - 1}")
    return sorted(set(layers))


# ---------------------------------------------------------------------------------------- results
@dataclass
class LayerSuperposition:
    layer: int
    matrices: dict[str, np.ndarray]  #: P, Q, wcos, acos — (m, m) float64
    condition_number: float
    ridge: float
    stats: dict[str, float]
    m_convergence: list[dict[str, float]]
    kde: dict[str, list[float]]
    top_pairs: list[dict[str, Any]]

    @property
    def P(self) -> np.ndarray:
        return self.matrices["P"]

    def row(self) -> dict[str, Any]:
        return {"layer": self.layer, "condition_number": self.condition_number, "ridge": self.ridge, **self.stats}


@dataclass
class SuperpositionResult:
    model: dict[str, Any]
    items: list[dict[str, Any]]
    layers: dict[int, LayerSuperposition]
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the matrices, JSON-serialisable (what stats.json holds)."""
        return {
            "model": self.model,
            "config": self.config,
            "m": len(self.items),
            "layers": [l.row() for l in self.layers.values()],
            "m_convergence": {str(l): v.m_convergence for l, v in self.layers.items()},
            "kurtosis_by_layer": {str(l): v.stats["kurtosis"] for l, v in self.layers.items()},
        }

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write matrices (.npy per layer), stats.json/.csv, m_convergence.csv, kde.json, top_pairs.json/.csv,
        items.jsonl under ``out_dir``; returns the paths."""
        from ..utils.io import atomic_path

        out = Path(out_dir)
        (out / "matrices").mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for l, res in self.layers.items():
            for name in MATRIX_NAMES:
                p = out / "matrices" / f"{name}_L{l}.npy"
                with atomic_path(p) as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, res.matrices[name])
                written.append(p)
        summary = _clean(self.summary())
        write_json_atomic(out / "stats.json", summary)
        written.append(out / "stats.json")
        rows = [_clean(l.row()) for l in self.layers.values()]
        write_text_atomic(out / "stats.csv", _csv(rows))
        written.append(out / "stats.csv")
        conv = [{"layer": l, **r} for l, v in self.layers.items() for r in v.m_convergence]
        write_text_atomic(out / "m_convergence.csv", _csv(_clean(conv)))
        written.append(out / "m_convergence.csv")
        write_json_atomic(out / "kde.json", {str(l): v.kde for l, v in self.layers.items()}, indent=None)
        written.append(out / "kde.json")
        pairs = [{"layer": l, **p} for l, v in self.layers.items() for p in v.top_pairs]
        write_json_atomic(out / "top_pairs.json", _clean(pairs))
        written.append(out / "top_pairs.json")
        flat = []
        for p in pairs:
            r = {k: v for k, v in p.items() if not k.startswith("item_")}
            for side in ("i", "j"):
                it = p.get(f"item_{side}") or {}
                r.update({f"{side}_prompt": it.get("prompt"), f"{side}_relation": it.get("relation"),
                          f"{side}_target_true": it.get("target_true"), f"{side}_target_new": it.get("target_new")})
            flat.append(r)
        write_text_atomic(out / "top_pairs.csv", _csv(_clean(flat)))
        written.append(out / "top_pairs.csv")
        write_jsonl_atomic(out / "items.jsonl", self.items)
        written.append(out / "items.jsonl")
        return written


def _clean(obj):
    """NaN/inf → None (strict JSON), numpy scalars → Python."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if not rows:
        return ""
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- drivers
def analyze_keys(keys: dict[int, torch.Tensor], cov, items: Sequence[dict] | None = None, ridge: float = 0.0,
                 top_k: int = 20, top_by: str = "value", threshold: float = DEFAULT_THRESHOLD,
                 steps: Sequence[int] | None = None, kde_points: int = 200,
                 model: dict | None = None, config: dict | None = None) -> SuperpositionResult:
    """The analysis from keys in hand: ``keys = {layer: (m, d)}``, ``cov`` a CovarianceSource
    (``mom2(layer)``) or ``{layer: C}``."""
    layers: dict[int, LayerSuperposition] = {}
    m = None
    for l in sorted(keys):
        K = keys[l]
        if m is None:
            m = K.shape[0]
        C = cov[l] if isinstance(cov, dict) else cov.mom2(l)
        W = Whitener(C, ridge=ridge, layer=l)
        mats = superposition_matrices(K, W, layer=l)
        P = mats["P"]
        st = offdiag_stats(P, mats["wcos"], mats["acos"], threshold)
        layers[l] = LayerSuperposition(
            layer=l, matrices={n: mats[n] for n in MATRIX_NAMES}, condition_number=float(mats["condition_number"]),
            ridge=float(ridge or 0.0), stats=st, m_convergence=m_convergence(P, steps, threshold),
            kde=kde_curve(offdiag(P), kde_points), top_pairs=top_pairs(P, items, top_k, top_by, mats["wcos"]))
        log.info("layer %d: kurtosis %.3f, mean|p| %.4f, cond %.3g", l, st["kurtosis"], st["mean_abs"],
                 mats["condition_number"])
    items = list(items) if items is not None else [{"index": i} for i in range(m or 0)]
    return SuperpositionResult(model=model or {}, items=items, layers=layers, config=config or {})


def model_info(adapter) -> dict[str, Any]:
    return {"source": str(adapter.source), "family": adapter.family, "n_layers": adapter.n_layers,
            "d_model": adapter.d_model, "d_mlp": adapter.d_mlp,
            "n_params": int(sum(p.numel() for p in adapter.model.parameters())), "identity": adapter.identity()}


def analyze_superposition(adapter, requests: Sequence, cov, layers: Sequence[int] | None = None, m: int = 128,
                          seed: int = 0, fact_token: str = "subject_last", ridge: float = 0.0, top_k: int = 20,
                          top_by: str = "value", threshold: float = DEFAULT_THRESHOLD, batch_size: int = 32,
                          kde_points: int = 200) -> SuperpositionResult:
    """Full analysis on a model: choose m items (seeded), read their keys at every chosen layer in one
    pass per batch, and build matrices + statistics with C from ``cov`` (a CovarianceSource)."""
    layers = check_layers(layers, adapter.n_layers)
    chosen = select_items(list(requests), m, seed)
    reqs = [r for _, r in chosen]
    items = [item_record(i, r) for i, r in chosen]
    keys = item_keys(adapter, reqs, layers, fact_token, batch_size)
    config = {"m": m, "seed": seed, "fact_token": fact_token, "ridge": ridge, "layers": layers, "top_k": top_k,
              "top_by": top_by, "threshold": threshold, "n_requests": len(requests)}
    return analyze_keys(keys, cov, items, ridge=ridge, top_k=top_k, top_by=top_by, threshold=threshold,
                        kde_points=kde_points, model=model_info(adapter), config=config)


# ---------------------------------------------------------------------------------------- scaling law
def scaling_records(results: Sequence[SuperpositionResult]) -> list[dict[str, Any]]:
    """One row per (model, layer): n_params, relative depth l/(L-1), kurtosis and friends."""
    return [row for res in results for row in scaling_rows(res.summary())]


def scaling_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The scaling-law rows of one model from its summary (``SuperpositionResult.summary()``, i.e. a saved
    ``stats.json``): one per layer, with the testbed training budget when ``model.training`` has it."""
    model = summary.get("model") or {}
    n_layers = int(model.get("n_layers", 1))
    training = {f"train_{k}": v for k, v in (model.get("training") or {}).items()
                if k in ("epochs", "recall", "paraphrase_recall")}
    return [{"model": model.get("source"), "n_params": model.get("n_params"), "n_layers": n_layers,
             "layer": int(r["layer"]), "relative_depth": r["layer"] / (n_layers - 1) if n_layers > 1 else 0.0,
             "kurtosis": r.get("kurtosis"), "mean_abs": r.get("mean_abs"), "std": r.get("std"),
             "frac_abs_gt": r.get("frac_abs_gt"), "m": r.get("m"), **training}
            for r in summary.get("layers", [])]


def save_scaling(rows: list[dict[str, Any]], out_dir: str | Path, config: dict | None = None) -> list[Path]:
    out = Path(out_dir)
    models: dict[str, dict] = {}
    for r in rows:
        d = models.setdefault(r["model"], {"model": r["model"], "n_params": r["n_params"], "n_layers": r["n_layers"],
                                           **{k: v for k, v in r.items() if k.startswith("train_")},
                                           "kurtosis": []})
        d["kurtosis"].append(r["kurtosis"])
    per_model = []
    for d in models.values():
        k = np.array([x for x in d.pop("kurtosis") if x is not None and math.isfinite(x)], dtype=float)
        d.update({"kurtosis_mean": float(k.mean()) if k.size else None,
                  "kurtosis_max": float(k.max()) if k.size else None,
                  "kurtosis_median": float(np.median(k)) if k.size else None})
        per_model.append(d)
    write_json_atomic(out / "scaling.json", _clean({"config": config or {}, "models": per_model, "rows": rows}))
    write_text_atomic(out / "scaling.csv", _csv(_clean(rows)))
    return [out / "scaling.json", out / "scaling.csv"]
