"""One Markdown table (with n and 95% intervals) of the last checkpoint of every method in one or more `superedit lifelong` runs.

Runs on the same stream may be split over several output folders (e.g. ROME one edit at a time in one,
the batch methods in batches of 10 in another); the script refuses runs whose streams differ::

    python benchmarks/real_model/lifelong_table.py runs/real/lifelong-50 runs/real/lifelong-50-b10

``--curve`` prints instead one row per method and checkpoint with the curve's columns (efficacy over all
edits, paraphrase, neighbourhood, untouched retention, held-out perplexity, fluency, known-fact
multiple choice, L1 of the edited layers).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from superedit.report.lifelong_report import final_table, load_metrics

COLUMNS = [("efficacy_all", "efficacy, all"), ("efficacy_ci", "95% CI"), ("efficacy_last_block", "last block"),
           ("efficacy_last_block_n", "n"), ("efficacy_last_block_ci", "95% CI"), ("paraphrase_all", "paraphrase"),
           ("paraphrase_all_n", "n"), ("paraphrase_all_ci", "95% CI"), ("neighborhood_all", "neighbourhood"),
           ("neighborhood_all_n", "n"), ("neighborhood_all_ci", "95% CI"),
           ("forgetting_mean", "forgetting / block"),
           ("untouched_retention", "untouched retention"), ("untouched_retention_n", "n"),
           ("untouched_retention_ci", "95% CI"),
           ("perplexity", "perplexity"), ("w_l1_rel_mean", "L1 / original"), ("edit_s", "edit s")]


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def stream_of(run: Path) -> list:
    from superedit.utils.io import read_jsonl

    return [(r["prompt"], r["subject"], r["target_new"]) for r in read_jsonl(run / "stream.jsonl")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="output folders of `superedit lifelong`")
    ap.add_argument("--curve", action="store_true", help="every checkpoint, the curve's columns")
    args = ap.parse_args()
    runs = [Path(r) for r in args.runs]
    first = stream_of(runs[0])
    for r in runs[1:]:
        if stream_of(r) != first:
            raise SystemExit(f"{r}: its edit stream differs from {runs[0]}'s; the table needs one stream")
    if args.curve:
        return print_curve(runs)
    rows = []
    for r in runs:
        batch = json.loads((r / "run.json").read_text()).get("batch_size")
        for row in final_table(load_metrics(r)):
            rows.append({**row, "batch": batch})
    head = ["method", "edits", "batch"] + [c[1] for c in COLUMNS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        cells = [row["method"], str(row["n_edits"]), str(row["batch"])] + [fmt(row.get(k)) for k, _ in COLUMNS]
        print("| " + " | ".join(cells) + " |")


CURVE = [("efficacy_all", "efficacy, all"), ("paraphrase_all", "paraphrase"), ("neighborhood_all", "neighbourhood"),
         ("untouched_retention", "untouched retention"), ("perplexity", "perplexity"), ("fluency", "fluency (bits)"),
         ("known_mc", "known-fact MC"), ("w_l1_rel_mean", "L1 / original")]


def print_curve(runs: list[Path]) -> None:
    from superedit.utils.io import read_jsonl

    head = ["method", "edits"] + [c[1] for c in CURVE]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in runs:
        for rec in read_jsonl(r / "metrics.jsonl"):
            ability = rec.get("ability") or {}
            vals = {**rec, "fluency": (ability.get("fluency") or {}).get("value"),
                    "known_mc": (ability.get("known_mc") or {}).get("value")}
            print("| " + " | ".join([rec["method"], str(rec["n_edits"])] + [fmt(vals.get(k)) for k, _ in CURVE]) + " |")


if __name__ == "__main__":
    main()
