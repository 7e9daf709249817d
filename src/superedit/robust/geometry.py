"""Key geometry behind non-robust edits (``superedit keys``).

A rank-one edit made on key k* moves the value of another key k by ``kᵀC⁻¹k* / k*ᵀC⁻¹k*`` of the
edit. So an edit transfers to a variant of its subject only when the variant's key is close to k*
in the whitening space C^-1/2. This module measures:

* **similarity distributions** — the whitening similarity ``s(kᵢ,kⱼ) = kᵢᵀC⁻¹kⱼ`` and its normalised
  form ``s / √(sᵢᵢ sⱼⱼ)`` (whitening cosine) between a subject's key and the keys of its own variants
  (rephrases, shuffles, long contexts) vs between keys of random pairs of different subjects; plus a
  2-D PCA (of whitened keys) of one subject's variants;
* **similar but unrelated keys** — scanning a corpus' tokens at the layer, the top-k positions closest
  to each subject key in whitening space (cosine) whose prefix does not contain the subject, with their
  text: the keys an edit leaks into;
* **value norms before vs after an edit** — ‖W k‖ and ‖(W + ΔW) k‖ for the subject key and its variants
  (single ROME edits at the layer, reverted after each).

C is factorised once (Cholesky, :class:`superedit.stats.whitening.Whitener`); never inverted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..utils.logs import get_logger
from ..utils.progress import progress
from .perturb import PerturbationSet

log = get_logger(__name__)


def variant_keys(adapter, request, pset: PerturbationSet, layer: int, fact_token: str = "subject_last") -> dict:
    """Keys of the original prompt and of every variant at ``layer``: {"orig", "variants", "kinds", "labels"}."""
    from ..editing.keys import keys_at

    templates = [request.prompt] + [p.template for p in pset.items]
    subjects = [request.subject] + [p.subject for p in pset.items]
    K = keys_at(adapter, templates, subjects, [layer], fact_token)[layer].to(torch.float64).cpu()
    return {"orig": K[0], "variants": K[1:], "kinds": [p.kind for p in pset.items],
            "splits": [p.split for p in pset.items], "labels": [p.subject if p.kind != "long" else "long context"
                                                                for p in pset.items]}


def similarity_distributions(key_sets: Sequence[dict], whitener, n_random: int = 2000, seed: int = 0) -> dict:
    """Whitening similarities and cosines: same subject (orig vs variants, per kind) vs random subject pairs."""
    same: dict[str, dict[str, list[float]]] = {}
    for ks in key_sets:
        if not len(ks["variants"]):
            continue
        y0 = whitener.whiten(ks["orig"])
        Y = whitener.whiten(ks["variants"])
        s = (Y @ y0).cpu()
        cos = s / (Y.norm(dim=1).cpu() * y0.norm().cpu()).clamp_min(1e-30)
        for kind, si, ci in zip(ks["kinds"], s.tolist(), cos.tolist()):
            d = same.setdefault(kind, {"whiten": [], "cos": []})
            d["whiten"].append(si)
            d["cos"].append(ci)
    origs = torch.stack([ks["orig"] for ks in key_sets]) if key_sets else torch.zeros(0, 1)
    rnd = {"whiten": [], "cos": []}
    if len(origs) >= 2:
        Y = whitener.whiten(origs)
        G = (Y @ Y.T).cpu()
        norms = Y.norm(dim=1).cpu()
        pairs = [(i, j) for i in range(len(origs)) for j in range(i + 1, len(origs))]
        random.Random(seed).shuffle(pairs)
        for i, j in pairs[:n_random]:
            rnd["whiten"].append(float(G[i, j]))
            rnd["cos"].append(float(G[i, j] / (norms[i] * norms[j]).clamp_min(1e-30)))
    return {"same": same, "random": rnd}


def pca_2d(X: torch.Tensor) -> np.ndarray:
    """First two principal coordinates of the rows of X."""
    X = X.to(torch.float64)
    Xc = X - X.mean(0, keepdim=True)
    if Xc.shape[0] < 2:
        return np.zeros((Xc.shape[0], 2))
    U, S, _ = torch.linalg.svd(Xc, full_matrices=False)
    out = (U[:, :2] * S[:2]).numpy()
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


@torch.no_grad()
def similar_unrelated_keys(adapter, corpus_texts: Sequence[str], layer: int, whitener, subjects: Sequence[str],
                           subject_keys: torch.Tensor, top: int = 10, n_docs: int = 200, max_length: int = 128,
                           batch_size: int = 16, context_chars: int = 80) -> list[list[dict]]:
    """Per subject, the ``top`` corpus positions closest in whitening cosine whose prefix lacks the subject."""
    from .corpus_keys import iter_text_keys

    S = whitener.whiten(subject_keys)
    Sn = S / S.norm(dim=1, keepdim=True).clamp_min(1e-30)
    best: list[list[tuple]] = [[] for _ in subjects]
    docs = list(corpus_texts)[:n_docs]
    for tk in iter_text_keys(adapter, docs, layer, batch_size, max_length, progress_desc="scan corpus"):
        if not tk.token_index:
            continue
        Y = whitener.whiten(tk.keys)
        Yn = Y / Y.norm(dim=1, keepdim=True).clamp_min(1e-30)
        cos = (Yn @ Sn.T).cpu()  # (n_pos, n_subjects)
        raw = (Y @ S.T).cpu()
        for j, subj in enumerate(subjects):
            n_free = tk.prefix_free_count([subj])  # positions whose prefix lacks the subject
            for t in torch.argsort(cos[:n_free, j], descending=True)[:top].tolist():
                start, end = tk.spans[t]
                best[j].append((float(cos[t, j]), float(raw[t, j]), tk.index, tk.token_index[t],
                                tk.text[start:end], tk.text[:end][-context_chars:]))
            best[j] = sorted(best[j], key=lambda x: -x[0])[:top]
    return [[{"whitening_cos": c, "whitening_sim": w, "doc": d, "token_index": p, "token": t, "context": ctx}
             for c, w, d, p, t, ctx in b] for b in best]


def value_norms(adapter, requests: Sequence, key_sets: Sequence[dict], layer: int, hp, stats) -> list[dict]:
    """‖W k‖ vs ‖(W + ΔW) k‖ for each subject key and its variants (single ROME edit per request, reverted)."""
    from ..editing.methods import get_method

    rome = get_method("rome")
    hp = hp.replace(layers=[layer])
    out = []
    for req, ks in progress(list(zip(requests, key_sets)), total=len(requests), desc="value norms"):
        K = torch.cat([ks["orig"][None], ks["variants"]]).to(adapter.device, adapter.dtype)
        before = (adapter.down_weight(layer) @ K.T).T.norm(dim=1).cpu()
        try:
            delta = rome.fn(adapter, [req], hp, stats).delta
        except (ValueError, torch.linalg.LinAlgError) as exc:
            out.append({"case_id": req.case_id, "error": str(exc)})
            continue
        with delta.applied(adapter):
            after = (adapter.down_weight(layer) @ K.T).T.norm(dim=1).cpu()
        out.append({"case_id": req.case_id, "subject": req.subject, "kinds": ["orig"] + list(ks["kinds"]),
                    "before": before.tolist(), "after": after.tolist()})
    return out


@dataclass
class GeometryResult:
    """What :func:`run_geometry` measured. ``save(dir)`` writes ``geometry.json`` (everything but the hits)
    and ``similar_keys.jsonl`` (one record per similar-but-unrelated corpus position);
    :mod:`superedit.report.keys_report` renders those files."""

    geometry: dict
    similar: list[dict]

    def save(self, out_dir) -> list:
        from pathlib import Path

        from ..utils.io import write_json_atomic, write_jsonl_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "geometry.json", self.geometry)
        write_jsonl_atomic(out / "similar_keys.jsonl", self.similar)
        return [out / "geometry.json", out / "similar_keys.jsonl"]

    def summary(self) -> dict:
        """The scalar part (what the command prints): no distributions, PCA coordinates or per-key norms."""
        return {k: v for k, v in self.geometry.items() if k not in ("distributions", "pca", "value_norms")}


def run_geometry(adapter, requests: Sequence, psets: Sequence[PerturbationSet], layer: int, stats,
                 corpus_texts: Sequence[str] = (), ridge: float = 0.0, top: int = 10, n_docs: int = 200,
                 edit_hp=None, seed: int = 0, fact_token: str = "subject_last") -> GeometryResult:
    """All analyses at ``layer``; returns a :class:`GeometryResult` (nothing is written or drawn here)."""
    from ..stats.whitening import Whitener

    whitener = Whitener(stats.mom2(layer), ridge=ridge, layer=layer)
    key_sets = [variant_keys(adapter, r, p, layer, fact_token) for r, p in
                progress(list(zip(requests, psets)), total=len(requests), desc="variant keys")]
    dist = similarity_distributions(key_sets, whitener, seed=seed)
    # PCA picture: the subject with the most variants
    pick = max(range(len(key_sets)), key=lambda i: len(key_sets[i]["variants"])) if key_sets else None
    pca = None
    if pick is not None:
        ks = key_sets[pick]
        X = whitener.whiten(torch.cat([ks["orig"][None], ks["variants"]])).cpu()
        coords = pca_2d(X)
        pca = {"subject": requests[pick].subject, "kinds": ["orig"] + ks["kinds"],
               "labels": [requests[pick].subject] + ks["labels"], "coords": coords.tolist()}
    similar = []
    if corpus_texts:
        subj_keys = torch.stack([ks["orig"] for ks in key_sets])
        found = similar_unrelated_keys(adapter, corpus_texts, layer, whitener, [r.subject for r in requests], subj_keys,
                                       top=top, n_docs=n_docs)
        similar = [{"case_id": r.case_id, "subject": r.subject, "rank": k + 1, **hit}
                   for r, hits in zip(requests, found) for k, hit in enumerate(hits)]
    norms = value_norms(adapter, requests, key_sets, layer, edit_hp, stats) if edit_hp is not None else []

    def summ(xs):
        a = np.asarray(xs, dtype=float)
        return {"n": int(a.size), "mean": float(a.mean()) if a.size else None,
                "median": float(np.median(a)) if a.size else None}

    geometry = {"layer": layer, "n_requests": len(requests), "ridge": ridge,
                "condition_number": whitener.condition_number,
                "same_subject": {k: {m: summ(v[m]) for m in ("whiten", "cos")} for k, v in dist["same"].items()},
                "random_pairs": {m: summ(dist["random"][m]) for m in ("whiten", "cos")},
                "distributions": dist, "pca": pca, "value_norms": norms,
                "similar_keys_mean_cos": summ([s["whitening_cos"] for s in similar])}
    return GeometryResult(geometry, similar)
