"""Facts for the averaged causal trace of SmolLM2: known under the margin rule, none from the evaluation split.

    python benchmarks/real_model/trace_facts.py runs/known-smollm2-margin1/known.json runs/known-smollm2/eval.json \
        runs/real/trace_facts.json
"""

import json
import sys

known, evaluation, out = sys.argv[1:4]
eval_ids = {r["case_id"] for r in json.load(open(evaluation))}
facts = [r for r in json.load(open(known)) if r["case_id"] not in eval_ids]
json.dump(facts, open(out, "w"))
print(f"{len(facts)} facts (of {len(eval_ids)} evaluation records excluded) -> {out}")
