"""Where does ROME's neighbourhood loss on SmolLM2 come from? Split it by lexical overlap.

A CounterFact neighbourhood prompt names another subject with the same relation and true object. When
that subject shares a word with the edited one ("Airbus A330" for an edit of "Airbus A340"), its key at
the edited layer is close to the edit's key and the edit carries over. This script splits the requests
of an ``superedit edit`` run by whether any of their neighbourhood prompts contains a word (≥ 3 letters)
of the edited subject, and reports the neighbourhood change (post − pre) of each group with its 95%
bootstrap interval and its share of the total loss::

    python benchmarks/real_model/neighbourhood_overlap.py runs/real/rome-eval runs/known-smollm2/eval.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from superedit.eval.metrics import bootstrap_ci


def subject_words(subject: str) -> list[str]:
    return [w.lower() for w in re.findall(r"\w+", subject) if len(w) >= 3]


def overlap_share(record: dict) -> float:
    """Share of a CounterFact record's neighbourhood prompts that contain a word of its subject."""
    words = subject_words(record["requested_rewrite"]["subject"])
    prompts = record.get("neighborhood_prompts") or []
    if not prompts:
        return float("nan")
    return float(np.mean([any(w in p.lower() for w in words) for p in prompts]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="output folder of `superedit edit` (records.jsonl)")
    ap.add_argument("dataset", help="the CounterFact file the run edited (neighbourhood prompts)")
    args = ap.parse_args()
    records = [json.loads(line) for line in (Path(args.run) / "records.jsonl").read_text().splitlines() if line]
    by_case = {r["case_id"]: r for r in json.loads(Path(args.dataset).read_text())}
    drop, share = [], []
    for rec in records:
        if rec.get("error") or rec["case_id"] not in by_case:
            continue
        drop.append(rec["post"]["neighborhood_score"] - rec["pre"]["neighborhood_score"])
        share.append(overlap_share(by_case[rec["case_id"]]))
    drop, share = np.array(drop), np.array(share)
    total = drop.mean()
    lo, hi = bootstrap_ci(drop.tolist())
    print(f"all requests: n {len(drop)}, neighbourhood change {total:+.3f} (95% CI {lo:+.3f} to {hi:+.3f})")
    for name, mask in (("a neighbour shares a subject word", share > 0), ("no neighbour shares one", share == 0)):
        part = drop[mask]
        lo, hi = bootstrap_ci(part.tolist())
        loss = f", share of the total loss {part.sum() / drop.sum():.0%}" if drop.sum() else ""
        print(f"{name}: n {mask.sum()}, change {part.mean():+.3f} (95% CI {lo:+.3f} to {hi:+.3f}){loss}")
    worst = np.argsort(drop)[:8]
    print("largest losses (change, overlap share):",
          ", ".join(f"{drop[i]:+.1f} ({share[i]:.1f})" for i in worst))


if __name__ == "__main__":
    main()
