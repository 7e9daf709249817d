"""Interference forecast vs reality over many ROME edits (Knowledge-in-Superposition, issue 5 item 5).

For each of N testbed edit requests: forecast the interference on P protected facts at each candidate
layer, perform the real ROME edit at the recommended ("auto") layer and at the profile's default layer,
and record the Spearman correlation between predicted and measured change (value shift ‖ΔW k_j‖ and
Δ log p(true answer)) plus the collateral damage mean |Δ log p(true)| at both layers.

    python benchmarks/forecast_study.py --n 50 --protected 30 --layers 0,1,2 --json runs/forecast_study.json
"""

from __future__ import annotations

import argparse
import json
import statistics as st

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--n", type=int, default=50, help="edits (requests) studied")
    ap.add_argument("--protected", type=int, default=30, help="protected facts per edit")
    ap.add_argument("--layers", default="0,1,2", help="candidate layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the per-edit rows and the summary here")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from superedit.analysis.forecast import check_forecast, forecast_interference
    from superedit.commands.common import load_with_profile, resolve_requests
    from superedit.editing.covariance import CorpusCovariance
    from superedit.data import sample_requests
    from superedit.utils.io import write_json_atomic
    from superedit.utils.progress import progress

    adapter, mdir, hp = load_with_profile(args.model, "rome")
    layers = [int(x) for x in args.layers.split(",")]
    reqs = resolve_requests(mdir, None, n=args.n + args.protected + 200, seed=args.seed)
    cov = CorpusCovariance(adapter, None, n_tokens=hp.mom2_n_tokens, layers=sorted(set(layers) | set(hp.layers)))
    default_layer = hp.layers[0]
    rows = []
    for i in progress(range(args.n), desc="forecast study"):
        req = reqs[i]
        others = [r for j, r in enumerate(reqs) if j != i and r.subject != req.subject]
        prot = sample_requests(others, args.protected, args.seed + i)
        fc = forecast_interference(adapter, req, prot, cov, layers, hp)
        row = {"case_id": req.case_id, "auto_layer": fc.recommended_layer, "default_layer": default_layer}
        for name, layer in (("auto", fc.recommended_layer), ("default", default_layer)):
            chk = check_forecast(adapter, req, prot, cov, layer, hp.replace(layers=[layer]), forecast=fc)
            dl = [abs(x) for x in chk["delta_logp_true"] if x is not None]
            row[name] = {"spearman_value": chk["spearman_value"], "spearman_logp": chk["spearman_logp"],
                         "collateral": st.mean(dl) if dl else None, "edit_delta_logp_new": chk["edit_delta_logp_new"]}
        rows.append(row)

    def mean(name, key):
        xs = [r[name][key] for r in rows if r[name][key] is not None]
        return st.mean(xs) if xs else None

    summary = {"n_edits": len(rows), "protected": args.protected, "candidate_layers": layers,
               "default_layer": default_layer,
               "auto_layer_counts": {str(l): sum(r["auto_layer"] == l for r in rows) for l in layers},
               **{f"{n}_{k}": mean(n, k) for n in ("auto", "default")
                  for k in ("spearman_value", "spearman_logp", "collateral", "edit_delta_logp_new")}}
    print(json.dumps(summary, indent=1))
    if args.json:
        write_json_atomic(args.json, {"summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
