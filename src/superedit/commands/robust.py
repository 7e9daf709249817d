"""``superedit robust``: ROME/MEMIT edits with and without the REP key adaptor, on perturbed queries.

Example (testbed; requests from the testbed's world, aliases as subject rephrases)::

    superedit robust --model builtin --method rome --adaptor both --n 20 --tau-sweep 0.5,0.7,0.9,0.95 --out runs/rep

Writes ``records.jsonl`` (one record per request), ``table.json`` + ``table.csv`` (micro-averaged
metrics per setting, τ sweep, skip counts), ``perturbations.jsonl``, ``plots/`` and ``report.html``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from .common import (DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, build_hparams, command, default_device, emit, hparams_profile,
                     local_model_dir, make_stats, resolve_requests)


# ------------------------------------------------------------------------------------------ shared helpers
def parse_taus(spec: str | None) -> list[float]:
    if not spec:
        return []
    try:
        taus = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--tau-sweep {spec!r}: give comma-separated numbers in [0, 1], e.g. 0.5,0.7,0.9") from None
    bad = [t for t in taus if not 0 <= t <= 1]
    if bad:
        raise UsageError(f"--tau-sweep: values {bad} are outside [0, 1]")
    return taus


def resumable_records(out_dir: Path, run: dict, resume: bool, requests: list) -> list[dict]:
    """The finished records of an earlier run in ``out_dir`` to continue (``--resume``), [] for a fresh run.

    ``run``: this invocation's settings (what ``OUT/run.json`` and ``OUT/perturbations.jsonl`` saved) for
    ``requests``. A directory holding records needs ``--resume``; resuming needs the same settings, else
    UsageError naming the fields that differ, and records of those requests in order. Nothing is written here."""
    import json

    from ..utils.io import read_jsonl

    rec_path, run_path = out_dir / "records.jsonl", out_dir / "run.json"
    has_records = rec_path.is_file() and rec_path.stat().st_size > 0
    if not resume:
        if has_records:
            raise UsageError(f"{out_dir} already holds a robustness run ({rec_path.name}); pass --resume to continue "
                             "it, or choose another --out directory")
        return []
    if not has_records:
        return []
    if not run_path.is_file():
        raise UsageError(f"{out_dir} holds {rec_path.name} but no run.json (written by an older superedit): "
                         "it cannot be checked against these options; start again in another --out directory")
    old = json.loads(run_path.read_text())
    old["perturbations"] = read_jsonl(out_dir / "perturbations.jsonl") if (out_dir / "perturbations.jsonl").is_file() else None
    diff = sorted(k for k in run if json.loads(json.dumps(run[k], default=str)) != old.get(k))
    if diff:
        raise UsageError(f"{run_path}: cannot resume with different {', '.join(diff)} (other --requests/--n/--seed/"
                         "hyperparameters/perturbation options?); use the original options or another --out directory")
    from ..robust.evaluate import check_finished_records

    done = read_jsonl(rec_path)
    try:
        check_finished_records(done, requests)
    except ValueError as exc:
        raise UsageError(f"{rec_path}: {exc}; start again in another --out directory") from None
    return done


def register(app) -> None:
    @app.command("robust")
    @command
    def robust(model: str = ModelOpt,
               requests: Optional[str] = typer.Option(None, "--requests", help="Edit requests file (default: the testbed's)."),
               method: str = typer.Option("rome", "--method", help="rome | memit."),
               adaptor: str = typer.Option("both", "--adaptor", help="on | off | both: evaluate the edit with/without REP."),
               tau: float = typer.Option(0.9, "--tau", help="Gate threshold τ at inference."),
               n: Optional[int] = typer.Option(None, "--n", help="Number of requests (seeded sample)."),
               layers: Optional[str] = typer.Option(None, "--layers", help="Edited layer(s), overriding the hparams."),
               corpus: Optional[str] = typer.Option(None, "--corpus", help="Corpus for C and long contexts (default: the testbed's)."),
               tau_sweep: Optional[str] = typer.Option(None, "--tau-sweep", help="Comma-separated τ values, e.g. 0.5,0.7,0.9,0.95."),
               out: str = typer.Option(..., "--out", help="Output directory."),
               hparams: Optional[str] = typer.Option(None, "--hparams", help="YAML overriding the edit hparams."),
               rephrases: Optional[str] = typer.Option(None, "--rephrases", help="JSON subject -> [rephrases] (added to subject_rephrases)."),
               steps: Optional[int] = typer.Option(None, "--steps", help="Adaptor Adam steps (default: the rep profile, 100 on testbeds; the paper and other models: 10)."),
               lr: Optional[float] = typer.Option(None, "--lr", help="Adaptor learning rate (default: the rep profile, 5e-3 on testbeds; the paper and other models: 5e-4)."),
               rank: Optional[int] = typer.Option(None, "--rank", help="Adaptor rank r (default 32)."),
               gate_weight: Optional[float] = typer.Option(None, "--gate-weight", help="Weight of the gate locality BCE (default 1)."),
               similarity: Optional[str] = typer.Option(None, "--similarity", help="Adaptor pull objective: whitening (cosine of C^-1/2 k̂ and C^-1/2 k*; default) or u_cosine (cos(k̂, C⁻¹k*))."),
               adaptor_hparams: Optional[str] = typer.Option(None, "--adaptor-hparams", help="YAML of adaptor hparams (rank, num_steps, lr, similarity, …) over the packaged rep/<profile>.yaml; the options above override it."),
               n_long: int = typer.Option(4, "--n-long", help="Long contexts per request (split 50/50 ID/OOD)."),
               long_words: int = typer.Option(300, "--long-words", help="Words per long context (trimmed to the model's window)."),
               n_shuffles: int = typer.Option(10, "--n-shuffles", help="Max token permutations per subject."),
               mom2_tokens: Optional[int] = typer.Option(None, "--mom2-tokens", help="Corpus tokens for C."),
               stats_dir: Optional[str] = typer.Option(None, "--stats-dir", help="Covariance cache directory."),
               save_edits: bool = typer.Option(False, "--save-edits", help="Save each delta + adaptor under OUT/edits/."),
               resume: bool = typer.Option(False, "--resume", help="Continue the run in --out after its last finished "
                                           "request (the same options are required)."),
               seed: int = typer.Option(0, "--seed"),
               device: str = DeviceOpt, dtype: str = DtypeOpt, device_map: str = DeviceMapOpt,
               as_json: bool = JsonOpt,
               verbose: bool = typer.Option(False, "--verbose", "-v")):
        """Robust Edit Pathway: edits vs edits + gated key adaptor on rephrased, shuffled and long-context queries."""
        from ..models import load_model
        from ..editing.hparams import load_hparams
        from ..robust.adaptor import AdaptorHParams
        from ..robust.evaluate import run_robust, summarize_records, table_rows
        from ..robust.perturb import build_perturbations, corpus_words, load_rephrases
        from ..stats.corpus import resolve_corpus
        from ..utils.io import write_json_atomic, write_jsonl_atomic, write_text_atomic
        from ..utils.logs import get_logger

        log = get_logger("superedit.robust")
        from ..editing.methods import get_method

        if get_method(method).rank_one is None:  # REP steers the key direction of a closed-form key→value edit
            raise UsageError(f"--method must be rome or memit (got {method!r})")
        if adaptor not in ("on", "off", "both"):
            raise UsageError(f"--adaptor must be on, off or both (got {adaptor!r})")
        taus = parse_taus(tau_sweep)
        adapter = load_model(model, device=default_device(device, device_map), dtype=dtype, device_map=device_map)
        mdir = local_model_dir(model)
        profile = hparams_profile(adapter, mdir)
        hp = build_hparams(method, profile, hparams, adapter.n_layers, layers, mom2_tokens, corpus)
        ahp = load_hparams(AdaptorHParams, "rep", profile, adaptor_hparams,
                           {k: v for k, v in {"tau": tau, "num_steps": steps, "lr": lr, "rank": rank,
                                              "gate_weight": gate_weight, "seed": seed,
                                              "similarity": similarity}.items() if v is not None})
        reqs = resolve_requests(mdir, requests, n=n, seed=seed)
        corpus_obj = resolve_corpus(adapter, corpus)
        words = corpus_words(corpus_obj)
        psets, skips = build_perturbations(adapter.tokenizer, reqs, words=words,
                                           rephrases=load_rephrases(rephrases) if rephrases else None,
                                           n_shuffles=n_shuffles, n_long=n_long, long_words=long_words,
                                           max_tokens=adapter.max_positions - 8, seed=seed)
        out_dir = Path(out)
        rec_path = out_dir / "records.jsonl"
        run = {"model": model, "profile": profile, "method": method, "requests": [str(r.case_id) for r in reqs],
               "edit_hparams": hp.to_dict(), "adaptor_hparams": ahp.to_dict(), "adaptor": adaptor, "tau_sweep": taus,
               "seed": seed, "dtype": str(adapter.dtype), "perturbations": [p.to_dict() for p in psets]}
        done = resumable_records(out_dir, run, resume, reqs)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "run.json", {k: v for k, v in run.items() if k != "perturbations"})
        write_jsonl_atomic(out_dir / "perturbations.jsonl", run["perturbations"])
        write_jsonl_atomic(rec_path, done)  # a torn last line of the interrupted run is dropped here
        if done:
            log.info("resuming %s: %d of %d request(s) already finished", out_dir, len(done), len(reqs))
        log.info("%s on %s (profile %s, layers %s): %d request(s), adaptor %s, τ=%g, adaptor steps %d lr %g, pull %s",
                 method, model, profile, hp.layers, len(reqs), adaptor, tau, ahp.num_steps, ahp.lr, ahp.similarity)
        stats = make_stats(adapter, hp, stats_dir, corpus_obj)
        records = run_robust(adapter, reqs, psets, method, hp, stats, adaptor, ahp, taus, negative_words=words,
                             out_path=rec_path, save_dir=str(out_dir / "edits") if save_edits else None,
                             corpus_texts=corpus_obj.texts if corpus_obj is not None else (), done=done)
        summary = summarize_records(records)
        summary["config"] = {"model": model, "profile": profile, "method": method, "layers": hp.layers, "tau": tau,
                             "tau_sweep": taus, "adaptor": adaptor, "n": len(reqs), "seed": seed,
                             "edit_hparams": hp.to_dict(), "adaptor_hparams": ahp.to_dict(),
                             "perturbation": {"n_long": n_long, "long_words": long_words, "n_shuffles": n_shuffles,
                                              "rephrases_file": rephrases}}
        write_json_atomic(out_dir / "table.json", summary)
        rows = table_rows(summary)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["setting", "metric", "acc", "n", "edits"])
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(out_dir / "table.csv", buf.getvalue())
        from ..report.provenance import record_command
        from ..report.robust_report import render_plots, write_report

        record_command(out_dir)
        plots = render_plots(out_dir)
        report = write_report(out_dir)
        result = {"out": str(out_dir), "report": str(report), "records": str(rec_path),
                  "plots": [str(p) for p in plots], "n_requests": summary["n_requests"], "n_errors": summary["n_errors"],
                  "skips": summary["skips"],
                  "table": {s: {m: v["acc"] for m, v in ms.items()} for s, ms in summary["settings"].items()},
                  "tau_sweep": summary["tau_sweep"], "adaptor_hparams": ahp.to_dict()}
        emit(result, as_json)
        return result
