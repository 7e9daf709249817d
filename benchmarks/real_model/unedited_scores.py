"""The UNEDITED model's scores on what a lifelong checkpoint scores: the reference for "neighbourhood
within 0.05 of the unedited model".

A checkpoint after n edits scores the first n requests of the stream (efficacy, paraphrase, and the
neighbourhood prompts whose subject the stream never edits: ``lifelong.runner.unedited_neighbours``)
with ``eval.metrics.batch_evaluate``. This runs exactly that on the base model, for each n asked:

    python benchmarks/real_model/unedited_scores.py --stream runs/real/ll1000-gated/stream.jsonl \\
        --edits 200,1000 --json runs/real/unedited-scores.json
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--stream", required=True,
                    help="a lifelong run's stream.jsonl (its edit order: `superedit lifelong` shuffles --requests)")
    ap.add_argument("--edits", default="1000", help="comma-separated n: score the first n requests")
    ap.add_argument("--max-neighbours", type=int, default=5, help="as `superedit lifelong --max-neighbours`")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--ledger", default=None, help="score with this ledger applied (default: the unedited model)")
    ap.add_argument("--split-neighbours", action="store_true",
                    help="neighbourhood separately for subjects the stream edits on another relation and the rest")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from superedit.commands.common import local_model_dir, resolve_requests
    from superedit.eval.metrics import batch_evaluate, bootstrap_ci
    from superedit.lifelong.runner import unedited_neighbours
    from superedit.models import load_model

    adapter = load_model(args.model)
    stream = resolve_requests(local_model_dir(args.model), args.stream)
    label = "unedited"
    if args.ledger:
        from superedit.lifelong.ledger import Ledger

        led = Ledger.open(args.ledger)
        led.apply_to(adapter)
        label = f"ledger {args.ledger} ({len(led.state) if hasattr(led.state, '__len__') else '?'} entries)"
    rows = []

    def scored(reqs, keys) -> dict:
        res = batch_evaluate(adapter, reqs, args.max_neighbours, True, 64)
        row = {}
        for key, name in keys:
            vals = [r[key] for r in res if r.get(key) is not None]
            row[name] = sum(vals) / len(vals) if vals else None
            row[f"{name}_n"] = len(vals)
            row[f"{name}_ci"] = bootstrap_ci(vals) if vals else None
        return row

    def neighbours_where(reqs, keep) -> list:
        from dataclasses import replace

        out = []
        for r in reqs:
            subj = (r.meta or {}).get("neighborhood_subjects") or []
            idx = [i for i, s in enumerate(subj) if keep(s)] if len(subj) == len(r.neighborhood_prompts) else []
            if idx:
                out.append(replace(r, neighborhood_prompts=[r.neighborhood_prompts[i] for i in idx],
                                   neighborhood_answers=[r.neighborhood_answers[i] for i in idx],
                                   meta={**r.meta, "neighborhood_subjects": [subj[i] for i in idx]}))
        return out

    edited_subjects = {r.subject for r in stream}
    for n in [int(x) for x in args.edits.split(",")]:
        done = unedited_neighbours(stream[:n], stream)
        row = {"n_edits": n, **scored(done, (("efficacy_score", "efficacy"), ("paraphrase_score", "paraphrase"),
                                             ("neighborhood_score", "neighborhood")))}
        print(f"{label}, first {n} requests: efficacy {row['efficacy']:.3f}, paraphrase {row['paraphrase']:.3f}, "
              f"neighbourhood {row['neighborhood']:.3f} ({row['neighborhood_ci']}, n {row['neighborhood_n']})")
        if args.split_neighbours:
            for part, keep in (("neighbourhood_subject_edited_elsewhere", lambda s: s in edited_subjects),
                               ("neighbourhood_subject_never_edited", lambda s: s not in edited_subjects)):
                sub = scored(neighbours_where(done, keep), (("neighborhood_score", part),))
                row.update(sub)
                print(f"    {part}: {sub[part]:.3f} ({sub[part + '_ci']}, n {sub[part + '_n']} requests)")
        rows.append(row)
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"model": args.model, "stream": args.stream, "ledger": args.ledger,
                                      "rows": rows})


if __name__ == "__main__":
    main()
