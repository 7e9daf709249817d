"""``superedit edit``: apply edits with any registered method and evaluate them (CounterFact + zsRE metrics).

Writes ``OUT/records.jsonl`` (one record per request, appended as it goes), ``OUT/summary.json``
and, with ``--save-delta DIR``, the merged delta of all edits (``superedit eval --delta DIR`` reads it).
With ``--sequential`` the edits go through an edit ledger in ``OUT/ledger`` (``Ledger.step``, the same
sequential loop as ``superedit lifelong``): the method's state (D4S sums, AlphaEdit's earlier keys)
carries over from batch to batch, and ``superedit ledger show|undo|export`` work on it.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from .common import (DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, build_hparams, command, emit, format_choices, hparams_profile,
                     local_model_dir, make_stats, method_choices, resolve_requests)

RequestsOpt = typer.Option(None, "--requests", "-r", help="Dataset file (CounterFact, MQuAKE, EasyEdit, zsRE-MEND, "
                           "superedit JSONL). Optional for testbed models (their own counterfactual requests).")
FormatOpt = typer.Option("auto", "--format", help=f"Dataset format: {format_choices()}.")
LimitOpt = typer.Option(None, "--limit", "-n", help="Use only the first N requests.")
GenTokensOpt = typer.Option(100, "--gen-tokens", help="Tokens sampled (top-k 5) per generation prompt for the n-gram "
                            "entropy fluency metric, pre and post (0: skip fluency).")
GreedyTokensOpt = typer.Option(12, "--greedy-tokens", help="Tokens of greedy continuation per rewrite, paraphrase and "
                               "neighbourhood prompt for the generation-based scores gen_efficacy / gen_paraphrase / "
                               "gen_neighborhood (0: skip them).")
SeedOpt = typer.Option(0, "--seed", help="Seed for sampling (fluency generations, testbed requests).")


# ------------------------------------------------------------------------------------- helpers
def start_out_dir(out: str | None, prefix: str) -> Path:
    """The output directory (default ``runs/<prefix>-<timestamp>``), with any old records.jsonl removed."""
    from ..utils.logs import get_logger

    d = Path(out) if out else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    d.mkdir(parents=True, exist_ok=True)
    rec = d / "records.jsonl"
    if rec.exists():
        get_logger(__name__).warning("%s exists; overwriting it", rec)
        rec.unlink()
    return d


def print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        emit(summary, True)
        return
    pre, post = summary.get("pre", {}), summary.get("post", {})
    lines = [f"{'metric':24s} {'pre':>10s} {'post':>10s}"]
    for key in post:
        a = pre.get(key)
        a_txt = "-" if a is None else format(a, ".4f")
        lines.append(f"{key:24s} {a_txt:>10s} {post[key]:10.4f}")
    typer.echo("\n".join(lines), err=True)
    emit({k: v for k, v in summary.items() if k not in ("pre", "post", "counts", "hparams", "model_identity")}, False)


def check_known(adapter, reqs: list, only_known: bool, log) -> tuple[list, dict]:
    """Measure which requests' target_true the model knows (top-1 rule of ``superedit data known``); warn
    with the share it does not know, and with ``only_known`` drop those (an error if none is left)."""
    from ..data.known import judge_known
    from ..errors import SupereditError

    idx = [i for i, r in enumerate(reqs) if r.target_true]
    with_true = [reqs[i] for i in idx]
    if not with_true:
        return reqs, {"n_checked": 0}
    verdicts = judge_known(adapter, with_true, "top1")
    unknown = {i for i, v in zip(idx, verdicts) if not v.known}
    info = {"n_checked": len(with_true), "n_unknown": len(unknown), "share_unknown": len(unknown) / len(with_true)}
    if unknown:
        log.warning("the model does not know %d of %d requests' target_true (%.0f%%: its greedy next token is not "
                    "the true object's first token)%s", len(unknown), len(with_true), 100 * info["share_unknown"],
                    "; dropping them (--only-known)" if only_known else
                    "; edits of facts it never knew measure little — pass --only-known to drop them, or filter "
                    "with `superedit data known`")
    if only_known:
        reqs = [r for i, r in enumerate(reqs) if i not in unknown]
        info["dropped"] = len(unknown)
        if not reqs:
            raise SupereditError("--only-known: the model knows none of the requests' target_true; nothing to edit")
    return reqs, info


# ------------------------------------------------------------------------------------- command
def register(app) -> None:
    @app.command("edit")
    @command
    def edit(
        model: str = ModelOpt,
        method: str = typer.Option("rome", "--method", help=f"Editing method: {method_choices()}."),
        requests: str = RequestsOpt,
        fmt: str = FormatOpt,
        limit: int = LimitOpt,
        batch_size: int = typer.Option(1, "--batch-size", "-b", help="Requests per method call (MEMIT batch editing)."),
        sequential: bool = typer.Option(False, "--sequential", help="Keep every edit (lifelong editing, through an "
                                        "edit ledger in OUT/ledger) instead of reverting after each batch."),
        hparams: str = typer.Option(None, "--hparams", help="YAML file overriding the packaged hyperparameters."),
        layers: str = typer.Option(None, "--layers", "-l", help="Edited layer(s), e.g. '3' or '3,4,5' (overrides hparams)."),
        corpus: str = typer.Option(None, "--corpus", help="Corpus for the key covariance (default: the testbed's own)."),
        mom2_tokens: int = typer.Option(None, "--mom2-tokens", help="Corpus tokens for the key covariance."),
        save_delta: str = typer.Option(None, "--save-delta", help="Save the merged delta of all edits to this directory."),
        out: str = typer.Option(None, "--out", "-o", help="Output directory (default runs/edit-<method>-<time>)."),
        gen_tokens: int = GenTokensOpt,
        greedy_tokens: int = GreedyTokensOpt,
        seed: int = SeedOpt,
        only_known: bool = typer.Option(False, "--only-known", help="Drop the requests whose target_true the model "
                                        "does not know (its greedy next token is not target_true's first token; "
                                        "`superedit data known` documents the rule). Without it they are kept and "
                                        "their share is reported."),
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Edit facts with ROME, MEMIT, FT, D4S or AlphaEdit; evaluate each edit before/after (efficacy,
        paraphrase, neighbourhood, S, rewrite/rephrase accuracy, locality, fluency)."""
        from ..editing.methods import get_method
        from ..editing.run import run_edits
        from ..models import load_model
        from ..utils.io import write_json_atomic
        from ..utils.logs import get_logger
        from ..utils.seed import seed_everything

        log = get_logger("superedit.commands.edit")
        entry = get_method(method)
        if not sequential:  # refused before any model is loaded
            entry.require_weight_edits("`superedit edit` without --sequential (each batch reverted after scoring)")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be ≥ 1 (got {batch_size})")
        seed_everything(seed)
        adapter = load_model(model, device=device, dtype=dtype, device_map=device_map)
        model_dir = local_model_dir(model)
        profile = hparams_profile(adapter, model_dir)
        hp = build_hparams(method, profile, hparams, adapter.n_layers, layers, mom2_tokens, corpus)
        reqs = resolve_requests(model_dir, requests, fmt, limit, seed=seed)
        reqs, known_info = check_known(adapter, reqs, only_known, log)
        stats = make_stats(adapter, hp, corpus=corpus) if entry.needs_stats else None
        out_dir = start_out_dir(out, f"edit-{method}")
        ledger = None
        if sequential:
            import shutil

            from ..lifelong.ledger import Ledger

            if (out_dir / "ledger").exists():
                log.warning("%s exists; replacing it", out_dir / "ledger")
                shutil.rmtree(out_dir / "ledger")
            ledger = Ledger.create(out_dir / "ledger", adapter, method, hp)
        log.info("%s: %d request(s), batch size %d, %s, hparams profile %s, layers %s → %s", method, len(reqs),
                 batch_size, "sequential" if sequential else "independent", profile, hp.layers, out_dir)
        records, summary, merged = run_edits(adapter, reqs, method, hp, stats, batch_size=batch_size,
                                             sequential=sequential, out_path=out_dir / "records.jsonl",
                                             gen_tokens=gen_tokens, eval_seed=seed, return_delta=True, ledger=ledger,
                                             greedy_tokens=greedy_tokens)
        delta_path = None
        if save_delta:
            if merged is None:
                log.warning("no edit succeeded; no delta saved to %s", save_delta)
            else:
                merged.meta["requests_file"] = str(requests) if requests else None
                delta_path = str(merged.save(save_delta))
        summary.update({"known_check": known_info, "model": model, "profile": profile, "hparams": hp.to_dict(),
                        "model_identity": adapter.identity(), "requests_file": requests, "limit": limit,
                        "gen_tokens": gen_tokens, "seed": seed, "out_dir": str(out_dir),
                        "records": str(out_dir / "records.jsonl"), "delta": delta_path,
                        "ledger": str(ledger.dir) if ledger is not None else None})
        write_json_atomic(out_dir / "summary.json", summary)
        print_summary(summary, as_json)
