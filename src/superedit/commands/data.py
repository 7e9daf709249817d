"""``superedit data``: dataset tools (``known``: the records a model knows, split for tuning/evaluation)."""

from __future__ import annotations

import typer

from .common import DeviceOpt, JsonOpt, ModelOpt, command, emit


def register(app) -> None:
    data_app = typer.Typer(help="Dataset tools: filter to known facts and split them.", no_args_is_help=True)
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
        device: str = DeviceOpt,
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

        reqs = load_requests(requests)
        records = read_records(requests)
        from ..data.known import RULES
        from ..errors import SupereditError

        if rule not in RULES:  # checked before the model loads
            raise SupereditError(f"--rule {rule!r}: choose one of {', '.join(RULES)}")
        split_known([], tune_fraction)  # raises for a bad --tune-fraction
        adapter = load_model(model, device=device)
        verdicts = judge_known(adapter, reqs, rule, margin)
        rec_index = [int(r.source.rsplit("#", 1)[1]) for r in reqs]
        known_records = sorted({rec_index[v.index] for v in verdicts if v.known})
        tune, ev = split_known(known_records, tune_fraction, seed)
        report = known_report(verdicts, rule, margin)
        report.update({"model": model, "requests": requests, "tune_fraction": tune_fraction, "seed": seed,
                       "n_tune": len(tune), "n_eval": len(ev)})
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "known.json", [records[i] for i in known_records])
        write_json_atomic(out_dir / "tune.json", [records[i] for i in tune])
        write_json_atomic(out_dir / "eval.json", [records[i] for i in ev])
        write_jsonl_atomic(out_dir / "verdicts.jsonl", [v.to_dict() for v in verdicts])
        write_json_atomic(out_dir / "report.json", report)
        emit({k: v for k, v in report.items() if k != "per_relation"} | {"out_dir": str(out_dir)}, as_json)
