"""Single-edit latency of ROME (or MEMIT) split into keys / values / solve.

Runs N single edits on a model (default: the built-in testbed with its packaged hyperparameters), each
on the unedited weights, and prints the mean seconds spent computing k* (keys), optimising v*
(values) and in the closed-form solve, as recorded by the method in ``delta.meta["timings"]``.

    python benchmarks/bench_edit_latency.py --n 10 --threads 1 [--method memit] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--method", default="rome", choices=["rome", "memit"])
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from superedit.commands.common import load_with_profile, make_stats, resolve_requests
    from superedit.editing.methods import get_method

    adapter, mdir, hp = load_with_profile(args.model, args.method)
    stats = make_stats(adapter, hp)
    stats.mom2(hp.layers[0])  # covariance computed (or loaded) before timing
    reqs = resolve_requests(mdir, None, n=args.n, seed=0)
    fn = get_method(args.method).fn
    fn(adapter, reqs[:1], hp, stats)  # warm-up (context prefixes, allocator)
    rows = []
    for r in reqs:
        t0 = time.perf_counter()
        delta = fn(adapter, [r], hp, stats)
        rows.append({**delta.meta["timings"], "total": time.perf_counter() - t0})
    summary = {k: st.mean(row[k] for row in rows) for k in ("keys", "values", "solve", "total")}
    summary.update(method=args.method, n=len(rows), threads=torch.get_num_threads(), layers=hp.layers,
                   values_share=summary["values"] / summary["total"])
    print(json.dumps(summary, indent=1))
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
