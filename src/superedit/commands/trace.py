"""``superedit trace``: causal tracing heatmaps (ROME) and the state-swap test."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..analysis.trace_study import TESTBED_DEFAULT_N
from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, emit


# ----------------------------------------------------------------------------------------- rendering
def _round(obj: Any, digits: int = 6) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, digits) for v in obj]
    return obj


def write_trace(study, out: str | Path) -> dict[str, Any]:
    """Render a :class:`~superedit.analysis.trace_study.TraceStudy` into ``out`` (trace.json, one heatmap
    per kind — per fact for one fact, mean indirect effect by token category for several — and the
    state-swap plot); returns the summary that ``--json`` prints."""
    from ..analysis.tracing import CATEGORIES
    from ..report import plots
    from ..utils.io import write_json_atomic

    facts, kinds, summary, nl = study.facts, study.kinds, study.summary, study.config["n_layers"]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for k in kinds:
        if len(facts) == 1:
            r = study.by_kind[k][0]
            first, last = r.subject_span
            title = (f"{r.prompt!r} -> {r.target!r}: restored {k}, window {r.window}\n"
                     f"p_clean {r.p_clean:.3f}, p_corrupt {r.p_corrupt:.3f}")
            files.append(plots.trace_heatmap(r.scores.T, r.tokens, out_dir / f"trace_{k}.png", kind=k,
                                             title=title, highlight=range(first, last + 1)))
        else:
            cats = summary[k]["categories"]
            grid = [cats[c]["mean_ie"] or [None] * nl for c in CATEGORIES]
            title = (f"mean indirect effect of restored {k} over {len(facts)} facts, window {study.windows[k]}\n"
                     f"mean p_clean {summary[k]['mean_p_clean']:.3f}, "
                     f"p_corrupt {summary[k]['mean_p_corrupt']:.3f}")
            files.append(plots.trace_heatmap(grid, list(CATEGORIES), out_dir / f"trace_{k}_avg.png", kind=k,
                                             title=title, cbar_label="mean IE"))
    swap_res = None
    if study.swap is not None:
        sw = study.swap
        swap_res = sw.to_dict()
        if sw.n_pairs:
            title = f"state swap at the last subject token ({sw.n_pairs} pairs)"
            files.append(plots.rate_by_layer({"transfer": sw.transfer_rate, "keep": sw.keep_rate}, sw.layers,
                                             out_dir / "swap.png", title=title))
        else:
            swap_res["note"] = "no pair of facts with the same template and different answers"
    write_json_atomic(out_dir / "trace.json", _round(dict(config=study.config, summary=summary, swap=swap_res,
                                                          facts=study.per_fact())))
    files.insert(0, out_dir / "trace.json")

    result: dict[str, Any] = dict(model=study.config["model"], n_facts=len(facts), n_layers=nl, kinds=kinds,
                                  windows=study.windows, out=str(out_dir), files=[str(f) for f in files])
    for k, s in summary.items():
        brief = {key: s[key] for key in ("mean_p_clean", "mean_p_corrupt", "peak", "last_subject_peak")}
        if "criterion" in s:
            brief["criterion_met"] = s["criterion"]["met"]
        result[k] = _round(brief)
    if swap_res is not None:
        result["swap"] = _round({key: swap_res[key] for key in
                                 ("n_pairs", "best_layer", "best_transfer_rate", "transfer_rate", "keep_rate")})
    return result


def register(app) -> None:
    @app.command("trace")
    @command
    def trace(
        model: str = ModelOpt,
        prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template with {} for the subject."),
        subject: Optional[str] = typer.Option(None, "--subject", help="The subject filled into --prompt."),
        target: Optional[str] = typer.Option(None, "--target", help="The answer (its first token is traced; "
                                                                   "default: the model's top prediction)."),
        requests: Optional[str] = typer.Option(None, "--requests", help="JSON/JSONL facts {prompt, subject, target} "
                                                                        "or a dataset file (traced with target_true)."),
        n: Optional[int] = typer.Option(None, "--n", help=f"Trace N facts (seeded sample; testbed default "
                                                          f"{TESTBED_DEFAULT_N})."),
        kinds: str = typer.Option("resid,mlp,attn", "--kinds", help="Comma-separated: resid, mlp, attn."),
        window: Optional[int] = typer.Option(None, "--window", help="Layers restored together for mlp/attn "
                                             "(default 10 at >= 40 layers, scaled to the depth below; resid: 1)."),
        noise: float = typer.Option(3.0, "--noise", help="Noise std in units of the embedding-matrix std."),
        samples: int = typer.Option(10, "--samples", help="Noise draws per fact (one batch)."),
        seed: int = typer.Option(0, "--seed"),
        swap: bool = typer.Option(False, "--swap",
                                  help="Also run the state-swap test (needs facts sharing a template)."),
        out: str = typer.Option("runs/trace", "--out", help="Output directory (trace.json and PNGs)."),
        batch_size: int = typer.Option(256, "--batch-size", help="Max rows per forward pass."),
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Causal tracing (ROME): which hidden states carry a fact; optionally the state-swap test."""
        from ..analysis.trace_study import load_facts, trace_study
        from ..analysis.tracing import KIND_SITES
        from ..errors import SupereditError
        from ..models import load_model

        kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
        bad = [k for k in kind_list if k not in KIND_SITES]
        if bad or not kind_list:
            raise SupereditError(f"--kinds {kinds!r}: unknown {bad}; choose from {sorted(KIND_SITES)}")
        if window is not None and window < 1:
            raise SupereditError(f"--window must be >= 1, got {window}")
        is_testbed = prompt is None and subject is None and requests is None
        fact_args = dict(model=model, prompt=prompt, subject=subject, target=target, requests=requests, n=n, seed=seed)
        facts = None if is_testbed else load_facts(**fact_args)
        adapter = load_model(model, device=device, dtype=dtype, device_map=device_map)
        if facts is None:
            facts = load_facts(**fact_args)
        study = trace_study(adapter, facts, kinds=kind_list, window=window, noise=noise, samples=samples, seed=seed,
                            swap=swap, batch_size=batch_size, model=model)
        emit(write_trace(study, out), as_json)
