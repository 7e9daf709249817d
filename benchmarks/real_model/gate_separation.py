"""Can a subject's key tell its own prompts from everything else? The measurement behind ``gated``.

A gated edit fires where the key k (input of the MLP down-projection) is close to one of the edit's
keys in whitening cosine, cos_C(k, k*) = kᵀC⁻¹k* / √(kᵀC⁻¹k · k*ᵀC⁻¹k*). Both rules are measured:
against ROME's k* (the average over the context prefixes) and against the closest of the edit's keys
in each context (what ``gated`` does: "any context"). For every request of a TUNING
file and every layer asked, this reads

* positives: the key at the subject's last token of each paraphrase prompt (the subject written into
  another template) and of each context-prefixed prompt v* is optimised on;
* negatives: the keys at EVERY token of every prompt that does not contain the request's subject —
  its neighbourhood prompts (other subjects, same relation and answer: the hard cases), its attribute
  prompts, and the other requests' prompts;

and prints, per layer, the quantiles of the positive cosines, the largest negative cosine per request,
and for thresholds τ the share of paraphrase keys above τ (they would get the edit) against the share
of requests with any negative token above τ (some other text would get it).

    python benchmarks/real_model/gate_separation.py --requests runs/stream-derived/tune.json \\
        --layers 1,2,3,4 --json runs/real/gate-separation.json
"""

from __future__ import annotations

import argparse


def template_of(prompt: str, subject: str) -> str | None:
    """``prompt`` with its first occurrence of ``subject`` replaced by ``{}`` (None if absent)."""
    i = prompt.find(subject)
    if i < 0:
        return None
    return prompt[:i].replace("{", "{{").replace("}", "}}") + "{}" + \
        prompt[i + len(subject):].replace("{", "{{").replace("}", "}}")


def relation_templates(reqs) -> dict[str, str]:
    """One template per relation: the first request's prompt of each relation id, in file order."""
    templates: dict[str, str] = {}
    for r in reqs:
        templates.setdefault(r.fact_key[1], r.prompt)
    return templates


def paraphrase_templates(reqs) -> list[tuple[int, str]]:
    """(request index, template) for every paraphrase prompt that contains its request's subject."""
    return [(i, t) for i, r in enumerate(reqs) for p in r.paraphrase_prompts
            if (t := template_of(p, r.subject)) is not None]


def other_relation_templates(reqs, templates: dict[str, str], per_subject: int, rng) -> list[tuple[int, str]]:
    """(request index, template): per request, a draw of ``per_subject`` templates of OTHER relations (the
    questions an edit of the request's fact should leave alone), in request order."""
    out = []
    for i, r in enumerate(reqs):
        pool = sorted(t for rel, t in templates.items() if rel != r.fact_key[1])
        out += [(i, t) for t in rng.sample(pool, min(per_subject, len(pool)))]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--requests", required=True, help="a TUNING file (never the evaluation stream)")
    ap.add_argument("--layers", default="1,2,3,4")
    ap.add_argument("--method", default="alphaedit", help="whose profile gives C's corpus, ridge and the prefixes")
    ap.add_argument("--taus", default="0.5,0.6,0.7,0.75,0.8,0.85,0.9,0.95")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from superedit.commands.common import load_with_profile, make_stats, resolve_requests
    from superedit.editing.contexts import context_prefixes
    from superedit.editing.keys import compute_keys, context_keys, keys_at
    from superedit.models import Trace
    from superedit.stats.whitening import Whitener

    layers = [int(x) for x in args.layers.split(",")]
    taus = [float(x) for x in args.taus.split(",")]
    adapter, mdir, hp = load_with_profile(args.model, args.method)
    hp = hp.replace(layers=layers)
    stats = make_stats(adapter, hp)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    reqs = resolve_requests(mdir, args.requests)
    k_star = compute_keys(adapter, [r.prompt for r in reqs], [r.subject for r in reqs], layers, prefixes,
                          hp.fact_token)
    k_ctx = context_keys(adapter, [r.prompt for r in reqs], [r.subject for r in reqs], layers, prefixes,
                         hp.fact_token)
    para = paraphrase_templates(reqs)
    k_para = keys_at(adapter, [t for _, t in para], [reqs[i].subject for i, _ in para], layers, hp.fact_token)
    para_owner = torch.tensor([i for i, _ in para])

    # negatives: every token of every prompt (neighbourhood, attribute, other requests' own prompts)
    texts = sorted({p for r in reqs for p in (*r.neighborhood_prompts, *r.attribute_prompts)}
                   | {r.prompt.format(r.subject) for r in reqs})
    tok = adapter.tokenizer
    neg_keys = {l: [] for l in layers}
    neg_text = []
    with torch.no_grad():
        for s in range(0, len(texts), 32):
            chunk = texts[s:s + 32]
            enc = tok(chunk, return_tensors="pt", padding=True, padding_side="right")
            with Trace(adapter, reads=[("key", l) for l in layers], stop_after=True) as tr:
                adapter.model(**enc)
            mask = enc["attention_mask"].bool()
            for l in layers:
                neg_keys[l].append(tr["key", l][mask])
            neg_text += [s + j for j in range(len(chunk)) for _ in range(int(mask[j].sum()))]
    neg_text = torch.tensor(neg_text)
    # a negative token may not come from a prompt that contains the request's own subject
    own = torch.tensor([[r.subject in texts[t] for t in range(len(texts))] for r in reqs])  # (n_req, n_texts)
    own_tok = own[:, neg_text]  # (n_req, n_tokens)

    rows = []
    for l in layers:
        W = Whitener(stats.mom2(l), hp.mom2_ridge, layer=l)

        def unit(K):
            Y = W.whiten(K.reshape(-1, K.shape[-1]))
            return Y / Y.norm(dim=1, keepdim=True).clamp_min(1e-30)

        Zs = unit(k_star[l])
        Zn = unit(torch.cat(neg_keys[l]))
        pos_para = (unit(k_para[l]) * Zs[para_owner]).sum(1)
        pos_ctx = (unit(k_ctx[l]).reshape(len(reqs), len(prefixes), -1) * Zs[:, None]).sum(-1)  # (n, n_pre)
        neg = Zs @ Zn.T
        neg[own_tok] = -1.0
        # gated's rule: the closest of the edit's context keys (one per prefix, and the bare prompt)
        Zc = unit(k_ctx[l]).reshape(len(reqs), len(prefixes), -1)
        para_any = torch.einsum("pd,pcd->pc", unit(k_para[l]), Zc[para_owner]).amax(1)
        neg_any = torch.einsum("td,rcd->rtc", Zn, Zc).amax(-1)
        neg_any[own_tok] = -1.0
        neg_max = neg.max(1).values  # per request: the closest foreign token
        q = lambda t: [round(float(x), 3) for x in torch.quantile(t.float(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))]
        row = {"layer": l, "n_requests": len(reqs), "n_paraphrases": len(para), "n_negative_tokens": int(Zn.shape[0]),
               "paraphrase_q05_25_50_75_95": q(pos_para), "context_min_q05_50": q(pos_ctx.min(1).values)[:3:2],
               "negative_max_q05_25_50_75_95": q(neg_max),
               "by_tau": [{"tau": t, "paraphrase_fires": float((pos_para > t).float().mean()),
                           "context_all_fire": float((pos_ctx.min(1).values > t).float().mean()),
                           "requests_with_foreign_firing": float((neg_max > t).float().mean()),
                           "foreign_token_rate": float((neg > t).sum() / (~own_tok).sum()),
                           "any_context_paraphrase_fires": float((para_any > t).float().mean()),
                           "any_context_requests_with_foreign_firing": float((neg_any.amax(1) > t).float().mean()),
                           "any_context_foreign_token_rate": float((neg_any > t).sum() / (~own_tok).sum())}
                          for t in taus]}
        rows.append(row)
        print(f"layer {l}: paraphrase cos quantiles {row['paraphrase_q05_25_50_75_95']}; "
              f"closest foreign token per request {row['negative_max_q05_25_50_75_95']}")
        for b in row["by_tau"]:
            print(f"   τ {b['tau']:.2f}: paraphrases fire {b['paraphrase_fires']:.3f}, all contexts fire "
                  f"{b['context_all_fire']:.3f}, requests with a foreign token firing "
                  f"{b['requests_with_foreign_firing']:.3f}, foreign tokens firing {b['foreign_token_rate']:.2e} | "
                  f"any context: paraphrases {b['any_context_paraphrase_fires']:.3f}, requests with a foreign token "
                  f"{b['any_context_requests_with_foreign_firing']:.3f}, foreign tokens "
                  f"{b['any_context_foreign_token_rate']:.2e}")
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"model": args.model, "requests": args.requests, "method_profile": args.method,
                                      "rows": rows})


if __name__ == "__main__":
    main()
