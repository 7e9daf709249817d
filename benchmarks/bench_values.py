"""Per-edit v* optimisation time against its floor and against a ROME-style compute_v, in one run.

For each of N requests (ROME's setting: one request per optimisation, at ROME's layer and value
site, the model's profile; default ``pretrained:smollm2-135m``), all at the SAME fixed number of steps
(early stop off, so every variant does the same optimisation and reaches the same final NLL):

* ``after``: ``superedit.editing.values.optimize_value`` (resumes at the edited block from its cached
  input and after the positions before δ (KV cache), head only at read positions, KL prompts in
  their own short pass);
* ``before``: the implementation before that change, the verbatim copy kept in
  ``tests/test_values_speed.py`` as the specification (every step forwards every row from the
  embeddings; the v₀ pass runs the whole model);
* ``rome_style``: a re-implementation of the computation ROME's ``compute_v`` does (rome/compute_v.py,
  Meng et al. 2022): prompts and KL prompts padded into one batch, a full forward with the model's
  logits at every position of every row, the final norm and head applied again to the prompts' last
  residual at every position for the NLL, v₀ read in the first step. Same loss (NLL + KL + decay),
  same Adam, clamp and δ site as superedit; it is NOT ROME's code (no early stop here either);
* ``floor_full`` / ``floor_layer`` / ``floor_fast``: one forward + backward of the loss's rows, head
  only at the positions the loss reads, no bookkeeping, median of ``--floor-reps`` passes × steps:
  from the embeddings at every position (issue #15's floor) / from the edited block's cached input at
  every position (the lowered floor) / what a step of ``after`` computes (also skipping the
  positions before δ).

    python benchmarks/bench_values.py --threads 1 --n 3 [--model pretrained:smollm2-135m] [--requests FILE] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
import time
from pathlib import Path


def rome_style_values(adapter, prompt, subject, target, layer, hp, prefixes):
    """ROME compute_v's computation (see the module docstring); returns (v*, final NLL)."""
    import torch
    import torch.nn.functional as F

    from superedit.editing.values import KL_TEMPLATES, kl_rows_divergence
    from superedit.models import Trace, encode_prompt_target, encode_prompts
    from superedit.models.hooks import add_at_positions
    from superedit.models.positions import fill_template

    tok, dev = adapter.tokenizer, adapter.device
    filled = [fill_template(pre + prompt, subject) for pre in prefixes]
    rw = encode_prompt_target(tok, [f[0] for f in filled], [target] * len(prefixes),
                              subject_spans=[(f[1], f[2]) for f in filled], device=dev)
    kl = encode_prompts(tok, KL_TEMPLATES, [subject] * len(KL_TEMPLATES), padding_side="right", device=dev)
    width = max(rw.input_ids.shape[1], kl.input_ids.shape[1])

    def pad(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([pad(rw.input_ids, tok.pad_token_id), pad(kl.input_ids, tok.pad_token_id)])
    att = torch.cat([pad(rw.attention_mask, 0), pad(kl.attention_mask, 0)])
    lookup = list(rw.subject_last) + list(kl.subject_last)
    n_rw, last = len(prefixes), adapter.n_layers - 1
    mask, labels = rw.loss_mask()
    mask, labels = pad(mask, 0.0), pad(labels, 0)
    kl_rows = torch.arange(n_rw, n_rw + len(KL_TEMPLATES))
    kl_idx = torch.tensor(kl.subject_last)
    delta = torch.zeros(adapter.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    v0 = kl_init = None
    nll = None
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        with Trace(adapter, reads=[("value", layer), ("resid", last)], detach=False,
                   edits={("value", layer): add_at_positions(lookup, delta)}) as tr:
            logits = adapter.model(input_ids=ids, attention_mask=att).logits  # every position, every row
        if v0 is None:
            v0 = tr["value", layer][0, lookup[0]].detach().clone()
        kl_logp = F.log_softmax(logits[kl_rows, kl_idx], dim=-1)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        full = adapter.lm_head()(adapter.final_norm()(tr["resid", last][:n_rw]))  # the head again, all positions
        logp = torch.log_softmax(full.float(), dim=2).gather(2, labels.unsqueeze(2)).squeeze(2)
        nll = (-(logp * mask).sum(1) / mask.sum(1)).mean()
        loss = (nll + hp.kl_factor * kl_rows_divergence(kl_logp, kl_init, hp.kl_direction).mean()
                + hp.v_weight_decay * delta.norm() / v0.norm() ** 2)
        if it == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * v0.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return v0 + delta.detach(), float(nll.detach())


def floor_pass_seconds(adapter, prompt, subject, target, layer, hp, prefixes, reps, mode):
    """Median seconds of one forward + backward of the loss's rows (prompts, KL prompts) with the head
    only at the read positions, no bookkeeping. ``mode``: ``full`` from the embeddings at every
    position; ``layer`` from the edited block's cached input at every position; ``fast`` what a step
    of ``optimize_values`` computes (from the edited block and from δ's position, KV cache before)."""
    import torch
    import torch.nn.functional as F

    from superedit.editing.values import _head, _prepare_rows, value_rows

    last = adapter.n_layers - 1
    nll, kl = value_rows(adapter, [(prompt, subject, target)], prefixes)
    prepared = []
    for rows in (nll, kl):
        fast, _ = _prepare_rows(adapter, rows, layer, "value", last)
        if mode == "full":
            fast = rows.plan(adapter, by_split=False)
        elif mode == "layer":
            fast = type(fast)(**{**vars(fast), "groups": None}).plan(adapter, by_split=False)
        prepared.append(fast)
    delta = torch.zeros(1, adapter.d_model, dtype=adapter.dtype, requires_grad=True)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        loss = 0.0
        for rows in prepared:
            h = rows.forward_reads(adapter, "value", layer, delta[rows.owner], last)
            loss = loss + F.log_softmax(_head(adapter, h).float(), -1).max(-1).values.sum()
        loss.backward()
        times.append(time.perf_counter() - t0)
        delta.grad = None
    return st.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--requests", default=None,
                    help="dataset file (default: ../shared/data/counterfact_sample.json beside the repository; "
                         "a testbed model's own requests when that is absent)")
    ap.add_argument("--n", type=int, default=3, help="requests (one v* optimisation each)")
    ap.add_argument("--steps", type=int, default=None, help="gradient steps (default: the profile's)")
    ap.add_argument("--floor-reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_values_speed import reference_optimize_values

    from superedit.commands.common import load_with_profile, resolve_requests
    from superedit.editing.contexts import context_prefixes
    from superedit.editing.values import optimize_value

    adapter, mdir, hp = load_with_profile(args.model, "rome")
    update = {"v_early_stop_nll": 0.0}
    if args.steps:
        update["v_num_grad_steps"] = args.steps
    hp = hp.model_copy(update=update)
    layer = hp.layers[0]
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact_sample.json"
    requests = args.requests or (str(default) if default.exists() and not args.model.startswith("builtin") else None)
    reqs = resolve_requests(mdir, requests, n=args.n, seed=0)
    steps = hp.v_num_grad_steps
    warm = reqs[0]  # one-time costs out of the timings: the fast plan's check (once per model and layer), allocator
    optimize_value(adapter, warm.prompt, warm.subject, warm.target_new, layer, "value",
                   hp.model_copy(update={"v_num_grad_steps": 1}), prefixes)
    rows = []
    for r in reqs:
        item = (r.prompt, r.subject, r.target_new)
        row = {"subject": r.subject, "target": r.target_new}
        t0 = time.perf_counter()
        after = optimize_value(adapter, *item, layer, "value", hp, prefixes)
        row["after_s"], row["after_nll"] = time.perf_counter() - t0, after.final_nll
        t0 = time.perf_counter()
        before = reference_optimize_values(adapter, [item], layer, "value", hp, prefixes)[0]
        row["before_s"], row["before_nll"] = time.perf_counter() - t0, before["history"][-1]
        t0 = time.perf_counter()
        v_rome, row["rome_style_nll"] = rome_style_values(adapter, *item, layer, hp, prefixes)
        row["rome_style_s"] = time.perf_counter() - t0
        for mode in ("full", "layer", "fast"):
            row[f"floor_{mode}_s"] = steps * floor_pass_seconds(adapter, *item, layer, hp, prefixes, args.floor_reps, mode)
        row["v_rel_diff_after_before"] = float((after.target - before["target"]).norm() / before["target"].norm())
        row["v_rel_diff_after_rome_style"] = float((after.target - v_rome).norm() / v_rome.norm())
        rows.append(row)
        print(json.dumps(row), flush=True)
    mean = {k: st.mean(row[k] for row in rows) for k in rows[0] if k.endswith("_s")}
    summary = {
        "model": args.model, "layer": layer, "steps": steps, "rows_per_step": len(prefixes),
        "threads": torch.get_num_threads(), "n": len(rows), **{f"mean_{k}": v for k, v in mean.items()},
        "after_over_floor_layer": mean["after_s"] / mean["floor_layer_s"],
        "after_over_floor_fast": mean["after_s"] / mean["floor_fast_s"],
        "before_over_floor_full": mean["before_s"] / mean["floor_full_s"],
        "rome_style_over_floor_full": mean["rome_style_s"] / mean["floor_full_s"],
        "speedup_vs_before": mean["before_s"] / mean["after_s"],
        "speedup_vs_rome_style": mean["rome_style_s"] / mean["after_s"],
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
