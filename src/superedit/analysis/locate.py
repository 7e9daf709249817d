"""Where facts live, averaged over many facts at the token groups that matter (the cheap trace).

A full causal trace restores every (layer, token) cell: on a 30-layer model that is ~2 minutes per
fact and kind on one core. The figure ROME draws from it — the average indirect effect of restoring
the MLP or attention output, per layer, at the last subject token, at the other subject tokens and
at the last token — needs only those three position groups. So each fact runs one batched set of
restorations (through :func:`superedit.analysis.tracing.restored_probs`, same noise draws for
every restoration):

    for kind in kinds, layer l, group g:  restore kind's clean output at tokens g, layers window(l)

and the per-fact indirect effects ``IE = P_restored − P_corrupt`` (probability of the true object's
first token) are written one JSON line per fact, so a long study resumes where it stopped.
:func:`summarise_locate` averages them with a 95% bootstrap interval over facts.

Groups: ``last subject token`` = [s_last]; ``other subject tokens`` = [s_first … s_last−1], restored
together (empty for a one-token subject: the fact then counts only for the other groups);
``last token`` = [T−1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..utils.logs import get_logger
from .tracing import as_fact, default_window, restored_probs, window_layers

log = get_logger(__name__)

GROUPS = ("last subject token", "other subject tokens", "last token")


def group_positions(first: int, last: int, n_tokens: int) -> dict[str, list[int]]:
    return {"last subject token": [last], "other subject tokens": list(range(first, last)),
            "last token": [n_tokens - 1]}


def locate_fact(adapter, fact: Any, kinds: Sequence[str] = ("mlp", "attn"), windows: dict | None = None,
                noise_scale: float = 3.0, samples: int = 3, seed: int = 0, batch_size: int = 256,
                layer_stride: int = 1) -> dict:
    """Indirect effects of one fact: ``{"ie": {kind: {group: [per layer]}}, "layers", "p_clean", …}``.

    ``layer_stride`` > 1 centres the restored windows on every ``layer_stride``-th layer only (the
    windows still cover the layers between); ``layers`` lists the centres."""
    fact = as_fact(fact)
    n = adapter.n_layers
    if layer_stride < 1:
        raise ValueError(f"layer_stride must be ≥ 1 (got {layer_stride})")
    centres = list(range(0, n, layer_stride))
    probe = restored_probs(adapter, fact, [], noise_scale, 1, seed, batch_size)  # token positions only
    first, last = probe["subject_span"]
    T = len(probe["tokens"])
    groups = {g: p for g, p in group_positions(first, last, T).items() if p}
    sets, index = [], []
    for kind in kinds:
        w = int((windows or {}).get(kind) or default_window(kind, n))
        for g, pos in groups.items():
            for i, layer in enumerate(centres):
                sets.append([(kind, L, t) for L in window_layers(layer, w, n) for t in pos])
                index.append((kind, g, i))
    res = restored_probs(adapter, fact, sets, noise_scale, samples, seed, batch_size)
    ie: dict[str, dict[str, list[float]]] = {k: {g: [0.0] * len(centres) for g in groups} for k in kinds}
    for (kind, g, i), p in zip(index, res["probs"]):
        ie[kind][g][i] = p - res["p_corrupt"]
    return {"prompt": fact.prompt, "subject": fact.subject, "target": fact.target, "p_clean": res["p_clean"],
            "p_corrupt": res["p_corrupt"], "tokens": res["tokens"], "subject_span": [first, last],
            "windows": {k: int((windows or {}).get(k) or default_window(k, n)) for k in kinds}, "layers": centres,
            "samples": samples, "noise_scale": noise_scale, "ie": ie}


def run_locate(adapter, facts: Sequence[Any], out_path: str | Path, **kwargs) -> list[dict]:
    """:func:`locate_fact` for each fact, appended to ``out_path`` (JSONL); facts already there are skipped."""
    from ..utils.io import append_jsonl, read_jsonl
    from ..utils.progress import progress

    out_path = Path(out_path)
    done = read_jsonl(out_path) if out_path.exists() else []
    seen = {(r["prompt"], r["subject"]) for r in done}
    for fact in progress(facts, desc="locate", total=len(facts)):
        f = as_fact(fact)
        if (f.prompt, f.subject) in seen:
            continue
        rec = locate_fact(adapter, f, **kwargs)
        append_jsonl(out_path, rec)
        done.append(rec)
        seen.add((f.prompt, f.subject))
    return done


def _bootstrap_ci(x: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """95% percentile bootstrap interval of the mean over dim 0 of ``x`` (facts, layers)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.shape[0], (n_boot, x.shape[0]), generator=g)
    means = x[idx].mean(1)  # (n_boot, layers)
    return means.quantile(0.025, dim=0), means.quantile(0.975, dim=0)


def summarise_locate(records: Sequence[dict], min_p_clean: float = 0.0) -> dict:
    """Average indirect effect per (kind, group, layer) with its 95% bootstrap interval over facts.

    Facts with ``p_clean < min_p_clean`` are left out (their count is reported)."""
    recs = [r for r in records if r["p_clean"] >= min_p_clean]
    out: dict[str, Any] = {"n_facts": len(recs), "n_dropped_low_p_clean": len(records) - len(recs),
                           "mean_p_clean": sum(r["p_clean"] for r in recs) / max(1, len(recs)),
                           "mean_p_corrupt": sum(r["p_corrupt"] for r in recs) / max(1, len(recs)),
                           "windows": recs[0]["windows"] if recs else {},
                           "layers": recs[0].get("layers") if recs else [], "aie": {}}
    if not recs:
        return out
    if out["mean_p_corrupt"] > 0.5 * out["mean_p_clean"]:
        out["warning"] = (f"the noise barely corrupts the facts (mean p_corrupt {out['mean_p_corrupt']:.3f} against "
                          f"p_clean {out['mean_p_clean']:.3f}): restorations have little to restore; raise the noise")
        log.warning("locate: %s", out["warning"])
    for kind in recs[0]["ie"]:
        out["aie"][kind] = {}
        for g in GROUPS:
            rows = [r["ie"][kind][g] for r in recs if g in r["ie"][kind]]
            if not rows:
                continue
            x = torch.tensor(rows, dtype=torch.float64)
            lo, hi = _bootstrap_ci(x)
            mean = x.mean(0)
            layers = out["layers"] or list(range(len(rows[0])))
            out["aie"][kind][g] = {"n": len(rows), "mean": mean.tolist(), "ci_low": lo.tolist(), "ci_high": hi.tolist(),
                                   "peak_layer": int(layers[int(mean.argmax())])}
    return out


def plot_locate(summary: dict, path: str | Path, title: str = "") -> Path:
    """One panel per kind: AIE per layer for each group, with its bootstrap band (reads a summary only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kinds = list(summary["aie"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.6), sharey=True, squeeze=False)
    colors = {"last subject token": "tab:red", "other subject tokens": "tab:orange", "last token": "tab:blue"}
    for ax, kind in zip(axes[0], kinds):
        for g, s in summary["aie"][kind].items():
            xs = summary.get("layers") or list(range(len(s["mean"])))
            ax.plot(xs, s["mean"], color=colors.get(g), label=f"{g} (n={s['n']})")
            ax.fill_between(xs, s["ci_low"], s["ci_high"], color=colors.get(g), alpha=0.2, linewidth=0)
        ax.set_title(f"{kind.upper()} restored (window {summary.get('windows', {}).get(kind, '?')})")
        ax.set_xlabel("layer (window centre)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average indirect effect on P(true object)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8)
    fig.suptitle(title or f"Causal trace averaged over {summary['n_facts']} facts (shaded: 95% bootstrap CI)",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def save_summary(summary: dict, path: str | Path) -> None:
    from ..utils.io import write_json_atomic

    write_json_atomic(path, summary)


def load_records(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
