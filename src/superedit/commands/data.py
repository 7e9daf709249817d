"""``superedit data``: dataset tools (``known``: the records a model knows, split for tuning/evaluation;
``mqd``: the Multi-Question Dataset from ATOMIC tuples; ``objective-ppl``: editing-objective perplexity;
``lm-eval-task``: offline multiple-choice probes as local lm-evaluation-harness tasks)."""

from __future__ import annotations

import typer

from typing import List

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, emit


def register(app) -> None:
    data_app = typer.Typer(help="Dataset tools: filter to known facts and split them; build MQD; objective perplexity.", no_args_is_help=True)
    app.add_typer(data_app, name="data")

    @data_app.command("known")
    @command
    def known(
        model: str = ModelOpt,
        requests: str = typer.Option(..., "--requests", "-r", help="Dataset file (any format superedit reads)."),
        out: str = typer.Option(..., "--out", "-o", help="Directory for known.json, tune.json, eval.json, report.json."),
        rule: str = typer.Option("top1", "--rule", help="top1: the greedy next token is target_true's first token; "
                                                        "margin: log P(true) − log P(new) ≥ --margin nats."),
        margin: float = typer.Option(1.0, "--margin", help="Nats for --rule margin."),
        tune_fraction: float = typer.Option(0.3, "--tune-fraction", help="Share of known records for the tuning split."),
        seed: int = typer.Option(0, "--seed", help="Seed of the split's shuffle."),
        exclude: str = typer.Option(None, "--exclude", help="Dataset file of facts to hold out (e.g. a retention "
                                    "probe): requests with a subject and relation in it are left out before "
                                    "judging."),
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Keep the records whose target_true the model knows (rule in the help), then split them with a
        fixed seed into a tuning and an evaluation part. Records are written unchanged, in their own format."""
        from pathlib import Path

        from ..data import load_requests
        from ..data.known import judge_known, known_report, split_known
        from ..data.loaders import read_records
        from ..models import load_model
        from ..utils.io import write_json_atomic, write_jsonl_atomic

        reqs = list(load_requests(requests))
        records = read_records(requests)
        from ..data.known import RULES
        from ..errors import SupereditError

        n_excluded = 0
        if exclude:
            held = {r.fact_key for r in load_requests(exclude)}
            kept = [r for r in reqs if r.fact_key not in held]
            n_excluded = len(reqs) - len(kept)
            reqs = kept

        if rule not in RULES:  # checked before the model loads
            raise SupereditError(f"--rule {rule!r}: choose one of {', '.join(RULES)}")
        split_known([], tune_fraction)  # raises for a bad --tune-fraction
        adapter = load_model(model, device=device, dtype=dtype, device_map=device_map)
        verdicts = judge_known(adapter, reqs, rule, margin)
        rec_index = [int(r.source.rsplit("#", 1)[1]) for r in reqs]
        known_records = sorted({rec_index[v.index] for v in verdicts if v.known})
        tune, ev = split_known(known_records, tune_fraction, seed)
        report = known_report(verdicts, rule, margin)
        report.update({"model": model, "requests": requests, "exclude": exclude, "n_excluded": n_excluded,
                       "tune_fraction": tune_fraction, "seed": seed,
                       "n_tune": len(tune), "n_eval": len(ev)})
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "known.json", [records[i] for i in known_records])
        write_json_atomic(out_dir / "tune.json", [records[i] for i in tune])
        write_json_atomic(out_dir / "eval.json", [records[i] for i in ev])
        write_jsonl_atomic(out_dir / "verdicts.jsonl", [v.to_dict() for v in verdicts])
        write_json_atomic(out_dir / "report.json", report)
        emit({k: v for k, v in report.items() if k != "per_relation"} | {"out_dir": str(out_dir)}, as_json)

    @data_app.command("derive")
    @command
    def derive(
        requests: str = typer.Option(..., "--requests", "-r", help="CounterFact file whose neighbourhood and "
                                     "attribute prompts are read as facts of their own subjects."),
        out: str = typer.Option(..., "--out", "-o", help="Directory for eval.json, tune.json, report.json."),
        tune: str = typer.Option(None, "--tune", help="Records (any CounterFact file, e.g. `data known`'s "
                                 "tune.json) whose facts form the tuning side; their subjects never appear in "
                                 "eval.json. Without it everything goes to eval.json."),
        seed: int = typer.Option(0, "--seed", help="Seed of each derived request's new target, paraphrases and "
                                 "neighbours."),
        as_json: bool = JsonOpt,
    ):
        """Derive a long counterfactual stream with real-world subjects: the file's rewrites plus one request per
        fact its neighbourhood and attribute prompts state (subject and template recovered, a new target drawn
        from the relation's other objects). Filter the result with `superedit data known`."""
        from pathlib import Path

        from ..data.derive import derive_stream
        from ..data.loaders import read_records
        from ..errors import SupereditError
        from ..utils.io import write_json_atomic

        records = read_records(requests)
        tune_ids = []
        if tune:
            tune_records = read_records(tune)
            missing = [r.get("case_id") for r in tune_records if not isinstance(r, dict) or "case_id" not in r]
            if missing:
                raise SupereditError(f"--tune {tune}: every record needs a case_id to be matched with --requests")
            tune_ids = [r["case_id"] for r in tune_records]
            known_ids = {str(r.get("case_id")) for r in records if isinstance(r, dict)}
            unknown = [c for c in tune_ids if str(c) not in known_ids]
            if unknown:
                raise SupereditError(f"--tune {tune}: {len(unknown)} case_id(s) are not in --requests {requests} "
                                     f"(first: {unknown[0]!r}); pass the tuning split of the same file")
        res = derive_stream(records, seed=seed, tune_case_ids=tune_ids, source=requests)
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "eval.json", res.eval_records)
        write_json_atomic(out_dir / "tune.json", res.tune_records)
        report = res.report | {"requests": requests, "tune": tune}
        write_json_atomic(out_dir / "report.json", report)
        emit({k: v for k, v in report.items() if k not in ("per_relation", "templates_per_relation")}
             | {"out_dir": str(out_dir)}, as_json)

    @data_app.command("mqd")
    @command
    def mqd(
        atomic: str = typer.Option(..., "--atomic", "-a", help="ATOMIC-2020 tuples: 'head @@ relation<TAB>tail| tail'."),
        out: str = typer.Option(..., "--out", "-o", help="Directory for true_false / multiple_choice / "
                                                         "direct_generation .jsonl, mqd.jsonl and report.json."),
        per_type: int = typer.Option(4000, "--per-type", help="Requests per question type (one per tuple; "
                                                               "the D4S study used 4,000)."),
        seed: int = typer.Option(0, "--seed", help="Seed of every choice (tuples, tails, corruptions, option order)."),
        as_json: bool = JsonOpt,
    ):
        """Build the Multi-Question Dataset: each ATOMIC tuple becomes a true/false (objective yes/no, balanced
        true and corrupted tails), a multiple-choice (objective a-d) and a direct-generation request (objective
        the tail), subject the head event, in superedit's request format. Deterministic for a seed."""
        from pathlib import Path

        from ..data.mqd import QUESTION_TYPES, build_mqd, read_atomic, write_mqd

        tuples = read_atomic(atomic)
        dataset = build_mqd(tuples, per_type=per_type, seed=seed, source_name=Path(atomic).name)
        report = write_mqd(dataset, out, atomic_path=atomic)
        types = report["types"]
        emit({"out_dir": str(out), "n_lines": report["n_lines"], "n_without_tail": report["n_without_tail"],
              "requests": {q: types[q]["n"] for q in QUESTION_TYPES},
              "per_relation": {q: types[q]["per_relation"] for q in QUESTION_TYPES},
              "tf_yes_no": [types["tf"]["objectives"].get("yes", 0), types["tf"]["objectives"].get("no", 0)],
              "mc_letters": types["mc"]["objectives"]}, as_json)

    @data_app.command("lm-eval-task")
    @command
    def lm_eval_task(
        requests: str = typer.Option(..., "--requests", "-r", help="Requests whose TRUE facts become questions "
                                                                   "(any format superedit reads; MQD files add "
                                                                   "their T/F and MC items)."),
        out: str = typer.Option(..., "--out", "-o", help="Folder for the task files (NAME_SET.yaml + .jsonl)."),
        name: str = typer.Option("superedit", "--name", help="Task-name prefix (lower-case letters, digits, '_')."),
        n: int = typer.Option(100, "--n", help="Questions per set at most."),
        seed: int = typer.Option(0, "--seed", help="Seed of the distractors' choice and order."),
        as_json: bool = JsonOpt,
    ):
        """Write superedit's offline general-ability questions as local lm-evaluation-harness tasks: known-fact
        multiple choice (true object against 3 objects of the same relation) and, for MQD requests, MQD's T/F
        and MC items. Run them with `superedit lifelong --lm-eval-include OUT --lm-eval-tasks NAME_known_mc`
        or `lm_eval --include_path OUT --tasks NAME_known_mc` (nothing is downloaded)."""
        from ..data import load_requests
        from ..errors import SupereditError
        from ..eval.ability import write_lm_eval_task
        from ..lifelong.probe import requests_probe

        if n < 1:
            raise SupereditError(f"--n must be ≥ 1 (got {n})")
        reqs = load_requests(requests)
        probe = requests_probe(reqs, n=len(reqs), n_questions=n, seed=seed)
        sets = {k: v for k, v in (probe.ability or {}).get("choices", {}).items() if v}
        if not sets:
            raise SupereditError(f"{requests}: no questions could be built (need records with target_true and at "
                                 "least 4 distinct objects per relation, or MQD T/F / MC requests)")
        tasks = {}
        for set_name, items in sets.items():
            task = f"{name}_{set_name}"
            tasks[task] = {"yaml": str(write_lm_eval_task(items, out, task)), "n": len(items)}
        emit({"out_dir": str(out), "tasks": tasks}, as_json)

    @data_app.command("objective-ppl")
    @command
    def objective_ppl(
        model: str = ModelOpt,
        requests: List[str] = typer.Option(..., "--requests", "-r", help="Request file(s) (any format superedit "
                                                                        "reads; MQD files carry the question type)."),
        out: str = typer.Option(..., "--out", "-o", help="Directory for objective_ppl.jsonl, summary.json, ppl_hist.png."),
        per_type: int = typer.Option(0, "--per-type", help="Seeded sample of this many requests per question type "
                                                           "(0: all)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the per-type sample."),
        batch_size: int = typer.Option(32, "--batch-size", help="Rows per forward pass."),
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Perplexity of each request's editing objective (target_new) after its prompt under the unedited model,
        exp(mean token NLL), and its distribution per question type (D4S's data-side predictor of edit damage)."""
        from pathlib import Path

        from ..data import load_requests, sample_requests
        from ..errors import UsageError
        from ..eval.objective import PAPER_MEAN_PPL, objective_perplexities, question_type_of, summarize_perplexities
        from ..models import load_model
        from ..report.objective_report import ppl_histogram
        from ..utils.io import write_json_atomic, write_jsonl_atomic

        if per_type < 0:
            raise UsageError(f"--per-type must be ≥ 0 (0 keeps all requests), got {per_type}")
        if batch_size < 1:
            raise UsageError(f"--batch-size must be ≥ 1, got {batch_size}")
        reqs = [r for path in requests for r in load_requests(path)]
        by_type: dict[str, list] = {}
        for r in reqs:
            by_type.setdefault(question_type_of(r), []).append(r)
        if per_type:
            by_type = {q: sample_requests(rs, min(per_type, len(rs)), seed) for q, rs in by_type.items()}
        chosen = [r for q in sorted(by_type) for r in by_type[q]]
        adapter = load_model(model, device=device, dtype=dtype, device_map=device_map)
        rows = objective_perplexities(adapter, chosen, batch_size)
        summary = summarize_perplexities(rows)
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(out_dir / "objective_ppl.jsonl", [row.to_dict() for row in rows])
        result = {"model": model, "requests": list(requests), "per_type": per_type, "seed": seed,
                  "definition": "PPL = exp(mean token NLL of ' ' + target_new given the filled prompt), teacher-forced",
                  "per_type_summary": summary, "paper_mean_ppl": PAPER_MEAN_PPL,
                  "order_by_mean": sorted(summary, key=lambda q: summary[q]["mean"]),
                  "order_by_median": sorted(summary, key=lambda q: summary[q]["median"])}
        write_json_atomic(out_dir / "summary.json", result)
        ppl_histogram({q: [row.ppl for row in rows if row.question_type == q] for q in summary},
                      out_dir / "ppl_hist.png", title=f"Editing-objective PPL under {model}",
                      reference=PAPER_MEAN_PPL)
        emit({"out_dir": str(out_dir), "model": model,
              "per_type": {q: {k: s[k] for k in ("n", "mean", "median", "q25", "q75")} for q, s in summary.items()},
              "order_by_mean": result["order_by_mean"], "paper_order": ["dg", "mc", "tf"]}, as_json)
