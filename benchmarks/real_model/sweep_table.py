"""The ROME layer sweep as a table, from the runs' summary/records files (the first N requests of each).

    python benchmarks/real_model/sweep_table.py runs/real/rome-sweep --n 12
"""

import argparse
import json
from pathlib import Path

from superedit.eval.metrics import summarize

KEYS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "gen_efficacy", "gen_paraphrase",
        "gen_neighborhood", "efficacy_magnitude", "neighborhood_magnitude")

ap = argparse.ArgumentParser()
ap.add_argument("root")
ap.add_argument("--n", type=int, default=12)
args = ap.parse_args()
rows = []
for d in sorted(Path(args.root).glob("L*"), key=lambda p: int(p.name[1:])):
    if not (d / "records.jsonl").is_file():
        continue
    recs = [json.loads(l) for l in (d / "records.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if not r.get("error")][: args.n]
    if len(recs) < args.n:
        continue
    post, pre = summarize([r["post"] for r in recs]), summarize([r["pre"] for r in recs])
    rows.append({"layer": int(d.name[1:]), "n": len(recs), **{k: post["means"].get(k) for k in KEYS},
                 "pre_neighborhood_score": pre["means"].get("neighborhood_score"),
                 "pre_gen_neighborhood": pre["means"].get("gen_neighborhood"),
                 "v_steps": sum(r["values"]["v_steps"] for r in recs) / len(recs)})
print("| layer | n | efficacy | paraphrase | neighbourhood (pre) | S | gen. efficacy | gen. paraphrase | gen. neighbourhood (pre) | v* steps |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    f = lambda k: "–" if r.get(k) is None else f"{r[k]:.2f}"
    print(f"| {r['layer']} | {r['n']} | {f('efficacy_score')} | {f('paraphrase_score')} | {f('neighborhood_score')} ({f('pre_neighborhood_score')}) "
          f"| {f('score')} | {f('gen_efficacy')} | {f('gen_paraphrase')} | {f('gen_neighborhood')} ({f('pre_gen_neighborhood')}) | {r['v_steps']:.1f} |")
json.dump(rows, open(Path(args.root) / "sweep.json", "w"), indent=2)
