"""``superedit demo``: the main job — a real model first, then the whole pipeline on the built-in testbed.

Stages (each writes into --out and adds a section to demo.json):
  0. real          — counterfactual ROME edits of SmolLM2-135M (``pretrained:smollm2-135m``, installed and
                     converted on first use) with its greedy continuations before and after, and a
                     causal-trace heatmap (``commands/demo_real.py``);
  0b. lifelong-real — a short lifelong comparison on SmolLM2: ROME against AlphaEdit on one stream of 6
                     known facts, with a retention probe of 12 others (the packaged sample
                     ``data/samples/smollm2_known.jsonl``);
  1. recall        — the testbed's recall of trained facts and of held-out paraphrase templates;
  2. trace         — causal tracing over a sample of facts and the last-subject-token state swap;
  3. edit          — independent ROME, MEMIT (one batch) and FT edits with CounterFact metrics;
  4. lifelong      — sequential ROME vs MEMIT vs D4S vs AlphaEdit on one edit stream (report.html);
  5. superposition — P matrices, kurtosis by layer and whitening-space angles (report.html);
  6. robust        — ROME with and without the REP key adaptor on rephrased/shuffled/long queries.
Stages 0b and 3-6 run the real commands in-process and read back the files those commands write, so the
demo exercises exactly what a user runs. At the end ``OUT/index.html`` links every stage's report,
files and figures (its path is printed).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import typer

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, emit


def stage_recall(ctx: dict) -> dict[str, Any]:
    """Teacher-forced recall of every trained fact prompt and every held-out-template prompt."""
    from ..eval.scoring import fact_recall
    from ..testbed import load_world

    adapter, world = ctx["adapter"], load_world(ctx["model_dir"])
    out = {}
    for split in ("train", "heldout"):
        prompts = world.prompts(split)
        if ctx["quick"]:
            prompts = prompts[:: max(1, len(prompts) // 400)]
        hits = fact_recall(adapter, [p.prompt for p in prompts], [p.target for p in prompts])
        out[f"{split}_recall"] = sum(hits) / max(1, len(hits))
        out[f"{split}_prompts"] = len(hits)
    return out


def stage_trace(ctx: dict) -> dict[str, Any]:
    """Causal trace (mlp, resid, attn) of ``n_trace`` facts and the state-swap test."""
    from ..analysis.trace_study import load_facts, trace_study
    from .trace import write_trace

    facts = load_facts(model=ctx["model"], n=ctx["n_trace"], seed=ctx["seed"])
    study = trace_study(ctx["adapter"], facts, kinds=["mlp", "resid", "attn"], noise=3.0, samples=10,
                        seed=ctx["seed"], swap=True, model=ctx["model"])
    res = write_trace(study, ctx["out"] / "trace")
    return {k: res[k] for k in ("n_facts", "mlp", "resid", "attn", "swap", "files") if k in res}


def _run_command(args: list[str]) -> None:
    """Run a superedit command in-process (its human output goes to stderr). A command that fails stops
    the demo with an error naming it: a stage never reports the files of an earlier run as its own."""
    import click

    from ..cli import app
    from ..errors import SupereditError

    try:  # without standalone mode click returns the command's own value, or an Exit's code as an int
        result = app(args, standalone_mode=False, prog_name="superedit")
    except click.exceptions.Exit as exc:
        result = exc.exit_code
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        raise SupereditError(f"demo: `superedit {' '.join(args)}` failed (exit {result}); its error is printed above")


def fresh_stage_dir(d: Path) -> Path:
    """The demo's own stage folder, emptied: a demo run starts its stages over (a lifelong run left there by
    an earlier demo would otherwise refuse to start, or be resumed with other settings)."""
    import shutil

    if d.exists():
        from ..utils.logs import get_logger

        get_logger("superedit.demo").info("demo: replacing the earlier run in %s", d)
        shutil.rmtree(d)
    return d


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def stage_edit(ctx: dict) -> dict[str, Any]:
    """Independent edits (weights restored between requests; MEMIT as one batch) with CounterFact metrics."""
    n = ctx["n_edit"]
    out = {}
    keys = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_magnitude")
    for method, extra in (("rome", []), ("memit", ["--batch-size", str(n)]), ("ft", [])):
        d = ctx["out"] / f"edit-{method}"
        _run_command(["edit", "--model", ctx["model"], "--method", method, "--limit", str(n), "--seed", str(ctx["seed"]),
                      "--gen-tokens", "0", "--out", str(d)] + extra)
        summary = _read_json(d / "summary.json")
        post, pre = summary.get("post", {}), summary.get("pre", {})
        out[method] = {"n": summary.get("n_edited"), **{f"pre_{k}": pre.get(k) for k in keys if k in pre},
                       **{k: post.get(k) for k in keys if k in post}, "layers": summary.get("hparams", {}).get("layers"),
                       "records": str(d / "records.jsonl")}
    return out


def stage_lifelong(ctx: dict) -> dict[str, Any]:
    """A short lifelong comparison; the figures are the last checkpoint of each method."""
    from ..report.lifelong_report import final_table, load_metrics

    d = fresh_stage_dir(ctx["out"] / "lifelong")
    n = ctx["n_lifelong"]
    _run_command(["lifelong", "--model", ctx["model"], "--methods", "rome,memit,d4s,alphaedit", "--edits", str(n),
                  "--eval-every", str(max(1, n // 4)), "--block-size", str(max(1, n // 2)), "--probe-n", "200",
                  "--seed", str(ctx["seed"]), "--out", str(d)])
    keep = ("n_edits", "efficacy_all", "paraphrase_all", "neighborhood_all", "untouched_retention", "all_facts_recall",
            "perplexity", "w_l1_rel_mean")
    table = {row["method"]: {k: row.get(k) for k in keep} for row in final_table(load_metrics(d))}
    return {"final": table, "report": str(d / "report.html")}


def stage_superposition(ctx: dict) -> dict[str, Any]:
    """Superposition matrices of ``m`` testbed facts at every layer, with the kurtosis-by-layer plot."""
    d = ctx["out"] / "superposition"
    _run_command(["superposition", "--model", ctx["model"], "--m", str(ctx["m"]), "--layers", "all",
                  "--seed", str(ctx["seed"]), "--out", str(d)])
    stats = _read_json(d / "stats.json")
    rows = stats.get("layers", [])
    return {"kurtosis_by_layer": {r["layer"]: r.get("kurtosis") for r in rows},
            "whitening_angle_mode": {r["layer"]: r.get("angle_mode_whitening") for r in rows},
            "report": str(d / "report.html")}


def stage_robust(ctx: dict) -> dict[str, Any]:
    """ROME alone vs ROME + REP adaptor on perturbed queries (single-edit protocol)."""
    d = fresh_stage_dir(ctx["out"] / "robust")
    _run_command(["robust", "--model", ctx["model"], "--method", "rome", "--adaptor", "both", "--n", str(ctx["n_robust"]),
                  "--seed", str(ctx["seed"]), "--out", str(d)])
    table = _read_json(d / "table.json")
    return {"settings": table.get("settings", table), "report": str(d / "report.html")}


def stage_real(ctx: dict) -> dict[str, Any]:
    """SmolLM2-135M: ROME edits shown as what the model says before and after, and a trace heatmap."""
    from .demo_real import stage_real as run

    return run(ctx)


def stage_lifelong_real(ctx: dict) -> dict[str, Any]:
    """SmolLM2-135M: a short lifelong comparison, ROME against AlphaEdit on one stream of known facts."""
    from .demo_real import stage_lifelong_real as run

    return run(ctx)


STAGES: list[tuple[str, Callable[[dict], dict]]] = [
    ("real", stage_real),
    ("lifelong-real", stage_lifelong_real),
    ("recall", stage_recall),
    ("trace", stage_trace),
    ("edit", stage_edit),
    ("lifelong", stage_lifelong),
    ("superposition", stage_superposition),
    ("robust", stage_robust),
]


def register(app) -> None:
    @app.command("demo")
    @command
    def demo(
        model: str = ModelOpt,
        out: str = typer.Option("runs/demo", "--out", help="Output directory."),
        n_trace: int = typer.Option(20, "--n-trace", help="Facts traced by the causal-tracing stage."),
        n_edit: int = typer.Option(20, "--n-edit", help="Requests edited independently by each method."),
        n_lifelong: int = typer.Option(24, "--n-lifelong", help="Sequential edits per method in the testbed's lifelong stage "
                                       "(`superedit lifelong` runs longer streams)."),
        m: int = typer.Option(64, "--m", help="Facts in the superposition matrices."),
        n_robust: int = typer.Option(6, "--n-robust", help="Requests in the robust-keys comparison."),
        stages: str = typer.Option("all", "--stages", help="Comma-separated stages to run: "
                                   + ", ".join(name for name, _ in STAGES) + " (default all)."),
        quick: bool = typer.Option(False, "--quick", help="Smaller samples everywhere (smoke test)."),
        seed: int = typer.Option(0, "--seed"),
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Edit a real model (SmolLM2-135M), then run the whole pipeline on the built-in testbed; writes a
        report into --out and prints the path of index.html, which links every stage."""
        from ..errors import SupereditError
        from ..models import load_model
        from ..models.loading import resolve_model_path
        from ..utils.io import write_json_atomic
        from ..utils.logs import get_logger

        log = get_logger("superedit.demo")
        names = [n for n, _ in STAGES]
        wanted = names if stages == "all" else [s.strip() for s in stages.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in names]
        if unknown:
            raise SupereditError(f"--stages: unknown stage(s) {unknown}; available: {names}")
        model_dir, _ = resolve_model_path(model)
        if not (Path(model_dir) / "testbed.json").exists():
            raise SupereditError(f"the demo runs on a testbed model (with testbed.json); {model!r} is not one")
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        ctx = dict(model=model, model_dir=model_dir, adapter=load_model(model, device=device, dtype=dtype, device_map=device_map), out=out_dir,
                   n_trace=n_trace if not quick else min(n_trace, 4), quick=quick, seed=seed,
                   n_edit=min(n_edit, 4) if quick else n_edit, n_lifelong=min(n_lifelong, 8) if quick else n_lifelong,
                   m=min(m, 16) if quick else m, n_robust=min(n_robust, 2) if quick else n_robust)
        report: dict[str, Any] = {"model": model, "stages": {}}
        t_start = time.time()
        for name, fn in STAGES:
            if name not in wanted:
                continue
            log.info("demo stage %s …", name)
            t0 = time.time()
            section = fn(ctx)
            section["seconds"] = round(time.time() - t0, 1)
            report["stages"][name] = section
            write_json_atomic(out_dir / "demo.json", report)
            log.info("demo stage %s done in %.1fs", name, section["seconds"])
        report["seconds"] = round(time.time() - t_start, 1)
        report["report"] = str(out_dir / "demo.json")
        write_json_atomic(out_dir / "demo.json", report)
        from ..report.index import write_index
        from ..report.provenance import record_command

        record_command(out_dir)
        report["index"] = str(write_index(out_dir))
        log.info("run index: %s", report["index"])
        emit(report, as_json)
