"""Pre/post means with n and 95% bootstrap intervals from an edit run's records.jsonl.

    python benchmarks/real_model/eval_table.py runs/real/rome-eval
"""

import json
import sys
from pathlib import Path

from superedit.eval.metrics import summarize

KEYS = [("efficacy_score", "efficacy (p(new) > p(true))"), ("paraphrase_score", "paraphrase"),
        ("neighborhood_score", "neighbourhood"), ("score", "S (harmonic mean)"),
        ("efficacy_magnitude", "efficacy magnitude"), ("paraphrase_magnitude", "paraphrase magnitude"),
        ("neighborhood_magnitude", "neighbourhood magnitude"), ("rewrite_acc", "rewrite token accuracy"),
        ("locality", "locality (argmax unchanged)"), ("gen_efficacy", "generation: efficacy"),
        ("gen_paraphrase", "generation: paraphrase"), ("gen_neighborhood", "generation: neighbourhood")]

run = Path(sys.argv[1])
recs = [json.loads(l) for l in (run / "records.jsonl").read_text().splitlines() if l.strip()]
ok = [r for r in recs if not r.get("error")]
pre, post = summarize([r["pre"] for r in ok]), summarize([r["post"] for r in ok])
print(f"{len(ok)} edited, {len(recs) - len(ok)} failed")
print("| metric | n | unedited | edited | edited, 95% CI |")
print("|---|---|---|---|---|")
for k, label in KEYS:
    if k not in post["means"]:
        continue
    a = pre["means"].get(k)
    lo, hi = post["ci"].get(k, (float("nan"), float("nan"))) if k != "score" else (float("nan"), float("nan"))
    ci = "–" if k == "score" else f"{lo:.2f}–{hi:.2f}"
    print(f"| {label} | {post['counts'][k]} | {'–' if a is None else f'{a:.2f}'} | {post['means'][k]:.2f} | {ci} |")
t = [r["timing"]["edit_s"] for r in ok if r.get("timing")]
if t:
    print(f"\nedit time per request: mean {sum(t) / len(t):.1f} s (one busy CPU thread)")
