"""Markdown tables of a `superedit robust` run with 95% intervals over requests, and REP's paired gains.

Each cell of `table.json` is a share pooled over all variants of all requests. Requests have different
numbers of variants (shuffles, paraphrases), so the interval is taken over the per-request shares in
`records.jsonl` (`bootstrap_ci`, 1,000 resamples, seed 0), and the cell shows the pooled share, and
the per-request mean where the two differ by more than 0.005. Gains are paired per request (the
setting with the adaptor minus the one without, on the same edit)::

    python benchmarks/robust_table.py runs/ci13/robust-cf3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("success", "paraphrase", "locality", "rephrase_id", "rephrase_ood", "shuffle_id", "shuffle_ood",
           "long_id", "long_ood")


def main() -> None:
    from superedit.eval.metrics import bootstrap_ci
    from superedit.utils.io import read_jsonl

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="output folder of `superedit robust`")
    args = ap.parse_args()
    run = Path(args.run)
    table = json.loads((run / "table.json").read_text())["settings"]
    records = [r for r in read_jsonl(run / "records.jsonl") if r.get("settings")]
    cols = [c for c in COLUMNS if any(table[s].get(c, {}).get("n") for s in table)]
    print(f"| setting (n {len(records)} requests) | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    per: dict[str, dict[str, list[float]]] = {}
    for setting, cells in table.items():
        out = []
        per[setting] = {}
        for c in cols:
            pooled = cells.get(c, {}).get("acc")
            vals = [r["settings"][setting][c]["acc"] for r in records
                    if r["settings"].get(setting, {}).get(c, {}).get("n")]
            per[setting][c] = vals
            if pooled is None or not vals:
                out.append("–")
                continue
            mean = sum(vals) / len(vals)
            lo, hi = bootstrap_ci(vals)
            text = f"{pooled:.2f}" + (f"; mean {mean:.2f}" if abs(mean - pooled) > 0.005 else "")
            out.append(f"{text} ({lo:.2f}–{hi:.2f})" + (f", n {len(vals)}" if len(vals) != len(records) else ""))
        print(f"| {setting} | " + " | ".join(out) + " |")
    for setting in table:
        base = setting.split("+")[0]
        if "+" not in setting or base not in table:
            continue
        gains = []
        for c in cols:
            diffs = [r["settings"][setting][c]["acc"] - r["settings"][base][c]["acc"] for r in records
                     if r["settings"].get(setting, {}).get(c, {}).get("n")
                     and r["settings"].get(base, {}).get(c, {}).get("n")]
            if diffs:
                lo, hi = bootstrap_ci(diffs)
                gains.append(f"{c} {100 * sum(diffs) / len(diffs):+.0f} ({100 * lo:+.0f} to {100 * hi:+.0f})")
        print(f"\n{setting} − {base}, points, paired over requests: " + "; ".join(gains))


if __name__ == "__main__":
    main()
