"""The D4S degradation study on MQD (issue #16 item 3): sequential editing on each question type, and
whether a higher editing-objective PPL means more damage (L1 growth of the edited layers, general ability).

The library (:mod:`superedit.analysis.mqd_study`) runs and summarises; this script builds the model,
hyperparameters and covariance as ``superedit lifelong`` does, then renders a Markdown table and a figure
from the saved files.

    # testbed (about 10 min on 1 busy CPU thread)
    python benchmarks/mqd_study.py run --model builtin --mqd runs/mqd --n 30 --methods rome,alphaedit \\
        --eval-every 10 --out runs/mqd_study_builtin
    python benchmarks/mqd_study.py render --out runs/mqd_study_builtin \\
        --figure docs/results/figures/mqd-study-testbed.png
    # control: the testbed's own counterfactual requests (objectives it knows), same settings
    python benchmarks/mqd_study.py run --model builtin --types cf --n 30 --methods rome,alphaedit,d4s \\
        --eval-every 10 --out runs/mqd_study_builtin_control
    # SmolLM2-135M (not run yet): known CounterFact facts for retention, the model's sampled text for perplexity
    python benchmarks/mqd_study.py run --model pretrained:smollm2-135m --mqd runs/mqd --n 30 \\
        --methods rome,alphaedit --eval-every 10 --known ../shared/data/counterfact_known.json \\
        --out runs/mqd_study_smollm2
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

TYPE_LABEL = {"tf": "T/F", "mc": "MC", "dg": "DG", "cf": "testbed's own (control)"}
#: --types entry for the control stream: a testbed's own counterfactual requests (not MQD)
CONTROL = "cf"


def run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from superedit.analysis.mqd_study import run_mqd_study, study_probe, study_streams
    from superedit.commands.common import build_hparams, hparams_profile, local_model_dir, testbed_meta
    from superedit.data import load_requests
    from superedit.data.mqd import FILE_NAMES
    from superedit.editing.covariance import CorpusCovariance
    from superedit.editing.methods import get_method
    from superedit.models import load_model
    from superedit.utils.seed import seed_everything

    seed_everything(args.seed)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    mdir = local_model_dir(args.model)
    pools = {}
    for q in types:
        if q == CONTROL:  # the testbed's own counterfactual requests: objectives it knows as answers
            from superedit.testbed.access import default_edit_requests

            if testbed_meta(mdir) is None:
                raise SystemExit(f"--types {CONTROL}: only for a testbed model")
            pools[q] = list(default_edit_requests(mdir, None, args.seed))
        else:
            pools[q] = list(load_requests(str(Path(args.mqd) / FILE_NAMES[q])))
    streams = study_streams(pools, args.n, args.seed)
    edited = [r for s in streams.values() for r in s]
    held = [r for q in types if q != CONTROL for r in pools[q] if r not in edited]
    random.Random(f"mqd-study-ability:{args.seed}").shuffle(held)  # ability items from every relation

    adapter0 = load_model(args.model)
    profile = hparams_profile(adapter0, mdir)
    hps = {m: build_hparams(m, profile, None, adapter0.n_layers, args.layers,
                            args.mom2_tokens if get_method(m).needs_stats else None, args.corpus) for m in methods}
    stats = None
    stat_hps = [hps[m] for m in methods if get_method(m).needs_stats]
    if stat_hps:
        stats = CorpusCovariance(adapter0, args.corpus or stat_hps[0].mom2_corpus or None,
                                 n_tokens=max(h.mom2_n_tokens for h in stat_hps),
                                 max_length=stat_hps[0].mom2_max_length,
                                 layers=sorted({l for h in stat_hps for l in h.layers}))
    if testbed_meta(mdir) is not None:
        probe = study_probe(testbed_dir=mdir, mqd_pool=held, edited=edited, seed=args.seed,
                            stream=streams.get(CONTROL, ()))
    else:
        from superedit.stats.corpus import resolve_corpus

        texts = resolve_corpus(adapter0, args.corpus).texts[-40:]
        known = list(load_requests(args.known)) if args.known else []
        probe = study_probe(texts=texts, known=known, mqd_pool=held, edited=edited, seed=args.seed)
    probe.max_neighbours = 0  # MQD requests have no neighbourhood prompts
    first = [adapter0]

    def factory():
        return first.pop() if first else load_model(args.model)

    run_mqd_study(factory, streams, methods, hps, stats, probe, args.out, args.eval_every, args.resume, args.seed,
                  config={"model": args.model, "profile": profile, "mqd": args.mqd, "known": args.known,
                          "hparams": {m: hps[m].to_dict() for m in methods}})
    print(f"done: {args.out}; render with: python benchmarks/mqd_study.py render --out {args.out}")


def _ci(d, fmt="{:.3f}") -> str:
    if not d or d.get("mean") is None:
        return "–"
    lo, hi = d["ci"]
    return f"{fmt.format(d['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _share(a: dict, name: str) -> str:
    m = a.get(name)
    if not m:
        return "–"
    lo, hi = m["ci"] or (None, None)
    return f"{m['value']:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{m['value']:.2f}"


def render(args) -> None:
    from superedit.analysis.mqd_study import summarize_mqd_study
    from superedit.utils.io import write_json_atomic

    res = summarize_mqd_study(args.out, n_boot=args.n_boot, seed=0)
    write_json_atomic(Path(args.out) / "study_summary.json", {k: v for k, v in res.items() if k != "per_edit"})
    from superedit.utils.io import write_jsonl_atomic

    write_jsonl_atomic(Path(args.out) / "per_edit.jsonl", res["per_edit"])
    rows = res["rows"]
    lines = ["| type | method | n | objective log₁₀ PPL (mean [95% CI]) | median PPL | log₁₀ PPL right after its edit | L1 growth of W after n edits "
             "(‖W‖₁/‖W₀‖₁ − 1) | L1 added per edit (‖ΔW‖₁/‖W₀‖₁, ×10⁻²) | efficacy right after each edit | "
             "efficacy at the end | held-out PPL after / before | known-fact retention after | known-fact MC "
             "before → after | MQD T/F acc. before → after | MQD MC acc. before → after |",
             "|---|---|---:|---|---:|---|---:|---|---|---|---:|---|---|---|---|"]
    for r in rows:
        b, a = r["ability_before"], r["ability_after"]
        inc = dict(r["inc_l1_rel"])
        if inc.get("mean") is not None:
            inc = {"mean": 100 * inc["mean"], "ci": [100 * c for c in inc["ci"]]}

        def ba(name):
            return f"{_share(b, name)} → {_share(a, name)}" if name in a else "–"

        lines.append(f"| {TYPE_LABEL.get(r['type'], r['type'])} | {r['method']} | {r['n_edits']} | "
                     f"{_ci(r['objective_log10_ppl'], '{:.2f}')} | {r['objective_ppl_median']:.3g} | "
                     f"{_ci(r['objective_log10_ppl_after_edit'], '{:.2f}')} | "
                     f"{r['l1_growth_final']:.3f} | {_ci(inc, '{:.2f}')} | {_ci(r['efficacy_at_edit'], '{:.2f}')} | "
                     f"{_ci(r['efficacy_final'], '{:.2f}')} | "
                     f"{r['perplexity_ratio']:.3f} | {_share(a, 'known_retention')} | {ba('known_mc')} | "
                     f"{ba('mqd_tf')} | {ba('mqd_mc')} |"
                     if all(r.get(k) is not None for k in ("perplexity_ratio", "l1_growth_final", "objective_ppl_median"))
                     else
                     f"| {r['type']} | {r['method']} | {r['n_edits']} | (incomplete) |")
    lines += ["", "| method | edits | ρ(log PPL, L1 added by the edit) [95% CI] | same, position held fixed | "
              "ρ(log PPL, change of ‖W‖₁) [95% CI] | same, position held fixed | n |",
              "|---|---|---|---|---|---|---:|"]
    for key, c in res["correlations"].items():
        m, q = key.split("|")

        def rho(d):
            if d["rho"] is None:
                return "–"
            return f"{d['rho']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]" if d["ci"] else f"{d['rho']:+.2f}"

        lines.append(f"| {m} | {'all types' if q == 'all' else TYPE_LABEL.get(q, q)} | {rho(c['inc_l1_rel'])} | "
                     f"{rho(c['inc_l1_rel|i'])} | {rho(c['l1_change_rel'])} | {rho(c['l1_change_rel|i'])} | "
                     f"{c['inc_l1_rel']['n']} |")
    if res["type_level"]:
        lines += ["", "Type level (3 points per method, no interval): " + "; ".join(
            f"{m}: ρ(mean log PPL, L1 growth) {t['rho_l1_growth']:+.1f}, ρ(mean log PPL, PPL ratio) "
            f"{t['rho_perplexity_ratio']:+.1f}" for m, t in res["type_level"].items()
            if t["rho_l1_growth"] is not None and t["rho_perplexity_ratio"] is not None)]
    table = "\n".join(lines)
    print(table)
    (Path(args.out) / "study_table.md").write_text(table + "\n", encoding="utf-8")
    if args.figure:
        _figure(res, args.figure, args.title or f"MQD degradation study, {res['config'].get('model')}")
        print(f"figure: {args.figure}")


def _figure(res: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = res["config"]["methods"]
    types = res["config"]["types"]
    colours = {"tf": "tab:blue", "mc": "tab:orange", "dg": "tab:green", "cf": "tab:red"}
    fig, axes = plt.subplots(1, len(methods) + 1, figsize=(4.6 * (len(methods) + 1), 4.0))
    for ax, m in zip(axes, methods):
        for q in types:
            pts = [e for e in res["per_edit"] if e["method"] == m and e["type"] == q
                   and e["inc_l1_rel"] is not None and e["log10_ppl"] is not None]
            ax.scatter([e["log10_ppl"] for e in pts], [100 * e["inc_l1_rel"] for e in pts], s=14, alpha=0.75,
                       color=colours.get(q), label=TYPE_LABEL.get(q, q))
        c = res["correlations"].get(f"{m}|all", {}).get("inc_l1_rel", {})
        if c.get("rho") is not None and c.get("ci"):
            ax.set_title(f"{m}: Spearman ρ {c['rho']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}], n={c['n']}",
                         fontsize=9)
        ax.set_xlabel("objective log₁₀ PPL (unedited model)")
        ax.set_ylabel("L1 added by the edit, % of ‖W₀‖₁")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for m, marker in zip(methods, "osd^v"):
        for q in types:
            r = next((r for r in res["rows"] if r["method"] == m and r["type"] == q), None)
            if not r:
                continue
            xs = [cp["n_edits"] for cp in r["checkpoints"]]
            ax.plot(xs, [cp["w_l1_rel_mean"] for cp in r["checkpoints"]], marker=marker, color=colours.get(q),
                    label=f"{m} {TYPE_LABEL.get(q, q)}", linewidth=1)
    ax.set_xlabel("edits")
    ax.set_ylabel("‖W‖₁ / ‖W₀‖₁ of the edited layer(s)")
    ax.set_title("L1 of the edited layers over the edits", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="edit each type's stream with each method (resumable)")
    r.add_argument("--model", default="builtin")
    r.add_argument("--mqd", default="runs/mqd", help="directory of `superedit data mqd`")
    r.add_argument("--types", default="tf,mc,dg", help=f"MQD types; '{CONTROL}': a testbed's own requests (a control "
                   "with familiar objectives)")
    r.add_argument("--n", type=int, default=30, help="edits per type (the same for every type)")
    r.add_argument("--methods", default="rome,alphaedit")
    r.add_argument("--eval-every", type=int, default=10)
    r.add_argument("--layers", default=None, help="edited layer(s) of every method (overrides hparams)")
    r.add_argument("--mom2-tokens", type=int, default=None)
    r.add_argument("--corpus", default=None, help="covariance + held-out perplexity text (default: the model's)")
    r.add_argument("--known", default=None, help="non-testbed models: requests whose true facts the model knows "
                                                 "(retention and known-fact multiple choice)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--resume", action="store_true")
    r.add_argument("--out", required=True)
    g = sub.add_parser("render", help="table (stdout + OUT/study_table.md), summary JSON and figure")
    g.add_argument("--out", required=True)
    g.add_argument("--figure", default=None)
    g.add_argument("--title", default=None)
    g.add_argument("--n-boot", type=int, default=2000)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else render(args)


if __name__ == "__main__":
    main()
