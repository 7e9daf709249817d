"""Can a delta at the subject's last token make the model say the new object at all?

For the first N requests of a dataset file, optimise an (effectively) unconstrained delta at each
layer's MLP output ("value") or residual stream ("resid") at the subject's last token: no clamp
(factor 1000), no KL, no weight decay, no context prefixes. Prints the target NLL before -> after and
‖δ‖/‖v₀‖ per request. If even this cannot lower the NLL, no locate-then-edit value can: the answer is
not read from that token (or the object is not a known answer of the relation). This is how the
EasyEdit testbed's unreachable targets were found (NLL stuck at 7-10 before anchor subjects).

    python benchmarks/value_reach.py --model runs/tb-ee2 --requests ../shared/data/easyedit_counterfact_sample.json --layers 0,1 --lr 20
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--layers", default="0,1")
    ap.add_argument("--sites", default="value,resid")
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from superedit.data import load_requests
    from superedit.editing.hparams import ROMEHParams
    from superedit.editing.values import optimize_values
    from superedit.models import load_model

    adapter = load_model(args.model)
    reqs = list(load_requests(args.requests, limit=args.n))
    items = [(r.prompt, r.subject, r.target_new) for r in reqs]
    hp = ROMEHParams(clamp_norm_factor=1000.0, v_num_grad_steps=args.steps, v_lr=args.lr, kl_factor=0.0,
                     v_weight_decay=0.0)
    print("requests:", " | ".join(f"{r.subject} -> {r.target_new}" for r in reqs))
    for layer in (int(x) for x in args.layers.split(",")):
        for site in args.sites.split(","):
            res = optimize_values(adapter, items, layer, site, hp, [""])
            print(f"layer {layer} {site:5s}", " ".join(
                f"{r.nll_history[0]:.1f}->{r.nll_history[-1]:.2f}|{float(r.delta.norm() / r.init.norm()):.1f}" for r in res))


if __name__ == "__main__":
    main()
