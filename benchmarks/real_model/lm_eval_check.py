"""lm-evaluation-harness on a real model, offline: superedit's known-fact multiple choice written as a local
lm-eval task (`superedit data lm-eval-task`) and scored by lm-eval's own loglikelihood code on the in-memory
model, beside superedit's choice scorer on the same items (issue #16 item 4).

    python benchmarks/real_model/lm_eval_check.py --model pretrained:smollm2-135m \\
        --requests runs/known-smollm2/tune.json --out runs/real/lm-eval-check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--requests", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from superedit.data import load_requests
    from superedit.eval.ability import ChoiceItem, choice_accuracy, run_lm_eval, write_lm_eval_task
    from superedit.eval.metrics import share_ci
    from superedit.lifelong.probe import requests_probe
    from superedit.models import load_model
    from superedit.utils.io import write_json_atomic

    reqs = load_requests(args.requests)
    probe = requests_probe(reqs, n=len(reqs), n_questions=args.n, seed=0)
    items = [ChoiceItem.from_dict(c) for c in probe.ability["choices"]["known_mc"]]
    out = Path(args.out)
    write_lm_eval_task(items, out / "tasks", "known_mc")
    adapter = load_model(args.model)
    t0 = time.perf_counter()
    harness = run_lm_eval(adapter, ["known_mc"], include_path=str(out / "tasks"), batch_size=16)["known_mc"]
    t1 = time.perf_counter()
    ours = choice_accuracy(adapter, items, 16)
    t2 = time.perf_counter()
    res = {"model": args.model, "requests": args.requests, "n_items": len(items),
           "lm_eval": harness, "lm_eval_s": t1 - t0,
           "superedit_choice_accuracy": ours, "superedit_ci": share_ci(ours["accuracy"], ours["n"]),
           "superedit_s": t2 - t1}
    write_json_atomic(out / "result.json", res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
