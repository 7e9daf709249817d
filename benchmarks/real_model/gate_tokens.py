"""How many subject tokens must a ``gated`` entry match? Firing on a TUNING split, per gate_tokens and τ.

``gated`` with ``gate_tokens`` m fires entry e at a token where the token's key and the keys of the
m − 1 tokens before it match e's keys at its subject's last m tokens (whitening cosine above τ, in one
of e's contexts). This builds, for every request of a TUNING file, the entry ``gated_step`` would
store (its keys in every v* context; no v*: values are zero, so the model's output is unchanged),
installs the memory with the library's own gate, and counts where entries fire:

* own prompts: the request's prompt fires its own entry (some token);
* paraphrases: each paraphrase prompt fires its own request's entry (the edit must carry over);
* foreign texts: neighbourhood and attribute prompts of every request, and the requests' own
  prompts, each checked against the entries whose subject the text does not contain — a firing
  there writes an edit's value change into text about another subject (neighbourhood prompts: other
  subjects with the same relation and answer, the hard cases).

    python benchmarks/real_model/gate_tokens.py --requests runs/stream-derived/tune.json \\
        --json runs/real/gate-tokens.json
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--requests", required=True, help="a TUNING file (never the evaluation stream)")
    ap.add_argument("--tokens", default="1,2,3,4", help="gate_tokens values to compare")
    ap.add_argument("--taus", default="0.7,0.75,0.8,0.85,0.9")
    ap.add_argument("--taus-before", default="same",
                    help="thresholds for the tokens before the last ('same': each τ; else a list, crossed with --taus)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("gate_tokens")
    from superedit.commands.common import load_with_profile, make_stats, resolve_requests
    from superedit.editing.contexts import context_prefixes
    from superedit.editing.keys import context_tail_keys
    from superedit.editing.methods.gated import install_memory, installed_gate, make_gated_state, remove_memory
    from superedit.models import Trace

    tokens = [int(x) for x in args.tokens.split(",")]
    taus = [float(x) for x in args.taus.split(",")]
    adapter, mdir, hp = load_with_profile(args.model, "gated")
    layer = hp.layers[0]
    stats = make_stats(adapter, hp)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    reqs = resolve_requests(mdir, args.requests)
    K, V = context_tail_keys(adapter, [r.prompt for r in reqs], [r.subject for r in reqs], layer, prefixes,
                             max(tokens))
    n = len(reqs)
    own = [(i, r.prompt.format(r.subject)) for i, r in enumerate(reqs)]
    para = [(i, p) for i, r in enumerate(reqs) for p in r.paraphrase_prompts]
    foreign = sorted({p for r in reqs for p in (*r.neighborhood_prompts, *r.attribute_prompts)}
                     | {t for _, t in own})
    allowed = torch.tensor([[r.subject not in t for r in reqs] for t in foreign])  # (texts, n): may not fire
    log.info("%d requests, %d contexts; %d own, %d paraphrase, %d foreign texts", n, len(prefixes), len(own),
             len(para), len(foreign))
    tok = adapter.tokenizer

    def fired_entries(texts: list[str]) -> torch.Tensor:
        """(texts, n) bool: entry fired at some (unpadded) token of the text."""
        gate = installed_gate(adapter, layer)
        out = []
        for s in range(0, len(texts), 32):
            enc = tok(texts[s:s + 32], return_tensors="pt", padding=True, padding_side="right")
            with torch.no_grad(), Trace(adapter, reads=[("resid", layer)], stop_after=True):  # after the gate ran
                adapter.model(**enc)
            out.append((gate.last_fire_entries & enc["attention_mask"].bool()[..., None]).any(1))
        return torch.cat(out)

    neigh = {p for r in reqs for p in r.neighborhood_prompts}
    is_neigh = torch.tensor([t in neigh for t in foreign])
    rows = []
    befores = [None] if args.taus_before == "same" else [float(x) for x in args.taus_before.split(",")]
    grid = [(m, tau, tb) for m in tokens for tau in taus for tb in (befores if m > 1 else [None])]
    for m, tau, tb in grid:
        mem = make_gated_state(adapter, hp.replace(gate_tokens=m, tau=tau, tau_before=tb), stats)
        mem.add({f"layer.{layer}.keys": K[:, :, :m], f"layer.{layer}.valid": V[:, :, :m],
                 f"layer.{layer}.values": torch.zeros(n, adapter.d_model),
                 f"layer.{layer}.uid": torch.arange(n)})
        install_memory(adapter, mem, record=True)
        try:
            f_own = fired_entries([t for _, t in own])
            f_para = fired_entries([t for _, t in para])
            f_for = fired_entries(foreign) & allowed
        finally:
            remove_memory(adapter, layer)
        own_ok = float(f_own[torch.arange(n), torch.arange(n)].float().mean())
        para_ok = float(f_para[torch.arange(len(para)), torch.tensor([i for i, _ in para])].float().mean())
        row = {"gate_tokens": m, "tau": tau, "tau_before": tau if tb is None else tb, "own_fires": own_ok,
               "paraphrase_fires": para_ok,
               "foreign_texts_firing": float(f_for.any(1).float().mean()),
               "neighbourhood_texts_firing": float(f_for[is_neigh].any(1).float().mean()),
               "n_foreign": len(foreign), "n_neighbourhood": int(is_neigh.sum()), "n_paraphrase": len(para)}
        rows.append(row)
        log.info("m %d τ %.2f τ_before %.2f: own %.3f, paraphrase %.3f | foreign texts firing %.4f, "
                 "neighbourhood %.4f", m, tau, row["tau_before"], own_ok, para_ok, row["foreign_texts_firing"],
                 row["neighbourhood_texts_firing"])
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"model": args.model, "requests": args.requests, "layer": layer,
                                      "contexts": len(prefixes), "rows": rows})


if __name__ == "__main__":
    main()
