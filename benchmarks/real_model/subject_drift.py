"""What an edit does to its subject's OTHER facts: top-1 answers of other-relation prompts, before and after.

An edit of (subject, relation) writes a value change where the subject is read; every question about
that subject reads it too. This applies a ledger (any method) to the base model and asks, for each
subject the ledger edited, the questions of the OTHER relations found in ``--templates`` (one template
per relation: the requests' own prompts, e.g. the TUNING file's), filled with that subject: is the
model's top-1 next token the same as the unedited model's? The same templates filled with subjects
the stream never edits (``--control``) give the drift every text sees.

    python benchmarks/real_model/subject_drift.py --ledger runs/gated-tune/p0/gated/ledger \\
        --stream runs/gated-tune/p0/stream.jsonl --templates runs/stream-derived/tune.json \\
        --control runs/gated-tune/probe.json --json runs/gated-tune/p0-drift.json
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--ledger", required=True)
    ap.add_argument("--stream", required=True, help="the run's stream.jsonl (the ledger's order)")
    ap.add_argument("--templates", required=True, help="requests whose prompts give one template per relation")
    ap.add_argument("--control", required=True, help="requests whose subjects (never edited) fill the same templates")
    ap.add_argument("--per-subject", type=int, default=8, help="other-relation questions per subject (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import random

    import torch

    torch.set_num_threads(args.threads)
    from superedit.analysis.tracing import target_token_id
    from superedit.commands.common import local_model_dir, resolve_requests
    from superedit.eval.metrics import bootstrap_ci
    from superedit.lifelong.ledger import Ledger
    from superedit.models import encode_prompts, load_model

    from gate_separation import relation_templates

    adapter = load_model(args.model)
    mdir = local_model_dir(args.model)
    led = Ledger.open(args.ledger)
    n_done = sum(len(e["requests"]) for e in led.edits if e["status"] == "applied")
    stream = resolve_requests(mdir, args.stream)[:n_done]
    templates = relation_templates(resolve_requests(mdir, args.templates))
    edited = {r.subject for r in stream}
    rng = random.Random(args.seed)

    def questions(reqs) -> tuple[list[tuple[str, str]], list[int]]:
        out, new_first = [], []
        for r in reqs:
            others = sorted(t for rel, t in templates.items() if rel != r.fact_key[1])
            chosen = rng.sample(others, min(args.per_subject, len(others)))
            out += [(t, r.subject) for t in chosen]
            new_first += [target_token_id(adapter.tokenizer, r.prompt.format(r.subject), r.target_new)] * len(chosen)
        return out, new_first

    asked, asked_new = questions(stream)
    control, _ = questions([r for r in resolve_requests(mdir, args.control) if r.subject not in edited])

    def top1(pairs) -> tuple[list[int], list[float]]:
        ids, probs = [], []
        for s in range(0, len(pairs), 64):
            chunk = pairs[s:s + 64]
            b = encode_prompts(adapter.tokenizer, [t for t, _ in chunk], [x for _, x in chunk], padding_side="right",
                               device=adapter.device)
            with torch.no_grad():
                logits = adapter.model(**b.model_inputs()).logits
            p = logits[torch.arange(len(chunk)), torch.tensor(b.last_token)].float().softmax(-1)
            top = p.max(-1)
            ids += top.indices.tolist()
            probs += top.values.tolist()
        return ids, probs

    before = {name: top1(pairs) for name, pairs in (("edited_subjects", asked), ("control", control))}
    led.apply_to(adapter)
    result = {"ledger": args.ledger, "n_edits": len(stream), "n_relations": len(templates)}
    for name, pairs in (("edited_subjects", asked), ("control", control)):
        after, _ = top1(pairs)
        ids, probs = before[name]
        same = [float(a == b) for a, b in zip(after, ids)]
        confident = [s for s, p in zip(same, probs) if p >= 0.2]
        to_new = [float(a == t) for a, b, t in zip(after, ids, asked_new) if a != b] if name == "edited_subjects" else []
        result[name] = {"n": len(same), "unchanged": sum(same) / max(1, len(same)), "ci": bootstrap_ci(same),
                        "changed_to_edit_target": sum(to_new) / len(to_new) if to_new else None,
                        "n_confident": len(confident),
                        "unchanged_confident": sum(confident) / max(1, len(confident)),
                        "ci_confident": bootstrap_ci(confident) if confident else None}
        print(f"{name}: top-1 unchanged {result[name]['unchanged']:.3f} {result[name]['ci']} (n {len(same)}); "
              f"where the unedited top-1 had p >= 0.2: {result[name]['unchanged_confident']:.3f} "
              f"(n {len(confident)})" + (f"; changed answers that are the edit's new target: "
                                         f"{result[name]['changed_to_edit_target']:.3f}" if to_new else ""))
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
