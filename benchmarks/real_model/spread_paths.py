"""Where does each layer's share of MEMIT's residual go? The spread's path through the layers after it.

MEMIT (``editing/methods/spread.py``) edits layers l_1 < … < l_n in order; at step i it asks layer l_i
for r_i = (z − h_L) / (n − i) at the subject's last token (h_L: the residual after the last edited
layer L on the model carrying the earlier increments), expecting the rest of the network to pass r_i on
to h_L unchanged. This runs the library's spread with MEMIT's solve, reads the model between steps and
splits each step's change of h_L into

* direct: the edited layer's own MLP contribution (N_l(m′) − N_l(m) where the family normalises the MLP
  output, Gemma 3; the down-projection's output change otherwise), which the solve aims at r_i;
* downstream attention and downstream MLP: what the blocks between l_i and L add in response
  (Δresid_j − Δresid_{j−1} split into the MLP's contribution and the rest, which is attention);

and reports, per step, their norms, their components along r̂_i (negative: they cancel the edit), and
‖z − h_L‖ before and after against the (n − i − 1)/(n − i) share a lossless pass would leave. Read on
the bare prompts (the residual the spread itself measures). z comes from a saved ``targets.pt``
(``alphaedit_sweep.py``) or is optimised here.

    python benchmarks/real_model/spread_paths.py --model pretrained:gemma3-270m \\
        --requests runs/known-gemma/tune.json --limit 24 --layers 1,2,3,4 \\
        --targets runs/real/gemma-memit-l1-4/targets.pt --json runs/real/gemma-spread-paths.json
"""

from __future__ import annotations

import argparse
import logging


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", default=None, help="a request file (default: a testbed's own)")
    ap.add_argument("--limit", type=int, default=24, help="first N requests, edited as one batch")
    ap.add_argument("--layers", required=True, help="edited layers, e.g. '1,2,3,4'")
    ap.add_argument("--targets", default=None,
                    help="targets.pt from alphaedit_sweep.py for the same requests, layers and value settings "
                         "(default: optimise z here)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("spread_paths")
    from superedit.commands.common import build_hparams, hparams_profile, local_model_dir, make_stats, resolve_requests
    from superedit.editing.contexts import context_prefixes
    from superedit.editing.keys import keys_at
    from superedit.editing.methods.memit import memit_layer_solver
    from superedit.editing.methods.spread import load_targets, memit_targets, spread_update
    from superedit.models import load_model

    F64 = torch.float64
    adapter = load_model(args.model)
    model_dir = local_model_dir(args.model)
    profile = hparams_profile(adapter, model_dir)
    # AlphaEdit's value settings with MEMIT's λ: the z that alphaedit_sweep.py saves, and its MEMIT row
    base = build_hparams("alphaedit", profile, None, adapter.n_layers, args.layers)
    lam = build_hparams("memit", profile, None, adapter.n_layers, args.layers).mom2_update_weight
    hp = base.model_copy(update={"mom2_update_weight": lam})
    layers = sorted(hp.layers)
    reqs = resolve_requests(model_dir, args.requests, limit=args.limit)
    prompts, subjects = [r.prompt for r in reqs], [r.subject for r in reqs]
    stats = make_stats(adapter, hp)
    if args.targets:
        try:
            targets = load_targets(args.targets, reqs, base)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    else:
        targets = memit_targets(adapter, reqs, hp, context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed))
    z = targets[0].to(F64)
    L = layers[-1]
    resid_layers = list(range(layers[0] - 1, L + 1)) if layers[0] > 0 else list(range(0, L + 1))

    def read() -> tuple[dict, dict]:
        """resid after every block from l_1 − 1 to L, and each block's MLP contribution to it (n, d_model)."""
        resid = {l: t.to(F64) for l, t in keys_at(adapter, prompts, subjects, resid_layers, hp.fact_token,
                                                   site="resid").items()}
        vals = keys_at(adapter, prompts, subjects, list(range(layers[0], L + 1)), hp.fact_token, site="value")
        mlp = {}
        with torch.no_grad():
            for l, m in vals.items():
                norm = adapter.mlp_out_norm(l)
                mlp[l] = (m if norm is None else norm(m)).to(F64)
        return resid, mlp

    snaps = []

    memit_solve_layer = memit_layer_solver(adapter, hp, stats)

    def solve(layer: int, K: torch.Tensor, R: torch.Tensor):
        snaps.append(read())  # the model as this layer's solve sees it (earlier increments applied)
        return memit_solve_layer(layer, K, R)

    sp = spread_update(adapter, reqs, hp, solve, targets)
    originals = {l: adapter.down_weight(l).detach().clone() for l in layers}
    try:
        for l, d in sp.deltas.items():
            adapter.add_to_down_weight(l, d.dense(F64))
        snaps.append(read())
    finally:
        for l, w in originals.items():
            adapter.set_down_weight(l, w)

    def stat(x: torch.Tensor) -> float:
        return float(x.mean())

    rows = []
    for i, l in enumerate(layers):
        (r0, m0), (r1, m1) = snaps[i], snaps[i + 1]
        gap = z - r0[L]                                        # (n, d)
        share = gap / (len(layers) - i)                        # r_i
        unit = share / share.norm(dim=1, keepdim=True)
        direct = m1[l] - m0[l]
        d_attn = torch.zeros_like(direct)
        d_mlp = torch.zeros_like(direct)
        per_block = []
        for j in range(l + 1, L + 1):
            block = (r1[j] - r0[j]) - (r1[j - 1] - r0[j - 1])
            mj = m1[j] - m0[j]
            per_block.append({"block": j, "mlp_along": stat((mj * unit).sum(1)), "mlp_norm": stat(mj.norm(dim=1)),
                              "mlp_output_norm": stat(m0[j].norm(dim=1)),
                              "mlp_rotation_deg": stat(torch.rad2deg(torch.arccos(torch.nn.functional.cosine_similarity(
                                  m0[j], m1[j], dim=1).clamp(-1, 1)))),
                              "attn_along": stat(((block - mj) * unit).sum(1)),
                              "attn_norm": stat((block - mj).norm(dim=1))})
            d_mlp += mj
            d_attn += block - mj
        total = r1[L] - r0[L]
        # a check, ~0 by construction: block l's attention reads resid l−1, which editing W_l leaves as it was
        own_attn = (r1[l] - r0[l]) - (r1[l - 1] - r0[l - 1]) - direct if l - 1 in r0 else torch.zeros_like(direct)
        after = (z - r1[L]).norm(dim=1)
        rows.append({
            "step": i, "layer": l, "gap_before": stat(gap.norm(dim=1)), "share_norm": stat(share.norm(dim=1)),
            "lossless_gap_after": stat(gap.norm(dim=1) * (len(layers) - i - 1) / (len(layers) - i)),
            "gap_after": stat(after),
            "direct_norm": stat(direct.norm(dim=1)), "direct_along": stat((direct * unit).sum(1)),
            "direct_rel_error": stat((direct - share).norm(dim=1) / share.norm(dim=1)),
            "own_block_attn_norm": stat(own_attn.norm(dim=1)),
            "downstream_attn_norm": stat(d_attn.norm(dim=1)), "downstream_attn_along": stat((d_attn * unit).sum(1)),
            "downstream_mlp_norm": stat(d_mlp.norm(dim=1)), "downstream_mlp_along": stat((d_mlp * unit).sum(1)),
            "total_norm": stat(total.norm(dim=1)), "total_along": stat((total * unit).sum(1)),
            "resid_norm_L": stat(r0[L].norm(dim=1)), "blocks": per_block})
        log.info("step %d (layer %d): %s", i, l, {k: round(v, 2) for k, v in rows[-1].items() if isinstance(v, float)})

    print("| step (layer) | ‖z − h_L‖ before | share ‖r_i‖ | direct: along r̂, rel. error | own-block attention | "
          "downstream attention: norm, along r̂ | downstream MLP: norm, along r̂ | Δh_L along r̂ | ‖z − h_L‖ after (lossless) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} ({r['layer']}) | {r['gap_before']:.0f} | {r['share_norm']:.0f} | {r['direct_along']:.0f}, "
              f"{r['direct_rel_error']:.2f} | {r['own_block_attn_norm']:.0f} | {r['downstream_attn_norm']:.0f}, "
              f"{r['downstream_attn_along']:.0f} | {r['downstream_mlp_norm']:.0f}, {r['downstream_mlp_along']:.0f} | "
              f"{r['total_along']:.0f} | {r['gap_after']:.0f} ({r['lossless_gap_after']:.0f}) |")
    print("\n| step (layer) | downstream block | its MLP contribution ‖N(m)‖ | change ‖Δ‖, along r̂ | rotation of its direction (°) |")
    print("|---|---|---|---|---|")
    for r in rows:
        for b in r["blocks"]:
            print(f"| {r['step']} ({r['layer']}) | {b['block']} | {b['mlp_output_norm']:.0f} | {b['mlp_norm']:.0f}, "
                  f"{b['mlp_along']:.0f} | {b['mlp_rotation_deg']:.1f} |")
    if args.json:
        from superedit.utils.io import write_json_atomic

        write_json_atomic(args.json, {"model": args.model, "requests": args.requests, "n": len(reqs), "layers": layers,
                                      "lambda": lam, "rows": rows})


if __name__ == "__main__":
    main()
