"""``superedit trace``: causal tracing heatmaps (ROME) and the state-swap test."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import typer

from .common import DeviceOpt, JsonOpt, ModelOpt, command, emit

TESTBED_DEFAULT_N = 50


# ----------------------------------------------------------------------------------------- fact input
def _read_fact_file(path: str) -> list:
    """Facts from a JSON list / JSONL file of ``{"prompt", "subject", "target"}`` records, or any
    dataset ``superedit.data.load_requests`` reads (traced with ``target_true``)."""
    from ..analysis.tracing import as_fact
    from ..errors import RequestFormatError
    from ..utils.io import read_jsonl

    p = Path(path)
    if not p.is_file():
        raise RequestFormatError(f"--requests {path!r}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
        records = records if isinstance(records, list) else [records]
    except json.JSONDecodeError:
        records = read_jsonl(p)
    if not records:
        raise RequestFormatError(f"--requests {path!r} holds no records")
    simple = all(isinstance(r, dict) and {"prompt", "subject"} <= set(r) and "target_new" not in r
                 and "requested_rewrite" not in r for r in records)
    if simple:
        return [as_fact(r, f"{path}#{i}") for i, r in enumerate(records)]
    try:
        from ..data import load_requests
    except ImportError:
        raise RequestFormatError(f"--requests {path!r}: records must be {{'prompt' (template with {{}}), 'subject', "
                                 "'target'}} (dataset formats need superedit.data)") from None
    return [as_fact(r, r.source or f"{path}#{i}") for i, r in enumerate(load_requests(path))]


def _testbed_facts(model: str) -> list:
    """True facts of a testbed model's world (one training template per relation)."""
    from ..analysis.tracing import Fact
    from ..errors import SupereditError

    hint = "pass --requests FILE or --prompt/--subject/--target"
    try:
        from ..models.loading import resolve_model_path
        from ..testbed import load_world
    except ImportError:
        raise SupereditError(f"no facts given and the testbed module is unavailable; {hint}") from None
    path, is_local = resolve_model_path(model)
    if not is_local or not (Path(path) / "testbed.json").exists():
        raise SupereditError(f"no facts given and --model {model!r} is not a testbed model (no testbed.json); {hint}")
    world = load_world(path)
    facts = []
    for s in world.subjects:
        for rid, obj in s.facts.items():
            templates = world.relation(rid).train_templates
            if templates:
                facts.append(Fact(templates[0], s.name, obj))
    if not facts:
        raise SupereditError(f"the testbed world of --model {model!r} lists no facts; {hint}")
    return facts


def _load_facts(model: str, prompt: str | None, subject: str | None, target: str | None,
                requests: str | None, n: int | None, seed: int) -> list:
    """The facts to trace, from --prompt/--subject/--target, --requests, or the testbed world."""
    from ..analysis.tracing import as_fact
    from ..errors import SupereditError

    if prompt is not None and requests is not None:
        raise SupereditError("give either --prompt/--subject/--target or --requests, not both")
    if n is not None and n < 1:
        raise SupereditError(f"--n must be >= 1, got {n}")
    if prompt is not None or subject is not None:
        if prompt is None or subject is None:
            raise SupereditError("--prompt (template with {}) and --subject go together (--target optional)")
        facts = [as_fact({"prompt": prompt, "subject": subject, "target": target}, "--prompt")]
    elif requests is not None:
        facts = _read_fact_file(requests)
    else:
        facts = _testbed_facts(model)
        n = n or TESTBED_DEFAULT_N
    if n is not None and n < len(facts):
        keep = sorted(random.Random(f"superedit-trace:{seed}").sample(range(len(facts)), n))
        facts = [facts[i] for i in keep]
    return facts


# ----------------------------------------------------------------------------------------- command
def _round(obj: Any, digits: int = 6) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, digits) for v in obj]
    return obj


def run_trace(adapter, facts: list, model: str, kind_list: list[str], window: int | None, noise: float, samples: int,
              seed: int, swap: bool, out: str | Path, batch_size: int = 256) -> dict[str, Any]:
    """Trace ``facts``, optionally run the state swap, write heatmaps + trace.json into ``out``; return a summary."""
    from ..analysis.tracing import CATEGORIES, default_window, state_swap, summarize_traces, trace_fact_kinds
    from ..report import plots
    from ..utils.io import write_json_atomic
    from ..utils.logs import get_logger
    from ..utils.progress import progress

    log = get_logger("superedit.commands.trace")
    nl = adapter.n_layers
    windows = {k: (1 if k == "resid" else (window or default_window(k, nl))) for k in kind_list}
    log.info("tracing %d fact(s) on %s: kinds %s, windows %s, noise %.2f x emb std, %d samples",
             len(facts), model, kind_list, windows, noise, samples)

    per_fact, by_kind = [], {k: [] for k in kind_list}
    for fact in progress(facts, total=len(facts), desc="trace"):
        res = trace_fact_kinds(adapter, fact, kind_list, windows, noise, samples, seed, batch_size)
        for k, r in res.items():
            by_kind[k].append(r)
        per_fact.append({"prompt": fact.prompt, "subject": fact.subject, "target": fact.target,
                         "traces": {k: r.to_dict() for k, r in res.items()}})

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: summarize_traces(rs) for k, rs in by_kind.items()}
    files = []
    for k in kind_list:
        if len(facts) == 1:
            r = by_kind[k][0]
            first, last = r.subject_span
            title = (f"{r.prompt!r} -> {r.target!r}: restored {k}, window {r.window}\n"
                     f"p_clean {r.p_clean:.3f}, p_corrupt {r.p_corrupt:.3f}")
            files.append(plots.trace_heatmap(r.scores.T, r.tokens, out_dir / f"trace_{k}.png", kind=k,
                                             title=title, highlight=range(first, last + 1)))
        else:
            cats = summary[k]["categories"]
            grid = [cats[c]["mean_ie"] or [None] * nl for c in CATEGORIES]
            title = (f"mean indirect effect of restored {k} over {len(facts)} facts, window {windows[k]}\n"
                     f"mean p_clean {summary[k]['mean_p_clean']:.3f}, "
                     f"p_corrupt {summary[k]['mean_p_corrupt']:.3f}")
            files.append(plots.trace_heatmap(grid, list(CATEGORIES), out_dir / f"trace_{k}_avg.png", kind=k,
                                             title=title, cbar_label="mean IE"))

    swap_res = None
    if swap:
        sw = state_swap(adapter, facts, seed=seed, batch_size=min(batch_size, 64))
        swap_res = sw.to_dict()
        if sw.n_pairs:
            title = f"state swap at the last subject token ({sw.n_pairs} pairs)"
            files.append(plots.rate_by_layer({"transfer": sw.transfer_rate, "keep": sw.keep_rate}, sw.layers,
                                             out_dir / "swap.png", title=title))
        else:
            swap_res["note"] = "no pair of facts with the same template and different answers"

    config = dict(model=model, identity=adapter.identity(), n_layers=nl, kinds=kind_list, windows=windows,
                  noise_scale=noise, samples=samples, seed=seed,
                  target_rule="probability of the target's first token at the last prompt token")
    write_json_atomic(out_dir / "trace.json", _round(dict(config=config, summary=summary, swap=swap_res,
                                                          facts=per_fact)))
    files.insert(0, out_dir / "trace.json")

    result: dict[str, Any] = dict(model=model, n_facts=len(facts), n_layers=nl, kinds=kind_list, windows=windows,
                                  out=str(out_dir), files=[str(f) for f in files])
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
        as_json: bool = JsonOpt,
    ):
        """Causal tracing (ROME): which hidden states carry a fact; optionally the state-swap test."""
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
        facts = None if is_testbed else _load_facts(model, prompt, subject, target, requests, n, seed)
        adapter = load_model(model, device=device)
        if facts is None:
            facts = _load_facts(model, prompt, subject, target, requests, n, seed)
        result = run_trace(adapter, facts, model, kind_list, window, noise, samples, seed, swap, out,
                           batch_size)
        emit(result, as_json)
