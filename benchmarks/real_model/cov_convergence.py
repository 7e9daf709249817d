"""How fast C = E[k kᵀ] converges with the token count on SmolLM2, and whether the corpus matters.

For each token budget N (prefixes of one corpus, in corpus order) and each layer: the relative change
‖C_N − C_ref‖_F / ‖C_ref‖_F against the largest budget, and for real edit keys k* (tuning split) the
relative change of u = C⁻¹k* (ROME's update direction) and its cosine to u_ref. A second corpus
(real English prose: the long descriptions of the installed Python packages, offline everywhere)
gives the same quantities against the model-sampled reference.

With ``--probe-requests`` (facts no edit touches) it also measures what C changes in an edit's effect
on other facts: the interference p(i, j) = k*_iᵀC⁻¹k_j / k*_iᵀC⁻¹k*_i between each edit key i and each
probe fact's key j (a rank-one edit moves fact j's value by p(i, j)·δ_i; its own key's by exactly δ_i
whatever C is). Per budget: ‖P_N − P_ref‖_F / ‖P_ref‖_F and mean |p|. ``--corpus`` replaces the
default model-sampled corpus (e.g. a larger one written by ``sample_corpus.py``).

    .venv/bin/python benchmarks/real_model/cov_convergence.py --layers 4 --out runs/real/cov-convergence
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
from pathlib import Path

import torch

from superedit.data import load_requests
from superedit.editing.contexts import context_prefixes
from superedit.editing.keys import compute_keys
from superedit.editing.solve import spd_solve
from superedit.models import load_model
from superedit.stats import Corpus, collect_covariances
from superedit.stats.sampled import sampled_corpus


def package_docs_corpus() -> Corpus:
    """Long descriptions (READMEs) of the installed distributions, split into paragraphs of ≥ 200 chars."""
    texts = []
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        texts += [p.strip() for p in body.split("\n\n") if len(p.strip()) >= 200 and not p.strip().startswith(("```", "    "))]
    return Corpus.from_texts(texts, source="installed-package-descriptions")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--layers", default="4")
    ap.add_argument("--budgets", default="1000,2000,5000,10000,20000,40000,60000")
    ap.add_argument("--requests", default="runs/known-smollm2/tune.json")
    ap.add_argument("--n-keys", type=int, default=24)
    ap.add_argument("--ridge", type=float, default=0.0)
    ap.add_argument("--corpus", default=None, help="JSONL of model-sampled text (field 'text'); default: the cached one")
    ap.add_argument("--probe-requests", default=None, help="facts no edit touches: interference p against their keys")
    ap.add_argument("--n-probe", type=int, default=200)
    ap.add_argument("--skip-package-docs", action="store_true")
    ap.add_argument("--out", default="runs/real/cov-convergence")
    ap.add_argument("--plot-only", action="store_true", help="Redraw the figure from OUT/convergence.json.")
    args = ap.parse_args()
    if args.plot_only:
        plot(Path(args.out) / "convergence.json", Path(args.out) / "convergence.png")
        return
    logging.basicConfig(level=logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a = load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    reqs = load_requests(args.requests)[: args.n_keys]
    prefixes = context_prefixes(a, [10], 5, 0)
    keys = compute_keys(a, [r.prompt for r in reqs], [r.subject for r in reqs], layers, prefixes)
    probe_keys = None
    if args.probe_requests:
        from superedit.editing.keys import keys_at

        pr = load_requests(args.probe_requests)[: args.n_probe]
        probe_keys = keys_at(a, [r.prompt for r in pr], [r.subject for r in pr], layers)
    sampled = Corpus.from_path(args.corpus) if args.corpus else sampled_corpus(a)
    corpora = {"model-sampled": sampled}
    if not args.skip_package_docs:
        corpora["package-docs"] = package_docs_corpus()
    mats: dict[str, dict[int, dict[int, torch.Tensor]]] = {}
    counts = {}
    for name, corpus in corpora.items():
        mats[name] = {}
        for n in budgets if name == "model-sampled" else budgets[-1:]:
            covs = collect_covariances(a, layers, corpus, n_tokens=n, max_length=128)
            mats[name][n] = {l: covs[l].matrix(dtype=torch.float64) for l in layers}
            counts[(name, n)] = covs[layers[0]].count
    ref_n = budgets[-1]
    rows = []
    for l in layers:
        C_ref = mats["model-sampled"][ref_n][l]
        K = keys[l].double()  # (n_keys, d_mlp)
        ridge = args.ridge * C_ref.diagonal().mean()
        eye = torch.eye(C_ref.shape[0], dtype=torch.float64)
        U_ref = spd_solve(C_ref + ridge * eye, K.T)  # (d_mlp, n_keys)
        for name in corpora:
            for n, per_layer in mats[name].items():
                C = per_layer[l]
                U = spd_solve(C + ridge * eye, K.T)
                rel_c = float((C - C_ref).norm() / C_ref.norm())
                rel_u = ((U - U_ref).norm(dim=0) / U_ref.norm(dim=0))
                cos_u = torch.nn.functional.cosine_similarity(U, U_ref, dim=0)
                rows.append({"layer": l, "corpus": name, "n_tokens": n, "tokens_used": counts[(name, n)],
                             "rel_change_C": rel_c, "rel_change_u_median": float(rel_u.median()),
                             "rel_change_u_max": float(rel_u.max()), "cos_u_median": float(cos_u.median()),
                             "cos_u_min": float(cos_u.min())})
                if probe_keys is not None:
                    Kp = probe_keys[l].double()  # (n_probe, d_mlp)
                    P = (Kp @ U) / (K * U.T).sum(1)  # (n_probe, n_keys): p(i, j) = k_jᵀC⁻¹k_i / k_iᵀC⁻¹k_i
                    P_ref = (Kp @ U_ref) / (K * U_ref.T).sum(1)
                    rows[-1].update({"rel_change_p": float((P - P_ref).norm() / P_ref.norm()),
                                     "mean_abs_p": float(P.abs().mean()), "mean_abs_p_ref": float(P_ref.abs().mean())})
                print(json.dumps(rows[-1]))
    (out / "convergence.json").write_text(json.dumps({"model": args.model, "reference_tokens": ref_n,
                                                     "ridge": args.ridge, "n_keys": len(reqs),
                                                     "corpus": args.corpus or "default model-sampled",
                                                     "probe_requests": args.probe_requests, "rows": rows}, indent=2))
    plot(out / "convergence.json", out / "convergence.png")


def plot(json_path: Path, png_path: Path) -> None:
    """The convergence figure, drawn from the saved convergence.json only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(json_path).read_text())
    rows, ref_n = data["rows"], data["reference_tokens"]
    layers = sorted({r["layer"] for r in rows})
    with_p = any("rel_change_p" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if with_p else 2, figsize=(15 if with_p else 10.5, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c, l in zip(colors, layers):
        r = [x for x in rows if x["layer"] == l and x["corpus"] == "model-sampled" and x["n_tokens"] < ref_n]
        pd = [x for x in rows if x["layer"] == l and x["corpus"] == "package-docs"]
        axes[0].plot([x["tokens_used"] for x in r], [x["rel_change_C"] for x in r], marker="o", color=c,
                     label=f"layer {l}")
        ok = [x for x in r if x["tokens_used"] >= 2000]  # N below d_mlp = 1536: C is singular, u meaningless
        axes[1].plot([x["tokens_used"] for x in ok], [x["rel_change_u_median"] for x in ok], marker="o", color=c,
                     label=f"layer {l}, median key")
        axes[1].plot([x["tokens_used"] for x in ok], [x["rel_change_u_max"] for x in ok], marker="x", color=c,
                     linestyle=":", label=f"layer {l}, worst key")
        if with_p:
            axes[2].plot([x["tokens_used"] for x in ok], [x["rel_change_p"] for x in ok], marker="o", color=c,
                         label=f"layer {l}")
        for x in pd:
            axes[1].scatter([x["tokens_used"]], [x["rel_change_u_median"]], marker="s", color=c, s=36,
                            edgecolor="k", zorder=3, label=f"layer {l}: package-docs text, median key")
    axes[0].set_title("‖C_N − C_ref‖ / ‖C_ref‖", fontsize=10)
    axes[1].set_title("‖u_N − u_ref‖ / ‖u_ref‖,  u = C⁻¹k*  (N ≥ 2,000)", fontsize=10)
    if with_p:
        axes[2].set_title("‖P_N − P_ref‖ / ‖P_ref‖,  p(i, j) = k_jᵀC⁻¹k*_i / k*_iᵀC⁻¹k*_i", fontsize=10)
        axes[2].legend(frameon=False, fontsize=8)
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ticks = sorted({x["tokens_used"] for x in rows})
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("corpus tokens N (model-sampled text)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(frameon=False, fontsize=8)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=7.5)
    ridge = data.get("ridge", 0.0)
    fig.suptitle(f"{data['model']}: key covariance against {ref_n:,} model-sampled tokens "
                 f"(ridge {ridge:g}·mean diag; {data['n_keys']} edit keys of the tuning split)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110, bbox_inches="tight")
    plt.close(fig)

if __name__ == "__main__":
    main()
