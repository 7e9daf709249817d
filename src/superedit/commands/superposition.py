"""``superedit superposition``: knowledge-in-superposition matrices, statistics, plots and report.

One model::

    superedit superposition --model builtin:small --requests cf.json --m 128 --layers all --out runs/sp

Several models (scaling law of the kurtosis against parameter count)::

    superedit superposition --models builtin:tiny,builtin:small,builtin:base --m 128 --out runs/sp-scaling

The same law from runs already made (each model with its own items, e.g. testbeds and real models)::

    superedit superposition --from-runs runs/sp-small,runs/sp-smollm2,runs/sp-gemma --out runs/sp-scaling
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from ..utils.logs import get_logger
from .common import (DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, default_device, emit, local_model_dir, parse_layers,
                     resolve_requests, testbed_meta)

log = get_logger(__name__)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_") or "model"


def run_one(adapter, requests: list, cov, out: Path, layers: list[int], m: int, seed: int, fact_token: str,
            ridge: float, top_k: int, top_by: str, training: dict | None = None):
    """Analysis + files + plots + report for one model; returns the SuperpositionResult."""
    from ..analysis.superposition import analyze_superposition
    from ..report.provenance import record_command
    from ..report.superposition_report import render_plots, write_report

    res = analyze_superposition(adapter, requests, cov, layers=layers, m=m, seed=seed, fact_token=fact_token,
                                ridge=ridge, top_k=top_k, top_by=top_by)
    res.model["training"] = training
    res.save(out)
    record_command(out)
    render_plots(out)
    write_report(out)
    return res


def _layer_summary(res) -> list[dict]:
    return [{"layer": l, "kurtosis": v.stats["kurtosis"], "mean_abs": v.stats["mean_abs"], "std": v.stats["std"],
             "frac_abs_gt": v.stats["frac_abs_gt"], "angle_mode_whitening": v.stats["angle_mode_whitening"],
             "angle_mode_activation": v.stats["angle_mode_activation"], "condition_number": v.condition_number}
            for l, v in res.layers.items()]


def register(app) -> None:
    @app.command("superposition")
    @command
    def superposition(
        model: str = ModelOpt,
        models: Optional[str] = typer.Option(None, "--models", help="Comma-separated model specs: run each and "
                                                                    "write the kurtosis-vs-size scaling plot."),
        from_runs: Optional[str] = typer.Option(None, "--from-runs", help="Comma-separated --out folders of "
                                                "single-model runs: write the scaling law from their saved "
                                                "statistics (each model keeps its own items; nothing is recomputed)."),
        requests: Optional[str] = typer.Option(None, "--requests", help="Dataset file with the items "
                                                                        "(default on testbed models: its edit requests)."),
        m: int = typer.Option(128, "--m", help="Number of items (seeded choice; smaller m = nested prefix)."),
        layers: str = typer.Option("all", "--layers", help="'all', '3,4' or '2-5'."),
        fact_token: str = typer.Option("subject_last", "--fact-token", help="subject_last | subject_first | last."),
        ridge: float = typer.Option(0.0, "--ridge", help="Ridge added to C as a fraction of its mean diagonal."),
        corpus: Optional[str] = typer.Option(None, "--corpus", help="Corpus for C (default: the model's own / testbed)."),
        mom2_tokens: int = typer.Option(100_000, "--mom2-tokens", help="Corpus tokens for C."),
        seed: int = typer.Option(0, "--seed", help="Seed of the item choice."),
        top_k: int = typer.Option(20, "--top-k", help="Most superposed pairs listed per layer."),
        top_by: str = typer.Option("value", "--top-by", help="Rank pairs by 'value' of p or by 'abs' |p|."),
        out: str = typer.Option(..., "--out", help="Output folder."),
        device: Optional[str] = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Superposition of fact keys in the whitening space C^-1/2: P/Q/cosine matrices, kurtosis, angles,
        m-convergence, top pairs, HTML report; with --models a scaling law over model sizes."""
        from ..analysis.superposition import SuperpositionError, save_scaling, scaling_records
        from ..editing.covariance import CorpusCovariance
        from ..models import load_model
        from ..report.superposition_report import render_scaling

        if from_runs is not None:
            if models:
                raise SuperpositionError("--from-runs and --models exclude each other: --models computes every "
                                         "model, --from-runs reads runs already made")
            emit(scaling_from_runs(from_runs, Path(out)), as_json)
            return
        if m < 2:
            raise SuperpositionError(f"--m must be ≥ 2 (got {m})")
        dev = default_device(device, device_map)
        out_dir = Path(out)
        specs = [s.strip() for s in models.split(",") if s.strip()] if models else [model]
        if models and not specs:
            raise SuperpositionError("--models is empty; give comma-separated model specs")
        results, model_dirs = [], {}
        for spec in specs:
            adapter = load_model(spec, device=dev, dtype=dtype, device_map=device_map)
            chosen = parse_layers(layers, adapter.n_layers)
            reqs = resolve_requests(local_model_dir(spec), requests, seed=seed, default_n=m)
            cov = CorpusCovariance(adapter, corpus or None, n_tokens=mom2_tokens, layers=chosen)
            target = out_dir if not models else out_dir / "models" / _slug(spec)
            res = run_one(adapter, reqs, cov, target, chosen, m, seed, fact_token, ridge, top_k, top_by,
                          training=testbed_budget(local_model_dir(spec)))
            results.append(res)
            model_dirs[spec] = str(target.relative_to(out_dir)) if models else "."
            del adapter, cov
        result = {"out": str(out_dir), "m": m, "fact_token": fact_token, "ridge": ridge}
        if models:
            warn_unequal_budgets(results)
            rows = scaling_records(results)
            save_scaling(rows, out_dir, config={"models": specs, "m": m, "seed": seed, "fact_token": fact_token,
                                                "ridge": ridge, "model_dirs": model_dirs})
            from ..report.provenance import record_command

            record_command(out_dir)
            render_scaling(out_dir)
            result.update({"models": specs, "scaling": rows, "report": str(out_dir / "report.html")})
        else:
            res = results[0]
            result.update({"model": model, "n_params": res.model["n_params"], "layers": _layer_summary(res),
                           "report": str(out_dir / "report.html")})
        emit(result, as_json)


def scaling_from_runs(from_runs: str, out_dir: Path) -> dict:
    """Scaling law from saved single-model runs: reads each ``stats.json``, writes scaling.json/.csv, the
    plot and the report under ``out_dir`` (links to each run's own report)."""
    import os

    from ..analysis.superposition import SuperpositionError, save_scaling, scaling_rows
    from ..report.provenance import record_command
    from ..report.superposition_report import render_scaling

    dirs = [Path(d.strip()) for d in from_runs.split(",") if d.strip()]
    if len(dirs) < 2:
        raise SuperpositionError(f"--from-runs needs at least two run folders, comma-separated (got {from_runs!r})")
    summaries = [_saved_run(d) for d in dirs]  # all checked before anything is written
    sources = [s["model"]["source"] for s in summaries]
    if len(set(sources)) < len(sources):
        raise SuperpositionError(f"--from-runs names the same model twice ({', '.join(sources)}); one run per model")
    rows, model_dirs = [], {}
    for d, summ in zip(dirs, summaries):
        model = summ["model"]
        if model.get("training") is None and not str(model["source"]).startswith("pretrained:"):
            try:  # runs saved before stats.json carried the training budget: read the testbed's own record
                model["training"] = testbed_budget(local_model_dir(model["source"]))
            except Exception as e:  # noqa: BLE001 - a model that cannot be resolved has no testbed budget
                log.info("scaling: no training budget for %s (%s)", model["source"], e)
        rows.extend(scaling_rows(summ))
        model_dirs[model["source"]] = os.path.relpath(d, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfgs = [s.get("config") or {} for s in summaries]
    same = lambda key: cfgs[0].get(key) if len({str(c.get(key)) for c in cfgs}) == 1 else "differs"  # noqa: E731
    save_scaling(rows, out_dir, config={"models": sources, "m": same("m"), "seed": same("seed"),
                                        "fact_token": same("fact_token"), "ridge": same("ridge"),
                                        "model_dirs": model_dirs, "from_runs": [str(d) for d in dirs]})
    record_command(out_dir)
    render_scaling(out_dir)
    log.warning("scaling from saved runs: each model was analysed on its own items; the models differ in "
                "more than size (data, architecture, training)")
    return {"out": str(out_dir), "models": sources, "scaling": rows, "report": str(out_dir / "report.html")}


def _saved_run(run_dir: Path) -> dict:
    """The ``stats.json`` of a single-model run, checked (the shared results loader, plus the model fields
    the scaling law reads)."""
    from ..analysis.superposition import SuperpositionError
    from ..report.page import load_results

    data = load_results(run_dir, "stats.json", "superposition", ("model", "layers"))
    missing = [k for k in ("source", "n_params", "n_layers") if k not in (data.get("model") or {})]
    if missing:
        raise SuperpositionError(f"{run_dir}/stats.json: model.{missing[0]} is missing; re-run that analysis "
                                 "with this version")
    return data


def testbed_budget(model_dir) -> dict | None:
    """A testbed's training budget and outcome (epochs, steps, recall), for the scaling table."""
    meta = testbed_meta(model_dir)
    if not meta:
        return None
    fig = meta.get("figures") or {}
    world = meta.get("world") or {}
    return {"size": meta.get("size"), "seed": meta.get("seed"), "world": world.get("source") or meta.get("facts_file"),
            "epochs": fig.get("epochs"), "steps": fig.get("steps"), "recall": fig.get("recall"),
            "paraphrase_recall": fig.get("paraphrase_recall")}


def warn_unequal_budgets(results) -> None:
    """The scaling law is only fair on one world with a comparable budget: say so when it is not."""
    budgets = [(r.model.get("source"), r.model.get("training")) for r in results]
    known = [(m, b) for m, b in budgets if b]
    if len(known) < len(budgets):
        log.warning("scaling: %d of %d models are not testbeds; their training budget is unknown",
                    len(budgets) - len(known), len(budgets))
    for field in ("world", "seed", "epochs"):
        values = {str(b.get(field)) for _, b in known}
        if len(values) > 1:
            log.warning("scaling: the testbeds differ in %s (%s); the comparison is not on equal terms",
                        field, ", ".join(f"{m}: {b.get(field)}" for m, b in known))
