"""The NAS anchor for a model and method: trimmed mean ‖v*‖ of a reference sample, as an hparams file.

Optimises v* for the requests of ``--requests`` (a reference sample outside every stream that will be
evaluated, e.g. a tuning split) on the ORIGINAL model with the method's packaged profile, drops the
top 5 % of the norms and writes ``norm_anchor: A`` into ``--out`` (a ``--hparams-dir`` folder as
``METHOD.yaml``), with a comment saying where it came from (docs/results/anchors.md).

    python benchmarks/real_model/nas_anchor.py --method alphaedit --requests runs/stream-derived/tune.json \\
        --out benchmarks/hparams/smollm2-nas
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--method", default="alphaedit")
    ap.add_argument("--requests", required=True, help="the reference sample (never evaluated)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", required=True, help="folder for METHOD.yaml")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from superedit.commands.common import load_with_profile, resolve_requests
    from superedit.editing.hparams import MEMITHParams
    from superedit.editing.methods.anchors import reference_value_norm

    adapter, mdir, hp = load_with_profile(args.model, args.method)
    reqs = resolve_requests(mdir, args.requests, limit=args.limit)
    site = "resid" if isinstance(hp, MEMITHParams) else "value"  # the MEMIT family anchors z's value part
    anchor = reference_value_norm(adapter, reqs, hp, site)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.method}.yaml").write_text(
        f"# NAS on {args.model}'s {args.method} profile: the anchor is the trimmed mean ‖v*‖ (top 5 % dropped) of the\n"
        f"# {len(reqs)} requests of {args.requests}, optimised on the original model with the profile's value\n"
        f"# settings (site {site}); written by benchmarks/real_model/nas_anchor.py (docs/results/anchors.md).\n"
        f"norm_anchor: {anchor:.3f}\n", encoding="utf-8")
    print(f"{args.method} anchor {anchor:.3f} from {len(reqs)} requests → {out / (args.method + '.yaml')}")


if __name__ == "__main__":
    main()
