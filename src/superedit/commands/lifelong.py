"""``superedit lifelong``: sequential editing of one seeded edit stream with several methods.

Each method edits a fresh copy of the model through a ledger in ``OUT/<method>/ledger`` (resumable with
``--resume``); checkpoints every ``--eval-every`` edits go to ``OUT/metrics.jsonl``; ``OUT/report.html``
shows the curves. See :mod:`superedit.lifelong.runner`. ``--reedit-facts K`` makes the stream rounds of
re-edits over K facts, so it can be longer than the number of facts (:mod:`superedit.lifelong.reedits`).
"""

from __future__ import annotations

import random
from pathlib import Path

import typer

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, emit, format_choices, method_choices

DEFAULT_METHODS = "rome,memit,d4s,alphaedit"


def method_hparams_path(hparams_dir: str | None, method: str, profile: str) -> str | None:
    """``DIR/<method>.yaml`` or ``DIR/<method>/<profile>.yaml`` (the first that exists), else None."""
    if not hparams_dir:
        return None
    d = Path(hparams_dir)
    if not d.is_dir():
        from ..errors import SupereditError

        raise SupereditError(f"--hparams-dir {hparams_dir!r}: no such directory")
    for p in (d / f"{method}.yaml", d / method / f"{profile}.yaml"):
        if p.is_file():
            return str(p)
    return None


STREAM_ORDERS = ("subject-rounds", "shuffled")


def subject_rounds(reqs: list) -> list:
    """Stable reorder: every subject's first request, then every subject's second, and so on, so a
    stream edits distinct subjects for as long as there are any (as a dataset of one record per
    subject does) and re-edits a subject only once all have been edited."""
    seen: dict[str, int] = {}
    rank = []
    for i, r in enumerate(reqs):
        k = seen.get(r.subject, 0)
        seen[r.subject] = k + 1
        rank.append((k, i))
    return [reqs[i] for _, i in sorted(rank)]


def reads_saved_stream(requests: str | None, model_dir: Path | None, out: Path, resume: bool) -> bool:
    """Whether :func:`load_stream` returns ``OUT/stream.jsonl`` as it was saved: on --resume without
    --requests for a model that is not a testbed (a testbed rebuilds its requests)."""
    return bool(resume and not requests and (out / "stream.jsonl").exists()
                and (model_dir is None or not (model_dir / "testbed.json").exists()))


def load_stream(requests: str | None, fmt: str, model_dir: Path | None, seed: int, out: Path, resume: bool,
                order: str = "subject-rounds") -> list:
    """All candidate requests in stream order (seeded shuffle, then ``order``: see
    :func:`subject_rounds`). On --resume without --requests the saved stream comes first (so the run
    continues on exactly the same edits; :func:`reads_saved_stream`)."""
    from ..data import EditRequest, load_requests
    from ..errors import SupereditError
    from ..utils.io import read_jsonl

    if reads_saved_stream(requests, model_dir, out, resume):
        return [EditRequest.from_dict(r) for r in read_jsonl(out / "stream.jsonl")]
    if requests:
        reqs = list(load_requests(requests, fmt=fmt))
    else:
        from .common import testbed_meta

        if testbed_meta(model_dir) is None:
            raise SupereditError("--requests is required for non-testbed models: pass a dataset file "
                                 "(CounterFact, MQuAKE, EasyEdit, zsRE-MEND or superedit JSONL)")
        from ..testbed.access import default_edit_requests

        reqs = list(default_edit_requests(model_dir, None, seed))
    if order not in STREAM_ORDERS:
        raise SupereditError(f"--stream-order must be one of {', '.join(STREAM_ORDERS)}, got {order!r}")
    random.Random(f"lifelong-stream:{seed}").shuffle(reqs)
    return subject_rounds(reqs) if order == "subject-rounds" else reqs


def reedit_or_saved(reqs: list, k: int, edits: int, seed: int, saved: bool) -> list:
    """The --reedit-facts stream: :func:`superedit.lifelong.reedits.reedit_stream` over the candidates
    ``reqs``, or, when ``reqs`` is the saved stream itself (``saved``: see :func:`reads_saved_stream`),
    that stream as it is, checked to edit ``k`` facts (its targets were drawn among candidates no longer
    at hand)."""
    from ..errors import SupereditError
    from ..lifelong.reedits import reedit_stream

    if not saved:
        return reedit_stream(reqs, k, edits, seed)
    if len(reqs) < edits:
        raise SupereditError(f"--edits {edits}: the saved stream of this run holds {len(reqs)} edits; to lengthen "
                             "the run, pass --requests (the file it was started with) as well")
    n_facts = len({r.fact_key for r in reqs[:edits]})
    if n_facts != min(k, edits):
        raise SupereditError(f"--reedit-facts {k}: the saved stream of this run edits {n_facts} distinct facts; "
                             "resume with the original --reedit-facts")
    return reqs[:edits]


def register(app) -> None:
    @app.command("lifelong")
    @command
    def lifelong(
        model: str = ModelOpt,
        requests: str = typer.Option(None, "--requests", "-r", help="Dataset file (CounterFact, MQuAKE, EasyEdit, "
                                     "zsRE-MEND, superedit JSONL). Optional for testbed models (their own "
                                     "counterfactual requests)."),
        fmt: str = typer.Option("auto", "--format", help=f"Dataset format: {format_choices()}."),
        methods: str = typer.Option(DEFAULT_METHODS, "--methods", help=f"Comma-separated methods: {method_choices()}."),
        edits: int = typer.Option(200, "--edits", "-n", help="Number of edits (requests) in the stream; with "
                                  "--reedit-facts K it may exceed the number of facts (rounds of re-edits over "
                                  "K facts)."),
        batch_size: int = typer.Option(1, "--batch-size", "-b", help="Requests per method call."),
        eval_every: int = typer.Option(50, "--eval-every", help="Checkpoint every this many edits (also at 0 and at the end)."),
        out: str = typer.Option(None, "--out", "-o", help="Output directory (default runs/lifelong-<time>)."),
        probe_n: int = typer.Option(200, "--probe-n", help="Untouched true facts in the retention probe."),
        probe_requests: str = typer.Option(None, "--probe-requests", help="Dataset file whose true facts form the "
                                           "retention probe (default: the --requests left after the stream); a "
                                           "fact whose subject and relation the stream edits is left out."),
        block_size: int = typer.Option(100, "--block-size", help="Edits per block for the degree of forgetting."),
        max_neighbours: int = typer.Option(5, "--max-neighbours", help="Neighbourhood prompts evaluated per edit."),
        hparams: str = typer.Option(None, "--hparams", help="YAML file overriding the packaged hyperparameters of "
                                    "every method (as for `superedit edit`; not with --hparams-dir)."),
        layers: str = typer.Option(None, "--layers", "-l", help="Edited layer(s) of every method, e.g. '3' or "
                                   "'3,4,5' (overrides hparams)."),
        hparams_dir: str = typer.Option(None, "--hparams-dir", help="Directory with <method>.yaml (or "
                                        "<method>/<profile>.yaml) overriding the packaged hyperparameters."),
        corpus: str = typer.Option(None, "--corpus", help="Corpus for the key covariance and held-out perplexity "
                                   "(default: the testbed's own)."),
        mom2_tokens: int = typer.Option(None, "--mom2-tokens", help="Corpus tokens for the key covariance."),
        seed: int = typer.Option(0, "--seed", help="Seed of the edit stream and the probe."),
        stream_order: str = typer.Option("subject-rounds", "--stream-order", help="subject-rounds: distinct "
                                         "subjects first, a subject is re-edited only after all were edited; "
                                         "shuffled: the seeded shuffle as is (re-edits anywhere)."),
        reedit_facts: int = typer.Option(0, "--reedit-facts", help="K > 0: re-edit K facts. The stream is the "
                                         "first K distinct facts of the ordered requests, then rounds over the "
                                         "same K facts, each giving every fact a new seeded target (another "
                                         "object of its relation), up to --edits; checkpoints score each fact's "
                                         "latest edit only. 0: off (every request once)."),
        lm_eval_tasks: str = typer.Option(None, "--lm-eval-tasks", help="Comma-separated lm-evaluation-harness tasks "
                                          "measured at every checkpoint (needs superedit[ability]; a task whose "
                                          "data is not available locally is reported as skipped)."),
        lm_eval_include: str = typer.Option(None, "--lm-eval-include", help="Folder of extra lm-eval task YAMLs for "
                                            "--lm-eval-tasks (e.g. written by `superedit data lm-eval-task`)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out after its last committed edit; "
                                    "with a larger --edits (and --requests as before) lengthen a finished run."),
        no_report: bool = typer.Option(False, "--no-report", help="Do not write report.html."),
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Lifelong editing: apply N edits in sequence with each method (never reverted), checkpoint the
        efficacy/paraphrase/neighbourhood of all edits and of the last block, forgetting per block,
        untouched-fact retention, perplexity, weight and value norms and measured interference."""
        import time

        from ..editing.covariance import CorpusCovariance
        from ..editing.methods import get_method
        from ..errors import SupereditError
        from ..lifelong.runner import requests_probe, run_lifelong, testbed_probe
        from ..models import load_model
        from ..report.lifelong_report import summary_rows, write_report
        from ..report.provenance import record_command
        from ..utils.logs import get_logger
        from ..utils.seed import seed_everything
        from .common import build_hparams, hparams_profile, local_model_dir, testbed_meta

        log = get_logger("superedit.commands.lifelong")
        names = [m.strip() for m in methods.split(",") if m.strip()]
        if not names:
            raise SupereditError("--methods is empty; give e.g. rome,memit,d4s,alphaedit")
        entries = {m: get_method(m) for m in names}
        if hparams and hparams_dir:
            raise SupereditError("--hparams FILE and --hparams-dir DIR both override the hyperparameters; "
                                 "give one of them")
        if edits < 1:
            raise SupereditError(f"--edits must be ≥ 1 (got {edits})")
        if reedit_facts < 0:
            raise SupereditError(f"--reedit-facts must be ≥ 0 (got {reedit_facts}); 0 edits every request once")
        if reedit_facts and batch_size > reedit_facts:
            raise SupereditError(f"--batch-size {batch_size} > --reedit-facts {reedit_facts}: a batch would edit one "
                                 f"fact twice (two targets for one key); give --batch-size ≤ {reedit_facts}")
        task_names = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
        if lm_eval_include:  # checked before anything loads or is written
            if not Path(lm_eval_include).is_dir():
                raise SupereditError(f"--lm-eval-include {lm_eval_include}: not a folder; write one with "
                                     "`superedit data lm-eval-task`")
            if not task_names:
                raise SupereditError("--lm-eval-include needs --lm-eval-tasks naming the tasks to run from it")
        probe_pool = None
        if probe_requests:  # read before anything loads or is written
            from ..data import load_requests

            probe_pool = list(load_requests(probe_requests))
        out_dir = Path(out) if out else Path("runs") / f"lifelong-{time.strftime('%Y%m%d-%H%M%S')}"
        seed_everything(seed)
        adapter0 = load_model(model, device=device, dtype=dtype, device_map=device_map)
        model_dir = local_model_dir(model)
        profile = hparams_profile(adapter0, model_dir)
        hps = {m: build_hparams(m, profile, hparams or method_hparams_path(hparams_dir, m, profile), adapter0.n_layers,
                                layers, mom2_tokens if entries[m].needs_stats else None, corpus)
               for m in names}
        reqs = load_stream(requests, fmt, model_dir, seed, out_dir, resume, stream_order)
        if reedit_facts:
            stream = reedit_or_saved(reqs, reedit_facts, edits, seed,
                                     reads_saved_stream(requests, model_dir, out_dir, resume))
            facts = {r.fact_key for r in stream}
            heldout = [r for r in reqs if r.fact_key not in facts]
        else:
            if len(reqs) < edits and reads_saved_stream(requests, model_dir, out_dir, resume):
                from ..errors import UsageError

                raise UsageError(f"--edits {edits}: {out_dir / 'stream.jsonl'} holds the run's {len(reqs)} edits; to "
                                 "lengthen the run, pass --requests (the file it was started with) as well")
            if len(reqs) < edits:
                log.warning("only %d requests available; running %d edits instead of %d", len(reqs), len(reqs), edits)
            stream, heldout = reqs[:edits], reqs[edits:]
        if probe_pool is not None:
            edited = {r.fact_key for r in stream}
            heldout = [r for r in probe_pool if r.fact_key not in edited]
            random.Random(f"lifelong-probe:{seed}").shuffle(heldout)  # --probe-n takes a sample, not the head
            log.info("retention probe from %s: %d of %d facts (the rest are edited by the stream)", probe_requests,
                     len(heldout), len(probe_pool))
        stats = None
        stat_hps = [hps[m] for m in names if entries[m].needs_stats]
        if stat_hps:
            ntok = {h.mom2_n_tokens for h in stat_hps}
            if len(ntok) > 1:
                log.warning("methods ask for different mom2_n_tokens %s; using %d for all", sorted(ntok), max(ntok))
            layers = sorted({l for h in stat_hps for l in h.layers})
            stats = CorpusCovariance(adapter0, corpus or stat_hps[0].mom2_corpus or None, n_tokens=max(ntok),
                                     max_length=stat_hps[0].mom2_max_length, layers=layers)
        if testbed_meta(model_dir) is not None and not requests and not probe_requests:
            probe = testbed_probe(model_dir, stream, probe_n, seed)
        else:
            texts = []
            if corpus:
                from ..stats import Corpus

                texts = Corpus.coerce(corpus).texts[-40:]
            probe = requests_probe(heldout, texts, probe_n)
        probe.block_size, probe.max_neighbours = block_size, max_neighbours
        probe.lm_eval_tasks = task_names
        probe.lm_eval_include = str(Path(lm_eval_include).resolve()) if lm_eval_include else None
        if not probe.facts:
            log.warning("no untouched facts for the retention probe (no held-out requests with target_true)")
        first = [adapter0]

        def factory():
            return first.pop() if first else load_model(model, device=device, dtype=dtype, device_map=device_map)

        log.info("lifelong: %s × %d edits (batch %d, checkpoint every %d), profile %s → %s", ",".join(names),
                 len(stream), batch_size, eval_every, profile, out_dir)
        summary = run_lifelong(factory, stream, names, hps, stats, len(stream), batch_size, eval_every, out_dir,
                               probe, resume, seed=seed)
        record_command(out_dir)
        if not no_report:
            summary["report"] = str(write_report(out_dir))
        summary["model"] = model
        summary["profile"] = profile
        summary["hparams"] = {m: hps[m].to_dict() for m in names}
        summary["final"] = summary_rows(out_dir)
        if not as_json:
            _print_table(summary["final"])
        emit({k: v for k, v in summary.items() if as_json or k not in ("final", "hparams", "methods")}, as_json)


def _print_table(rows: list[dict]) -> None:
    cols = ["efficacy_all", "efficacy_last_block", "paraphrase_all", "neighborhood_all", "forgetting_mean",
            "untouched_retention", "perplexity", "w_l1_rel_mean", "interference_o_rel_error"]
    lines = [f"{'method':10s} {'edits':>6s} " + " ".join(f"{c[:12]:>12s}" for c in cols)]
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            vals.append(f"{v:12.4g}" if isinstance(v, (int, float)) else f"{'-':>12s}")
        lines.append(f"{r['method']:10s} {r['n_edits']:6d} " + " ".join(vals))
    typer.echo("\n".join(lines), err=True)
