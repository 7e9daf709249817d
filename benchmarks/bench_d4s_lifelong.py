"""Thousands of sequential D4S edits through the edit ledger: time, ledger size and memory (plain script).

    python benchmarks/bench_d4s_lifelong.py                          # 10,000 edits, batches of 100, default testbed
    python benchmarks/bench_d4s_lifelong.py --edits 1000 --quick     # a short check
    python benchmarks/bench_d4s_lifelong.py --hparams my_d4s.yaml --batch-size 50 --json out.json

What runs is the real pipeline of ``superedit lifelong``'s D4S (``Ledger.step``): for each batch, z* of
every request (v* optimisation against the CURRENT edited model, batched), keys, the incremental D4S
update of Σ r kᵀ / Σ k kᵀ and its factorisation, the re-solve, the atomic commit to disk (state file,
per-edit undo file, ledger.json) and re-applying the weights. Nothing is skipped or mocked.

Requests: the testbed's own counterfactual edits (one per fact). A stream longer than the world's
facts continues with further rounds drawn with other seeds, so a fact can be edited again to
another object (as facts change again in a deployed model). D4S keeps such an old edit's terms
in its sums (it has no notion of "overwrite"), so the quality of a re-edited fact is not what this
benchmark measures; it measures cost.

Every ``--record-every`` edits it records: elapsed seconds (split into values / D4S solve+commit),
the size of the live state (``state.<g>.safetensors``: O(1) in the number of edits), the size of
the per-edit log (ledger.json's edit list + ``edits/``: the request log and the undo columns,
O(d·k) per edit, by design), and the process's resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def dir_mb(path: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file()) / 2**20


def edit_stream(model_dir, n: int):
    from superedit.data.sampling import counterfactual_requests_from_facts
    from superedit.testbed.access import default_edit_requests, true_facts

    reqs = list(default_edit_requests(model_dir, None, seed=0))
    round_ = 1
    while len(reqs) < n:
        more = counterfactual_requests_from_facts(true_facts(model_dir), None, seed=round_, source=f"round{round_}")
        reqs += more
        round_ += 1
    return reqs[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin", help="testbed model (builtin[:SIZE] or a testbed directory)")
    ap.add_argument("--edits", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--record-every", type=int, default=500)
    ap.add_argument("--hparams", help="D4S hparams YAML overriding the testbed profile")
    ap.add_argument("--quick", action="store_true", help="1,000 edits, recorded every 100")
    ap.add_argument("--out", help="ledger directory (default: a temporary directory, deleted afterwards)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SUPEREDIT_THREADS", "1")))
    ap.add_argument("--json", help="write the records to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.edits, args.record_every = min(args.edits, 1000), 100

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("SUPEREDIT_NO_PROGRESS", "1")
    from superedit.commands.common import build_hparams, hparams_profile, local_model_dir, make_stats
    from superedit.lifelong.ledger import Ledger
    from superedit.models.loading import load_model

    adapter = load_model(args.model)
    model_dir = local_model_dir(args.model)
    hp = build_hparams("d4s", hparams_profile(adapter, model_dir), args.hparams, adapter.n_layers)
    stats = make_stats(adapter, hp)
    requests = edit_stream(model_dir, args.edits)
    tmp = None
    if args.out:
        out = Path(args.out)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-d4s-")
        out = Path(tmp.name) / "ledger"
    ledger = Ledger.create(out, adapter, "d4s", hp)
    ledger.apply_to(adapter)
    print(f"model {args.model}: layers {hp.layers}, d_mlp {adapter.down_weight(hp.layers[0]).shape[1]}, "
          f"{args.edits} edits in batches of {args.batch_size}, v_num_grad_steps {hp.v_num_grad_steps}, "
          f"{1 + hp.n_prefixes * len(hp.context_lengths)} prompts per request", flush=True)

    import superedit.editing.methods.spread as spread_mod

    value_s = [0.0]
    orig_targets = spread_mod.memit_targets

    def timed_targets(*a, **kw):  # time the v* share without changing what runs
        t = time.perf_counter()
        try:
            return orig_targets(*a, **kw)
        finally:
            value_s[0] += time.perf_counter() - t

    spread_mod.memit_targets = timed_targets

    records = []
    t0 = time.perf_counter()
    rss0 = rss_mb()
    done = 0
    try:
        while done < args.edits:
            batch = requests[done:done + args.batch_size]
            ledger.step(adapter, batch, stats)
            done += len(batch)
            if done % args.record_every == 0 or done == args.edits:
                elapsed = time.perf_counter() - t0
                rec = {"edits": done, "elapsed_s": round(elapsed, 1), "values_s": round(value_s[0], 1),
                       "solve_commit_s": round(elapsed - value_s[0], 1),
                       "state_mb": round(dir_mb(out, "state.*.safetensors"), 3),
                       "ledger_json_mb": round(dir_mb(out, "ledger.json"), 3),
                       "undo_files_mb": round(dir_mb(out / "edits", "*.safetensors"), 3),
                       "rss_mb": round(rss_mb(), 1), "rss_growth_mb": round(rss_mb() - rss0, 1)}
                records.append(rec)
                print(json.dumps(rec), flush=True)
    finally:
        spread_mod.memit_targets = orig_targets
    total = time.perf_counter() - t0
    result = {"model": args.model, "edits": args.edits, "batch_size": args.batch_size, "layers": hp.layers,
              "v_num_grad_steps": hp.v_num_grad_steps, "threads": args.threads, "total_s": round(total, 1),
              "target_s": 1800, "met": total < 1800, "records": records}
    print(json.dumps({k: v for k, v in result.items() if k != "records"}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
