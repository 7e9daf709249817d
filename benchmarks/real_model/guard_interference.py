"""Interference under AlphaEdit's projector between a stream's edits and untouched subjects: why guard.

For the rank-one form of an update in the update space P (AlphaEdit: Δ = R K₁ᵀ P (…)⁻¹), edit i
shifts an untouched key k_j's value by p_P(i, j) · δ_i with p_P = k_iᵀ P k_j / k_iᵀ P k_i (the
interference identity with C⁻¹ replaced by P). For every edited layer this prints, between the first
``--n-edits`` requests of the stream and the retention probe's subjects:

* mean |p_P| (what each edit does to each untouched subject), and |E_i p_P(i, j)| averaged over j
  (the part shared by all edits, which adds up linearly over a stream);
* the share of an edit key's energy P keeps (k_iᵀ P k_i / ‖k_i‖²), and P's rank;

for ROME/MEMIT's C⁻¹ (with the profile's ridge), AlphaEdit's null space (the profile's threshold), null
spaces by energy, and guard's (the null space less the top-m directions of the guard requests'
subject-key second moment, m in ``--directions``). Keys are ROME's k* on the unedited model, with the
method profile's context prefixes.

    python benchmarks/real_model/guard_interference.py --guard runs/stream-derived/tune.json \\
        --stream runs/stream-derived/known-margin/known.json --probe runs/stream-derived/known-top1/known.json \\
        --json runs/real/guard-interference.json
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--guard", required=True, help="guard requests (never evaluated: a tuning split)")
    ap.add_argument("--stream", required=True, help="the edit stream")
    ap.add_argument("--probe", required=True, help="the retention probe's facts")
    ap.add_argument("--n-edits", type=int, default=300)
    ap.add_argument("--directions", default="0,1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from superedit.commands.common import load_with_profile, make_stats, resolve_requests
    from superedit.editing.contexts import context_prefixes
    from superedit.editing.keys import compute_keys
    from superedit.editing.methods.alphaedit import nullspace_basis
    from superedit.editing.methods.guard import shared_directions, without_directions
    from superedit.editing.solve import with_ridge

    F64 = torch.float64
    adapter, mdir, hp = load_with_profile(args.model, "alphaedit")
    stats = make_stats(adapter, hp)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)

    def keys(path, n=None):
        reqs = resolve_requests(mdir, path)[:n]
        return compute_keys(adapter, [r.prompt for r in reqs], [r.subject for r in reqs], hp.layers, prefixes,
                            hp.fact_token), len(reqs)

    (Kg, n_guard), (Ks, n_edits), (Kp, n_probe) = keys(args.guard), keys(args.stream, args.n_edits), keys(args.probe)

    def interference(Ki, Kj, apply):
        """(mean |p|, mean_j |E_i p(i, j)|, mean kept energy) with p = k_iᵀ A k_j / k_iᵀ A k_i, A = apply."""
        Ai = apply(Ki.T).T  # (n_i, d): A k_i
        den = (Ai * Ki).sum(1, keepdim=True)
        p = (Ai @ Kj.T) / den
        return {"mean_abs_p": float(p.abs().mean()), "shared_p": float(p.mean(0).abs().mean()),
                "energy_kept": float(den.mean() / Ki.pow(2).sum(1).mean())}

    rows = []
    for l in hp.layers:
        C = with_ridge(stats.mom2(l).to(F64), hp.mom2_ridge)
        Ki, Kj, G = Ks[l].to(F64), Kp[l].to(F64), Kg[l].to(F64)
        Cinv = torch.linalg.inv(C)  # C carries the profile's ridge (mom2_ridge), as the methods solve with it
        rows.append({"layer": l, "space": "C⁻¹ (ROME/MEMIT)", "rank": C.shape[0], **interference(Ki, Kj, lambda X: Cinv @ X)})
        P = nullspace_basis(C, hp.nullspace_threshold, hp.nullspace_relative)
        evals = torch.linalg.eigvalsh(0.5 * (C + C.T))
        for share in (1e-2, 1e-3):
            k = int((torch.cumsum(evals, 0) <= share * evals.sum()).sum())
            if k:
                E = nullspace_basis(C, float(evals[k - 1]) * (1 + 1e-12), False)
                rows.append({"layer": l, "space": f"null space by energy {share:g}", "rank": E.rank,
                             **interference(Ki, Kj, E.apply)})
        for m in [int(x) for x in args.directions.split(",")]:
            Pg = without_directions(P, shared_directions(G, m))
            name = "AlphaEdit null space" if m == 0 else f"guard, m = {m}"
            rows.append({"layer": l, "space": name, "rank": Pg.rank, **interference(Ki, Kj, Pg.apply)})
    print(f"{args.model}: {n_edits} stream edits × {n_probe} probe subjects; guard: {n_guard} requests")
    print(f"{'layer':>5}  {'update space':28s} {'rank':>5}  {'mean|p|':>8}  {'|E_i p|':>8}  {'energy kept':>11}")
    for r in rows:
        print(f"{r['layer']:>5}  {r['space']:28s} {r['rank']:>5}  {r['mean_abs_p']:8.4f}  {r['shared_p']:8.4f}  "
              f"{r['energy_kept']:11.4f}")
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"model": args.model, "guard": args.guard, "stream": args.stream,
                                      "probe": args.probe, "n_edits": n_edits, "n_probe": n_probe,
                                      "n_guard": n_guard, "rows": rows})


if __name__ == "__main__":
    main()
