"""Held-out perplexity of a lifelong run, split by whether a text mentions a subject the stream edited.

On a testbed the perplexity texts are biographies of the world's people, edited ones included. A text
about an edited person states the old facts, so a successful edit raises its perplexity, and so does
an edit that leaks into that person's other facts. Texts about people no edit touches measure the
collateral damage alone. This applies the run's ledger (all its committed edits) and reports both
groups before and after. A text counts as mentioning an edited subject when the subject's name occurs
in it as a substring. The model loads on the default device and dtype, not necessarily the run's.

    python benchmarks/lifelong_ppl_split.py --run runs/h11-horizon-gated --method gated
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a `superedit lifelong` output directory")
    ap.add_argument("--method", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from superedit.commands.common import local_model_dir, resolve_requests
    from superedit.eval.scoring import perplexity
    from superedit.lifelong.ledger import Ledger
    from superedit.models import load_model

    run = Path(args.run)
    model = json.loads((run / "command.json").read_text())["params"].get("model") or "builtin"
    adapter = load_model(model)
    led = Ledger.open(run / args.method / "ledger")
    n_done = sum(len(e["requests"]) for e in led.edits if e["status"] == "applied")
    stream = resolve_requests(local_model_dir(model), str(run / "stream.jsonl"))[:n_done]
    edited = {r.subject for r in stream}
    texts = json.loads((run / "probe.json").read_text())["texts"]
    groups = {"mention_edited": [t for t in texts if any(s in t for s in edited)],
              "no_edited": [t for t in texts if not any(s in t for s in edited)]}
    before = {k: perplexity(adapter, v) for k, v in groups.items() if v}
    led.apply_to(adapter)
    after = {k: perplexity(adapter, v) for k, v in groups.items() if v}
    result = {"run": str(run), "method": args.method, "n_edits": n_done,
              "groups": {k: {"n_texts": len(groups[k]), "before": before[k], "after": after[k]} for k in before}}
    for k, g in result["groups"].items():
        print(f"{k}: {g['n_texts']} texts, perplexity {g['before']:.3f} -> {g['after']:.3f}")
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
