"""Re-score the final state of a finished `superedit lifelong` run, with intervals for every rate.

Runs made before the lifelong runner kept per-edit paraphrase and neighbourhood shares have only their
means in ``metrics.jsonl``. Their ledgers still hold every edit, so the final weights can be rebuilt
(``Ledger.apply_to``) and the stream scored again with the runner's own scorer (``batch_evaluate``,
the run's ``max_neighbours``). The script checks that the re-scored means equal the recorded ones
(a run whose ledger was altered would not) and prints, per method, the means with their n and 95%
bootstrap intervals over the edits::

    python benchmarks/lifelong_rescore.py runs/keel-1000 [--json OUT.json]

``--testbed-neighbours``: testbed requests written before 29 Nov 2026 (evening) did not name their neighbours'
subjects, so a lifelong run scored also the neighbours its own stream edits on the same relation
(expected to change, not a specificity failure). This re-reads the stream's requests from the testbed
(now with ``neighborhood_subjects``), leaves those neighbours out as the runner now does
(``unedited_neighbours``) and scores the neighbourhood of the final state and of the unedited model.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("lifelong_rescore")

SCORES = (("efficacy_score", "efficacy"), ("paraphrase_score", "paraphrase"), ("neighborhood_score", "neighborhood"))


def testbed_stream(stream: list, model: str) -> list:
    """The stream's requests as the testbed builds them now (same prompt, subject and new target)."""
    from superedit.commands.common import local_model_dir
    from superedit.testbed.access import default_edit_requests

    fresh = {(r.prompt, r.subject, r.target_new): r for r in default_edit_requests(local_model_dir(model), None)}
    missing = [r.case_id for r in stream if (r.prompt, r.subject, r.target_new) not in fresh]
    if missing:
        raise SystemExit(f"{len(missing)} stream requests are not testbed requests (e.g. {missing[:3]}); "
                         "--testbed-neighbours needs a testbed run without re-edits")
    return [fresh[(r.prompt, r.subject, r.target_new)] for r in stream]


def rescore(run: Path, testbed_neighbours: bool = False) -> list[dict]:
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
    if testbed_neighbours:
        from superedit.lifelong.runner import unedited_neighbours

        stream = testbed_stream(stream, model)
        stream = unedited_neighbours(stream, stream)
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
        if testbed_neighbours:  # the recorded means scored other neighbours: no check, the unedited model beside
            vals = [r["neighborhood_score"] for r in res if r.get("neighborhood_score") is not None]
            base = [r["neighborhood_score"] for r in batch_evaluate(load_model(model, **place), stream[:n],
                                                                    probe.max_neighbours, True,
                                                                    probe.eval_batch_size)
                    if r.get("neighborhood_score") is not None]
            row["neighbourhood, unedited neighbours"] = {"mean": sum(vals) / len(vals), "n": len(vals),
                                                         "ci": bootstrap_ci(vals),
                                                         "unedited_model": sum(base) / len(base)}
            rows.append(row)
            led.close()
            continue
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
    ap.add_argument("--testbed-neighbours", action="store_true",
                    help="score only the neighbours the stream does not edit (testbed runs made before 29 Nov 2026, evening)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = rescore(Path(args.run), args.testbed_neighbours)
    if args.testbed_neighbours:
        for r in rows:
            v = r["neighbourhood, unedited neighbours"]
            print(f"{r['method']} @ {r['n_edits']}: neighbourhood over the neighbours the stream does not edit "
                  f"{v['mean']:.3f} ({v['ci'][0]:.3f}–{v['ci'][1]:.3f}), n {v['n']}; unedited model {v['unedited_model']:.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
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
