"""Does the UNEDITED model's own next-token prediction tell the edited question from another question
about the same subject? The measurement behind a possible answer check for gated (lifelong issue #14).

``gated`` writes an edit's value at its subject's last token, before the question is asked, so the
value reaches every question about that subject (``subject_drift.py``); a key at the last token does
not separate the relations well enough to gate on (``relation_keys.py``: AUC 0.68-0.88). The
unedited model itself knows which question is asked: on a question about the edited fact it is
about to say the fact's old object o. This reads, for every request of a TUNING file, the rank of
o's first token in the unedited model's next-token distribution at the last token of

* the edit prompt (the edit must reach it),
* its paraphrase prompts (same subject, same relation: the edit must reach them),
* ``--per-subject`` questions of OTHER relations about the same subject (one template per relation of
  the file, filled with the subject: the edit must not reach them),

and reports, per rank cut k, the share of each set with rank(o) <= k (a gate "o is among the unedited
model's top k" passes it), and the same for a probability cut p(o) >= θ.

    python benchmarks/real_model/answer_gate.py --requests runs/stream-derived/tune.json \\
        --json runs/real/answer-gate.json
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--requests", required=True, help="a TUNING file (never the evaluation stream)")
    ap.add_argument("--ranks", default="1,2,3,5,10,20,50,100")
    ap.add_argument("--probs", default="0.001,0.005,0.01,0.02,0.05,0.1")
    ap.add_argument("--per-subject", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import random

    import torch

    torch.set_num_threads(args.threads)
    from superedit.analysis.tracing import target_token_id
    from superedit.commands.common import local_model_dir, resolve_requests
    from superedit.models import encode_prompts, load_model

    from gate_separation import other_relation_templates, paraphrase_templates, relation_templates

    adapter = load_model(args.model)
    reqs = resolve_requests(local_model_dir(args.model), args.requests)
    ranks_cut = [int(x) for x in args.ranks.split(",")]
    probs_cut = [float(x) for x in args.probs.split(",")]
    guard_cuts = [0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6]
    sets = {"edit_prompts": [(i, r.prompt) for i, r in enumerate(reqs)],
            "paraphrases": paraphrase_templates(reqs),
            "other_relation": other_relation_templates(reqs, relation_templates(reqs), args.per_subject,
                                                       random.Random(args.seed))}

    def rank_and_prob(pairs):
        ranks, probs, dists, tops = [], [], [], []
        for s in range(0, len(pairs), 64):
            chunk = pairs[s:s + 64]
            b = encode_prompts(adapter.tokenizer, [t for _, t in chunk], [reqs[i].subject for i, _ in chunk],
                               padding_side="right", device=adapter.device)
            with torch.no_grad():
                logits = adapter.model(**b.model_inputs()).logits
            p = logits[torch.arange(len(chunk)), torch.tensor(b.last_token)].float().softmax(-1)
            o = torch.tensor([target_token_id(adapter.tokenizer, t.format(reqs[i].subject), reqs[i].target_true)
                              for i, t in chunk], device=p.device)
            po = p[torch.arange(len(chunk)), o]
            new = torch.tensor([target_token_id(adapter.tokenizer, t.format(reqs[i].subject), reqs[i].target_new)
                                for i, t in chunk], device=p.device)
            top = p.max(-1)
            other = (top.indices != o) & (top.indices != new)
            tops += torch.where(other, top.values, torch.zeros_like(top.values)).tolist()
            ranks += (1 + (p > po[:, None]).sum(-1)).tolist()
            probs += po.tolist()
            dists.append(p)
        return ranks, probs, torch.cat(dists), tops

    result = {"requests": args.requests, "sets": {}}
    anchor = None
    overlap = {}
    for name, pairs in sets.items():
        ranks, probs, dist, tops = rank_and_prob(pairs)
        if anchor is None:
            anchor = dist
        own = torch.tensor([i for i, _ in pairs])
        overlap[name] = torch.minimum(dist, anchor[own]).sum(-1)  # 1 - total variation to the edit prompt's
        n = len(ranks)
        row = {"n": n, "rank_le": {k: sum(r <= k for r in ranks) / n for k in ranks_cut},
               "prob_ge": {t: sum(p >= t for p in probs) / n for t in probs_cut},
               "median_rank": sorted(ranks)[n // 2],
               # the share a confidence guard would protect: the unedited top-1 is neither o nor the new
               # target and has probability >= θ
               "confident_other_ge": {t: sum(p >= t for p in tops) / n for t in guard_cuts}}
        result["sets"][name] = row
        print(f"{name} (n {n}): median rank {row['median_rank']}; " +
              ", ".join(f"rank<={k}: {v:.3f}" for k, v in row["rank_le"].items()) + "; " +
              ", ".join(f"p>={t}: {v:.3f}" for t, v in row["prob_ge"].items()))
        print("   unedited top-1 neither o nor the new target, p >= θ: " +
              ", ".join(f"{t}: {v:.3f}" for t, v in row["confident_other_ge"].items()))
    pos, neg = overlap["paraphrases"], overlap["other_relation"]
    auc = float((pos[:, None] > neg[None, :]).float().mean())
    cuts = [0.1, 0.2, 0.3, 0.4, 0.5]
    result["distribution_overlap"] = {"auc": auc, "by_cut": [
        {"cut": c, "paraphrases_above": float((pos > c).float().mean()),
         "other_relation_above": float((neg > c).float().mean())} for c in cuts]}
    print(f"next-token distribution overlap with the edit prompt's (sum of min): AUC {auc:.3f}; " + ", ".join(
        f"> {b['cut']}: {b['paraphrases_above']:.3f} / {b['other_relation_above']:.3f}"
        for b in result["distribution_overlap"]["by_cut"]))
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
