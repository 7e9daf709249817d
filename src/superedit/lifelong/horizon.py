"""The collapse horizon: how many sequential edits a method takes before it breaks (issue #14 item 4).

For one method's checkpoints ``(n_0 = 0 < n_1 < … < n_K)`` and a threshold ``τ`` (default 0.8), the
horizon is

    H = min { n_k : efficacy_all(n_k) < τ  or  untouched_retention(n_k) < τ },

the first checkpoint where the efficacy over ALL edits so far or the retention of untouched facts falls
below ``τ``. It is known only to checkpoint resolution: the collapse happened after the previous
checkpoint ``n_{k−1}`` (``last_ok``). When no checkpoint falls below, the outcome is "not reached within
``n_K`` edits" (``reached: False``, ``within: n_K``) — a valid result, reported as ``> n_K``. A metric
that a checkpoint does not carry (no probe facts, n = 0 efficacy) is not a crossing.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from ..errors import UsageError

__all__ = ["HORIZON_KEYS", "DEFAULT_THRESHOLD", "collapse_horizon", "horizons", "records_by_method"]

DEFAULT_THRESHOLD = 0.8
#: the two rates whose first fall below the threshold ends the horizon
HORIZON_KEYS = ("efficacy_all", "untouched_retention")


def _value(rec: Mapping, key: str) -> float | None:
    v = rec.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if v == v else None  # NaN is no measurement


def collapse_horizon(records: Iterable[Mapping], threshold: float = DEFAULT_THRESHOLD,
                     keys: Sequence[str] = HORIZON_KEYS) -> dict:
    """The horizon of one method from its checkpoint records (any order; see the module docstring).

    Returns ``{"reached", "n_edits" (H or None), "within" (last checkpoint), "last_ok" (previous
    checkpoint), "metric" and "value" (what fell below first; with two at once, the first of ``keys``),
    "threshold", "checkpoints"}``."""
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"collapse-horizon threshold must be in (0, 1] (got {threshold})")
    recs = sorted(records, key=lambda r: int(r["n_edits"]))
    if not recs:
        raise UsageError("collapse horizon: no checkpoint records for this method")
    out = {"reached": False, "n_edits": None, "within": int(recs[-1]["n_edits"]), "last_ok": None,
           "metric": None, "value": None, "threshold": threshold, "checkpoints": len(recs)}
    last_ok = None
    for r in recs:
        for k in keys:
            v = _value(r, k)
            if v is not None and v < threshold:
                out.update(reached=True, n_edits=int(r["n_edits"]), last_ok=last_ok, metric=k, value=v)
                return out
        last_ok = int(r["n_edits"])
    out["last_ok"] = last_ok
    return out


def records_by_method(records: Iterable[Mapping]) -> dict[str, list[dict]]:
    """method → its checkpoint records by n_edits (a checkpoint recorded twice: the last wins)."""
    by: dict[str, dict[int, dict]] = {}
    for r in records:
        by.setdefault(str(r["method"]), {})[int(r["n_edits"])] = dict(r)
    return {m: [v[k] for k in sorted(v)] for m, v in by.items()}


def horizons(records: Iterable[Mapping], threshold: float = DEFAULT_THRESHOLD,
             keys: Sequence[str] = HORIZON_KEYS) -> dict[str, dict]:
    """method → :func:`collapse_horizon` over the records of ``metrics.jsonl`` (all methods mixed)."""
    return {m: collapse_horizon(recs, threshold, keys) for m, recs in records_by_method(records).items()}
