"""Can the key after a subject token tell "the name goes on" from "the name ended"? (tuning side only)

Fits :mod:`superedit.editing.boundary`'s test on the prompts of a TUNING request file with 30% of its
relations (or requests) held out, at the gated profile's layer and whitening, and reports per threshold and L2 weight
the held-out share of subject ends wrongly read as "continues" (where an entry would then not fire on
its own subject) and of in-name tokens caught (where an entry of a shorter name would be stopped).

    python benchmarks/real_model/name_boundary.py --requests runs/stream-derived/tune.json --threads 2 \\
        --json runs/real/name-boundary.json
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--requests", required=True, help="a TUNING file (never the evaluation stream)")
    ap.add_argument("--l2", default="1e-3,1e-2,1e-1")
    ap.add_argument("--thresholds", default="0.5,0.7,0.9,0.95,0.99")
    ap.add_argument("--seeds", default="0,1,2", help="hold-out draws (the report averages over them)")
    ap.add_argument("--negatives", default="after", choices=("after", "text"),
                    help="training 0s: the token after the subject only, or every later token of the prompt too")
    ap.add_argument("--hold-out", default="subject", choices=("subject", "request", "relation"),
                    help="hold out whole subjects (requests that share a subject share its in-name keys), requests, "
                         "or whole relations (an evaluation stream has relations the tuning file lacks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("name_boundary")
    from superedit.commands.common import load_with_profile, make_stats, resolve_requests
    from superedit.editing.boundary import boundary_examples, boundary_split_report
    from superedit.editing.methods.gated import whitening_factor

    adapter, mdir, hp = load_with_profile(args.model, "gated")
    layer = hp.layers[0]
    stats = make_stats(adapter, hp)
    whiten = whitening_factor(stats.mom2(layer), hp.mom2_ridge, layer)
    reqs = resolve_requests(mdir, args.requests)
    z, y, group = boundary_examples(adapter, reqs, layer, whiten, args.negatives)
    zm, ym, gm = boundary_examples(adapter, reqs, layer, whiten, "after")  # measured: the token after the subject
    if args.hold_out != "request":
        name = (lambda q: str(q.relation_id)) if args.hold_out == "relation" else (lambda q: q.subject)
        ids = {v: i for i, v in enumerate(sorted({name(q) for q in reqs}))}
        of = torch.tensor([ids[name(q)] for q in reqs])
        group, gm = of[group], of[gm]
    log.info("%d requests (%d groups): %d training examples (%d in-name, %d others), measured on %d name ends",
             len(reqs), len(torch.unique(group)), len(y), int(y.sum()), int((y == 0).sum()), int((ym == 0).sum()))
    rows = []
    thresholds = [float(x) for x in args.thresholds.split(",")]
    for l2 in [float(x) for x in args.l2.split(",")]:
        per_seed = [boundary_split_report(z, y, group, l2, thresholds, seed=int(s), measured=(zm, ym, gm))
                    for s in args.seeds.split(",")]
        for i, p in enumerate(thresholds):
            rs = [ps[i] for ps in per_seed]
            row = {"l2": l2, "threshold": p,
                   "ended_suppressed": sum(r["ended_suppressed"] for r in rs) / len(rs),
                   "continues_caught": sum(r["continues_caught"] for r in rs) / len(rs),
                   # held-out examples per draw (draws overlap, so their sum would count examples twice)
                   "n_ended": sum(r["n_ended"] for r in rs) / len(rs),
                   "n_continues": sum(r["n_continues"] for r in rs) / len(rs),
                   "seeds": len(rs)}
            rows.append(row)
            log.info("l2 %g p %.2f: name ends read as 'continues' %.4f (n %.0f per draw) | in-name caught %.3f "
                     "(n %.0f per draw)",
                     l2, p, row["ended_suppressed"], row["n_ended"], row["continues_caught"], row["n_continues"])
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"model": args.model, "requests": args.requests, "layer": layer,
                                      "negatives": args.negatives, "hold_out": args.hold_out,
                                      "n_examples": len(y), "rows": rows})


if __name__ == "__main__":
    main()
