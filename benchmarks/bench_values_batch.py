"""v* for a lifelong batch: N requests optimised together, as MEMIT, D4S, AlphaEdit and guard do.

Times ``optimize_values`` for the first ``--n`` requests of ``--requests`` at the method profile's
z layer (the last edited layer, residual site), with the profile's steps, prefixes and early stop,
and prints seconds per request, the steps taken, the final NLL, and how many row-tokens one step
forwards (padding included) against the tokens the loss needs.

    python benchmarks/bench_values_batch.py --n 40 --threads 2 \\
        --requests runs/stream-derived/known-margin/known.json [--method alphaedit] [--json out.json]

To compare two versions of superedit, run the same command at each commit (the script only uses
``optimize_values``, ``value_rows`` and ``_prepare_rows``).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--requests", required=True)
    ap.add_argument("--method", default="alphaedit")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from superedit.commands.common import load_with_profile, resolve_requests
    from superedit.editing.contexts import context_prefixes
    from superedit.editing.values import _prepare_rows, optimize_values, value_rows

    adapter, mdir, hp = load_with_profile(args.model, args.method)
    layer = sorted(hp.layers)[-1]
    site = "resid" if adapter.mlp_out_norm(layer) is None else "value"
    reqs = resolve_requests(mdir, args.requests, limit=args.n)
    items = [(r.prompt, r.subject, r.target_new) for r in reqs]
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)

    rows, _ = value_rows(adapter, items, prefixes)
    plan, _ = _prepare_rows(adapter, rows, layer, site, adapter.n_layers - 1)
    needed = int((plan.attention_mask.sum(1) - plan.subject_last).sum())
    computed = sum(g.computed_tokens for g in plan.groups)

    t0 = time.perf_counter()
    vals = optimize_values(adapter, items, layer, site, hp, prefixes)
    seconds = time.perf_counter() - t0
    steps = [v.steps for v in vals]
    result = {"model": args.model, "method": args.method, "layer": layer, "site": site, "n": len(items),
              "rows": int(plan.input_ids.shape[0]), "groups": len(plan.groups), "tokens_needed_per_step": needed,
              "tokens_computed_per_step": computed, "seconds": seconds, "seconds_per_request": seconds / len(items),
              "steps_mean": sum(steps) / len(steps), "steps_max": max(steps),
              "final_nll_mean": sum(v.final_nll for v in vals) / len(vals), "threads": torch.get_num_threads()}
    print(f"{len(items)} requests, {result['rows']} rows in {len(plan.groups)} group(s); a full step forwards "
          f"{computed} row-tokens for {needed} needed")
    print(f"v*: {seconds:.1f} s ({seconds / len(items):.2f} s per request), steps mean {result['steps_mean']:.1f} "
          f"max {max(steps)}, final NLL mean {result['final_nll_mean']:.3f}, {torch.get_num_threads()} thread(s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
