"""Where a gated ledger's entries act: own prompts, paraphrases, and text about other subjects.

Applies a ``gated`` ledger (its entries, keys in every context, values, whitening factor) to the base
model and counts, token by token, where some entry fires (whitening cosine to one of its context keys
above τ):

* own prompts: the edited prompt, is the entry firing at the subject's last token?
* paraphrases: any token of each paraphrase prompt (the entry must fire for the edit to carry over);
* the retention probe: every token of the probe's prompts (facts the stream never edits) — each firing
  there writes some edit's value change into an unrelated fact;
* neighbourhood prompts (other subjects, same relation and answer) whose subject the stream never
  edits, as the checkpoints score them (``lifelong.runner.unedited_neighbours``).

    python benchmarks/real_model/gated_firing.py --ledger runs/real/ll1000-gated/gated/ledger \\
        --stream runs/real/ll1000-gated/stream.jsonl --probe runs/stream-derived/known-top1/known.json \\
        --json runs/real/gated-firing.json
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--ledger", required=True)
    ap.add_argument("--stream", required=True,
                    help="the run's stream.jsonl (the order the ledger edited; `superedit lifelong` shuffles --requests)")
    ap.add_argument("--probe", required=True, help="the retention probe's facts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--examples", type=int, default=0,
                    help="also list this many firings per row: the text, the token, the entry's subject")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from superedit.commands.common import local_model_dir, resolve_requests
    from superedit.editing.methods.gated import installed_gate
    from superedit.lifelong.ledger import Ledger
    from superedit.lifelong.runner import unedited_neighbours
    from superedit.models import load_model

    adapter = load_model(args.model)
    led = Ledger.open(args.ledger)
    led.apply_to(adapter)
    layer = led.state.layer
    if args.examples:
        from superedit.editing.methods.gated import install_memory

        install_memory(adapter, led.state, record=True)  # which entry fired where
    gate = installed_gate(adapter, layer)
    n_done = len(led.state)
    mdir = local_model_dir(args.model)
    stream = resolve_requests(mdir, args.stream)[:n_done]
    edited = {r.subject for r in stream}
    probe = [r for r in resolve_requests(mdir, args.probe) if r.subject not in edited]
    tok = adapter.tokenizer

    def tokens_firing(texts: list[str]) -> tuple[int, int, int, list]:
        """(texts with a firing token, tokens firing, tokens, examples) over ``texts``."""
        hit_texts = fired = total = 0
        examples = []
        for s in range(0, len(texts), 32):
            chunk = texts[s:s + 32]
            enc = tok(chunk, return_tensors="pt", padding=True, padding_side="right")
            with torch.no_grad():
                adapter.model(**enc)
            mask = enc["attention_mask"].bool()
            fire = gate.last_fire if gate.last_fire is not None else torch.zeros_like(mask)
            per_row = (fire & mask).sum(1)  # padding (right) never counts
            fired += int(per_row.sum())
            hit_texts += int((per_row > 0).sum())
            total += int(mask.sum())
            if args.examples and len(examples) < args.examples and gate.last_fire_entries is not None:
                for r, t, e in torch.nonzero(gate.last_fire_entries & mask[..., None]).tolist():
                    examples.append({"text": chunk[r], "token": tok.decode(enc["input_ids"][r, t]),
                                     "entry_subject": stream[e].subject, "entry_prompt": stream[e].prompt})
        return hit_texts, fired, total, examples[:args.examples]

    rows = {}
    for name, texts in [("own prompts", [r.prompt.format(r.subject) for r in stream]),
                        ("paraphrases", [p for r in stream for p in r.paraphrase_prompts]),
                        ("retention probe prompts", [r.prompt.format(r.subject) for r in probe]),
                        ("neighbourhood prompts (unedited subjects)",
                         [p for r in unedited_neighbours(stream, stream) for p in r.neighborhood_prompts])]:
        hit, fired, total, examples = tokens_firing(texts)
        rows[name] = {"texts": len(texts), "texts_with_a_firing_token": hit, "share": hit / max(1, len(texts)),
                      "tokens_firing": fired, "tokens": total}
        if examples:
            rows[name]["examples"] = examples
            for x in examples:
                print(f"    {x['token']!r:>14} in {x['text']!r}  <- entry {x['entry_subject']!r}")
        print(f"{name:42s} {len(texts):6d} texts: {hit / max(1, len(texts)):.3f} with a firing token "
              f"({fired} of {total} tokens)")
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"ledger": args.ledger, "entries": n_done, "layer": layer,
                                      "tau": led.hparams().tau, "rows": rows})


if __name__ == "__main__":
    main()
