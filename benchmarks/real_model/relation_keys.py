"""Can a key at the LAST token tell a paraphrase of the edited question from another question about
the same subject? The measurement behind a relation-aware gate (lifelong issue, gated's next step).

``gated`` fires at the subject's last token, before the question is asked, so an edit's value goes
into every question about its subject (``subject_drift.py``: 0.52 of other-relation answers kept on
the tuning side). A second gate at the position that predicts the answer would know the question.
For every request of a TUNING file and every layer asked, this reads the key (input of the MLP
down-projection) at the last token of

* the edit prompt (the anchor),
* its paraphrase prompts (same subject, same relation: the edit must reach them),
* ``--per-subject`` questions of OTHER relations about the same subject (one template per relation of
  the file, filled with the subject: the edit must not reach them),

and reports, per layer, the whitening cosines cos_C(k, k_anchor) of both sets: their quantiles, the
AUC (the chance that a paraphrase is closer than an other-relation question), and at thresholds τ the
share of paraphrases above τ against the share of other-relation questions above τ.

    python benchmarks/real_model/relation_keys.py --requests runs/stream-derived/tune.json \\
        --layers 2,6,10,16 --json runs/real/relation-keys.json
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--requests", required=True, help="a TUNING file (never the evaluation stream)")
    ap.add_argument("--layers", default="2,6,10,16")
    ap.add_argument("--taus", default="0.3,0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--per-subject", type=int, default=8)
    ap.add_argument("--site", default="key", choices=["key", "resid"],
                    help="key: the MLP down-projection input, whitening cosine (what gated's gate uses); resid: the "
                         "residual stream after the layer, cosine after removing the mean of all vectors read")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import random

    import torch

    torch.set_num_threads(args.threads)
    from superedit.commands.common import load_with_profile, make_stats, resolve_requests
    from superedit.editing.keys import keys_at
    from superedit.stats.whitening import Whitener

    from gate_separation import other_relation_templates, paraphrase_templates, relation_templates

    layers = [int(x) for x in args.layers.split(",")]
    taus = [float(x) for x in args.taus.split(",")]
    adapter, mdir, hp = load_with_profile(args.model, "memit")  # a profile that takes several layers
    hp = hp.replace(layers=layers, mom2_ridge=1e-3)  # gated's ridge: C is factorised
    stats = make_stats(adapter, hp) if args.site == "key" else None
    reqs = resolve_requests(mdir, args.requests)
    para = paraphrase_templates(reqs)
    other = other_relation_templates(reqs, relation_templates(reqs), args.per_subject, random.Random(args.seed))

    def read(pairs):
        return keys_at(adapter, [t for _, t in pairs], [reqs[i].subject for i, _ in pairs], layers, "last",
                       site=args.site)

    k_anchor = read([(i, r.prompt) for i, r in enumerate(reqs)])
    k_para, k_other = read(para), read(other)
    own_para = torch.tensor([i for i, _ in para])
    own_other = torch.tensor([i for i, _ in other])
    rows = []
    for l in layers:
        if args.site == "key":
            W = Whitener(stats.mom2(l), hp.mom2_ridge, layer=l)
            transform = lambda K: W.whiten(K.double())
        else:
            mean = torch.cat([k_anchor[l], k_para[l], k_other[l]]).double().mean(0)
            transform = lambda K: K.double() - mean

        def unit(K):
            Y = transform(K)
            return Y / Y.norm(dim=1, keepdim=True).clamp_min(1e-30)

        A = unit(k_anchor[l])
        pos = (unit(k_para[l]) * A[own_para]).sum(1).float()
        neg = (unit(k_other[l]) * A[own_other]).sum(1).float()
        auc = float((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean())
        q = lambda t: [round(float(x), 3) for x in torch.quantile(t, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))]
        row = {"layer": l, "n_paraphrases": len(pos), "n_other_relation": len(neg), "auc": auc,
               "paraphrase_q05_25_50_75_95": q(pos), "other_relation_q05_25_50_75_95": q(neg),
               "by_tau": [{"tau": t, "paraphrases_above": float((pos > t).float().mean()),
                           "other_relation_above": float((neg > t).float().mean())} for t in taus]}
        rows.append(row)
        print(f"layer {l}: AUC {auc:.3f}; paraphrase cos {row['paraphrase_q05_25_50_75_95']}; "
              f"other-relation cos {row['other_relation_q05_25_50_75_95']}")
        for b in row["by_tau"]:
            print(f"   τ {b['tau']:.2f}: paraphrases above {b['paraphrases_above']:.3f}, "
                  f"other-relation questions above {b['other_relation_above']:.3f}")
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"requests": args.requests, "site": args.site, "rows": rows})


if __name__ == "__main__":
    main()
