"""AlphaEdit's null-space threshold and α on one batch of tuning requests, with z computed once.

For one batch the targets z (MEMIT's value optimisation, the costly part) do not depend on AlphaEdit's
threshold or α, nor on MEMIT's λ: they are optimised once on the unedited model, saved, and every
configuration only solves and scores (``spread_update(..., targets=...)``). Each configuration's edit is
applied, every request scored against its unedited scores (the ``superedit edit`` records), and reverted.
A MEMIT row (λ from the MEMIT profile) is solved from the same z as the reference.

    python benchmarks/real_model/alphaedit_sweep.py --model pretrained:gemma3-270m \\
        --requests runs/known-gemma/tune.json --limit 24 \\
        --thresholds abs:1e-2,abs:1e-1,abs:1 --alphas 1,10,100 \\
        --threads 2 --out runs/real/gemma-alphaedit-sweep
    python benchmarks/real_model/alphaedit_sweep.py --model pretrained:gemma3-270m \\
        --requests runs/known-gemma/tune.json --limit 24 --layers 1,2,3,4 --thresholds none \\
        --out runs/real/gemma-memit-l1-4        # MEMIT alone, over four layers

Outputs in --out: ``targets.pt`` (z and value summaries), ``pre.jsonl``, one ``<config>/records.jsonl`` per
configuration (resumable: a configuration whose records are complete is read, not recomputed),
``spectrum.json`` (C's eigenvalues at each edited layer and the null-space dimension of each threshold)
and ``sweep.json`` with the table printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "locality", "rewrite_acc")


def parse_threshold(text: str) -> tuple[float, bool]:
    kind, _, value = text.partition(":")
    if kind not in ("abs", "rel") or not value:
        raise SystemExit(f"--thresholds: {text!r} is not abs:VALUE or rel:VALUE")
    return float(value), kind == "rel"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", default=None, help="a tuning split to choose settings on (an evaluation split only to report settings "
                    "fixed beforehand); default: a testbed's own")
    ap.add_argument("--limit", type=int, default=24, help="first N requests, edited as one batch")
    ap.add_argument("--hparams", default=None, help="YAML overriding the packaged AlphaEdit profile")
    ap.add_argument("--layers", default=None, help="edited layers, e.g. '1,2,3,4' (default: the profile's)")
    ap.add_argument("--thresholds", default="abs:1e-2",
                    help="comma list of abs:VALUE / rel:VALUE; 'none': the MEMIT reference row only")
    ap.add_argument("--alphas", default="10", help="comma list of α (L2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("alphaedit_sweep")
    from superedit.commands.common import build_hparams, hparams_profile, local_model_dir, make_stats, resolve_requests
    from superedit.editing.contexts import context_prefixes
    from superedit.editing.methods.alphaedit import make_alphaedit_state, projected_step
    from superedit.editing.methods.memit import memit_delta
    from superedit.editing.methods.spread import load_targets, memit_targets, save_targets
    from superedit.editing.run import summarize_records
    from superedit.editing.solve import with_ridge
    from superedit.eval.metrics import evaluate_request, public
    from superedit.models import load_model
    from superedit.utils.io import append_jsonl, read_jsonl, write_json_atomic
    from superedit.utils.progress import progress

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(args.model)
    model_dir = local_model_dir(args.model)
    profile = hparams_profile(adapter, model_dir)
    base = build_hparams("alphaedit", profile, args.hparams, adapter.n_layers, args.layers)
    reqs = resolve_requests(model_dir, args.requests, limit=args.limit)
    stats = make_stats(adapter, base)
    thresholds = [] if args.thresholds == "none" else [parse_threshold(t) for t in args.thresholds.split(",")]
    grid = [(t, rel, a) for t, rel in thresholds for a in map(float, args.alphas.split(","))]

    # C's spectrum at each edited layer, and each threshold's null-space dimension
    spectrum = {}
    for layer in base.layers:
        C = with_ridge(stats.mom2(layer).to(torch.float64), base.mom2_ridge)
        evals = torch.linalg.eigvalsh(0.5 * (C + C.T))
        # the null-space rule of editing/methods/alphaedit.py (_eigh_split): eigenvalues below t (× λ_max if rel)
        dims = {f"{'rel' if rel else 'abs'}:{t:g}": int((evals < (t * float(evals.max()) if rel else t)).sum())
                for t, rel, _ in grid}
        spectrum[str(layer)] = {"d_mlp": int(C.shape[0]), "eig_max": float(evals.max()), "eig_min": float(evals.min()),
                                "eig_quantiles": {str(q): float(torch.quantile(evals, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
                                "nullspace_dim": dims}
    write_json_atomic(out / "spectrum.json", spectrum)
    log.info("spectrum: %s", json.dumps(spectrum))

    tpath = out / "targets.pt"
    if tpath.is_file():
        try:
            targets = load_targets(tpath, reqs, base)
        except ValueError as exc:
            raise SystemExit(f"{exc}; use another --out") from None
    else:
        prefixes = context_prefixes(adapter, base.context_lengths, base.n_prefixes, base.seed)
        targets = memit_targets(adapter, reqs, base, prefixes)
        save_targets(tpath, targets, reqs, base)

    ppath = out / "pre.jsonl"  # unedited scores in request order; a stopped run goes on where it stopped
    pres = list(read_jsonl(ppath)) if ppath.is_file() else []
    if len(pres) > len(reqs):
        raise SystemExit(f"{ppath} holds {len(pres)} records for {len(reqs)} requests; use another --out")
    for r in progress(reqs[len(pres):], total=len(reqs) - len(pres), desc="eval (pre)"):
        pres.append(evaluate_request(adapter, r, None))
        append_jsonl(ppath, pres[-1])

    def score(name: str, step) -> dict:
        rpath = out / name / "records.jsonl"
        recs = list(read_jsonl(rpath)) if rpath.is_file() else []
        if len(recs) != len(reqs):
            rpath.unlink(missing_ok=True)
            rpath.parent.mkdir(parents=True, exist_ok=True)
            delta = step().delta
            with delta.applied(adapter):
                recs = []
                for req, pre, val in zip(reqs, pres, targets[1]):
                    post = evaluate_request(adapter, req, pre)
                    recs.append({"case_id": req.case_id, "config": name, "pre": public(pre), "post": public(post),
                                 "values": val, "method_info": {"layers": delta.meta.get("layers")}, "error": None})
                    append_jsonl(rpath, recs[-1])
        s = summarize_records(recs)
        return {"config": name, "n": s["n_edited"], **{k: s["post"].get(k) for k in KEYS},
                "ci": {k: s["post_ci"].get(k) for k in KEYS if k in s["post_ci"]},
                "pre_neighborhood_score": s["pre"].get("neighborhood_score"),
                "layers": recs[0]["method_info"]["layers"]}

    # the reference: MEMIT's solve with its own profile's λ on the same z (AlphaEdit's value settings)
    lam = build_hparams("memit", profile, None, adapter.n_layers, args.layers).mom2_update_weight
    memit_hp = base.model_copy(update={"mom2_update_weight": lam})
    rows = [score(f"memit-lam{lam:g}", lambda: memit_delta(adapter, reqs, memit_hp, stats, targets=targets))]
    for t, rel, a in grid:
        hp = base.model_copy(update={"nullspace_threshold": t, "nullspace_relative": rel, "L2": a})
        name = f"{'rel' if rel else 'abs'}{t:g}-alpha{a:g}"
        state = make_alphaedit_state(adapter, hp, stats)
        rows.append(score(name, lambda: projected_step(adapter, reqs, hp, state, "alphaedit", targets=targets)))
        log.info("%s: %s", name, {k: rows[-1][k] for k in KEYS})
    write_json_atomic(out / "sweep.json", {"model": args.model, "requests": args.requests, "n": len(reqs),
                                           "profile": profile, "hparams": base.to_dict(), "spectrum": spectrum,
                                           "rows": rows})
    print(f"| configuration | null-space dim | n | efficacy | paraphrase | neighbourhood (unedited) | S | locality |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dims = ", ".join(str(l.get("nullspace_dim", "–")) for l in r["layers"] or [])
        f = lambda k: "–" if r.get(k) is None else f"{r[k]:.2f}"
        ci = lambda k: "" if k not in r["ci"] else f" ({r['ci'][k][0]:.2f}–{r['ci'][k][1]:.2f})"
        print(f"| {r['config']} | {dims or '–'} | {r['n']} | {f('efficacy_score')}{ci('efficacy_score')} | "
              f"{f('paraphrase_score')} | {f('neighborhood_score')} ({f('pre_neighborhood_score')}) | {f('score')} | "
              f"{f('locality')}{ci('locality')} |")
    spread = [r for r in rows if any("value_move_norm" in l for l in r["layers"] or [])]
    if spread:  # a family with an MLP-output norm: how far each layer's value moved, and how well it landed
        print("\n| configuration | layer | residual share ‖r‖ | value move ‖Δm‖ | relative error (mean, max) |")
        print("|---|---|---|---|---|")
        for r in spread:
            for l in r["layers"]:
                print(f"| {r['config']} | {l['layer']} | {l['residual_norm']:.2f} | {l.get('value_move_norm', float('nan')):.2f} | "
                      f"{l.get('out_norm_rel_error_mean', float('nan')):.3f}, {l.get('out_norm_rel_error_max', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
