"""Score a finished `gated` lifelong run's final ledger again with the gate's settings changed.

The entries (keys and values) stay exactly as the run stored them; only how the installed gate decides
where they fire changes (e.g. ``boundary_requests`` adds the name-boundary test, or another ``tau``). The
final checkpoint's measures are recomputed with the runner's own pieces: efficacy, paraphrase and
neighbourhood over the live edits (neighbours the stream edits are left out, as the runner does), with
n and 95% bootstrap intervals, and the probe's retention, perplexity and general ability.

What this does not reproduce: v* of every later edit was optimised with the earlier entries firing as
the RUN's gate decided. Where a changed gate fires less (the boundary test), later values were
optimised against slightly more interference than they now meet. A run from scratch with the new
setting is the full measurement; this one isolates the gate's decision.

    python benchmarks/real_model/gated_rescore.py runs/real/ll1000-gated6-p025 --baseline \\
        --set boundary_requests=runs/stream-derived/tune.json --threads 2 --json runs/real/rescore-boundary.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="output folder of `superedit lifelong --methods gated`")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a gated hparams field to change (YAML value), e.g. boundary_requests=FILE; repeatable")
    ap.add_argument("--baseline", action="store_true",
                    help="also score the ledger unchanged first, with this code (the recorded figures may predate it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    import yaml

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("gated_rescore")
    from superedit.data import EditRequest
    from superedit.editing.methods.gated import install_memory
    from superedit.eval.metrics import batch_evaluate, bootstrap_ci
    from superedit.lifelong.ledger import Ledger
    from superedit.lifelong.probe import Probe, measure_probe
    from superedit.lifelong.runner import live_positions, unedited_neighbours
    from superedit.models import load_model
    from superedit.utils.io import read_jsonl, write_json_atomic

    run = Path(args.run)
    params = json.loads((run / "command.json").read_text())["params"]
    stream = [EditRequest.from_dict(r) for r in read_jsonl(run / "stream.jsonl")]
    probe = Probe.from_dict(json.loads((run / "probe.json").read_text()))
    records = [r for r in read_jsonl(run / "metrics.jsonl") if r["method"] == "gated"]
    if not records or not records[-1].get("final"):
        raise SystemExit(f"{run}: no final gated checkpoint; finish the run (--resume) first")
    final = records[-1]
    n = final["n_edits"]
    changes = {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write FIELD=VALUE")
        changes[field] = yaml.safe_load(value)
    adapter = load_model(params.get("model") or "builtin",
                         **{k: params.get(k) for k in ("device", "dtype", "device_map")})  # as the run loaded it
    led = Ledger.open(run / "gated" / "ledger")
    if len(led.state) != n:
        raise SystemExit(f"{run}: the ledger holds {len(led.state)} entries, the final checkpoint {n} edits")
    live = live_positions(stream, n)
    done = unedited_neighbours([stream[i] for i in live], stream)

    def score(label: str, gate_changes: dict) -> dict:
        rec = {"label": label, "n_edits": n, "changes": gate_changes}
        res = batch_evaluate(adapter, done, probe.max_neighbours, True, probe.eval_batch_size)
        for key, name in (("efficacy_score", "efficacy"), ("paraphrase_score", "paraphrase"),
                          ("neighborhood_score", "neighborhood")):
            vals = [r[key] for r in res if r.get(key) is not None]
            rec[name] = {"mean": sum(vals) / len(vals), "n": len(vals), "ci": bootstrap_ci(vals),
                         "recorded": final.get(f"{name}_all")}
        rec.update(measure_probe(adapter, probe, {r.subject for r in done}))
        for name in ("efficacy", "paraphrase", "neighborhood"):
            v = rec[name]
            log.info("%s: %s %.4f (%.3f–%.3f, n %d); the run recorded %.4f", label, name, v["mean"], v["ci"][0],
                     v["ci"][1], v["n"], v["recorded"] or float("nan"))
        log.info("%s: untouched retention %.4f (n %d; never-edited subjects %.4f of %d, edited elsewhere %s of %d); "
                 "the run recorded %.4f; perplexity %.2f (recorded %.2f)", label, rec["untouched_retention"],
                 rec["untouched_n"], rec.get("untouched_retention_other_subjects") or float("nan"),
                 rec.get("untouched_n_other_subjects", 0), rec.get("untouched_retention_edited_subjects"),
                 rec.get("untouched_n_edited_subjects", 0), final.get("untouched_retention") or float("nan"),
                 rec.get("perplexity") or float("nan"), final.get("perplexity") or float("nan"))
        return rec

    rows = []
    with torch.no_grad():
        led.apply_to(adapter)
        state = led.state
        if args.baseline or not changes:
            rows.append(score("as stored", {}))
        if changes:
            state.hparams = state.hparams.replace(**changes)
            state.boundary = None  # learned again from the (new) boundary_requests, if any
            install_memory(adapter, state)
            rows.append(score("changed", changes))
    led.close()
    if args.json:
        write_json_atomic(args.json, {"run": str(run), "rows": rows})


if __name__ == "__main__":
    main()
