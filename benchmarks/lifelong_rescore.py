"""Re-score the final state of a finished `superedit lifelong` run, with intervals for every rate.

Runs made before the lifelong runner kept per-edit paraphrase and neighbourhood shares have only their
means in ``metrics.jsonl``. Their ledgers still hold every edit, so the final weights can be rebuilt
(``Ledger.apply_to``) and the stream scored again with the runner's own scorer (``batch_evaluate``,
the run's ``max_neighbours``). The script checks that the re-scored means equal the recorded ones
(a run whose ledger was altered would not) and prints, per method, the means with their n and 95%
bootstrap intervals over the edits::

    python benchmarks/lifelong_rescore.py runs/keel-1000 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("lifelong_rescore")

SCORES = (("efficacy_score", "efficacy"), ("paraphrase_score", "paraphrase"), ("neighborhood_score", "neighborhood"))


def rescore(run: Path) -> list[dict]:
    import torch

    from superedit.data import EditRequest
    from superedit.eval.metrics import batch_evaluate, bootstrap_ci
    from superedit.lifelong.ledger import Ledger
    from superedit.lifelong.probe import Probe
    from superedit.models import load_model
    from superedit.utils.io import read_jsonl

    params = json.loads((run / "command.json").read_text())["params"]
    model = params.get("model") or "builtin"
    place = {k: params.get(k) for k in ("device", "dtype", "device_map")}  # as the run loaded it
    stream = [EditRequest.from_dict(r) for r in read_jsonl(run / "stream.jsonl")]
    probe = Probe.from_dict(json.loads((run / "probe.json").read_text()))
    recorded = {}
    for rec in read_jsonl(run / "metrics.jsonl"):
        recorded[rec["method"]] = rec  # the last checkpoint of each method
    rows = []
    for method, final in recorded.items():
        led = Ledger.open(run / method / "ledger")
        n = final["n_edits"]
        if not final.get("final") or len(led.edits) != final.get("n_batches"):
            raise SystemExit(f"{run}/{method}: the run is unfinished (last checkpoint at {n} edits, "
                             f"{len(led.edits)} ledger entries); finish it with --resume first")
        adapter = load_model(model, **place)
        with torch.no_grad():
            led.apply_to(adapter)
        res = batch_evaluate(adapter, stream[:n], probe.max_neighbours, True, probe.eval_batch_size)
        row = {"method": method, "n_edits": n}
        for key, name in SCORES:
            vals = [r[key] for r in res if r.get(key) is not None]
            mean = sum(vals) / len(vals) if vals else None
            row[name] = {"mean": mean, "n": len(vals), "ci": bootstrap_ci(vals) if vals else None,
                         "recorded": final.get(f"{name}_all")}
            if mean is not None and final.get(f"{name}_all") is not None and abs(mean - final[f"{name}_all"]) > 1e-9:
                raise SystemExit(f"{run}/{method}: re-scored {name} {mean:.6f} differs from the recorded "
                                 f"{final[f'{name}_all']:.6f}; the ledger or the scorer changed since the run")
        rows.append(row)
        led.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="output folder of `superedit lifelong`")
    ap.add_argument("--json", help="write the rows here as JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = rescore(Path(args.run))
    print("| method | edits | " + " | ".join(f"{n} (95% CI)" for _, n in SCORES) + " |")
    print("|---|---|" + "---|" * len(SCORES))
    for r in rows:
        cells = [f"{r[n]['mean']:.2f} ({r[n]['ci'][0]:.2f}–{r[n]['ci'][1]:.2f}), n {r[n]['n']}"
                 if r[n]["mean"] is not None else "–" for _, n in SCORES]
        print(f"| {r['method']} | {r['n_edits']} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
