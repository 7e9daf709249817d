"""``superedit keys``: why edits are not robust — key geometry of a subject's variants.

    superedit keys --model builtin --layer 3 --n 50 --out runs/keys

Writes ``geometry.json`` (whitening-similarity distributions, PCA of one subject's variants, value
norms before/after single ROME edits), ``similar_keys.jsonl`` (per subject the top corpus positions
closest in whitening space whose prefix lacks the subject), ``plots/`` and ``report.html``.
"""

from __future__ import annotations

from typing import Optional

import typer

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, default_device, emit


def register(app) -> None:
    @app.command("keys")
    @command
    def keys(model: str = ModelOpt,
             requests: Optional[str] = typer.Option(None, "--requests", help="Edit requests file (default: the testbed's)."),
             layer: Optional[int] = typer.Option(None, "--layer", help="Layer whose keys are analysed (default: ROME's layer)."),
             out: str = typer.Option(..., "--out", help="Output directory."),
             n: Optional[int] = typer.Option(None, "--n", help="Number of requests (seeded sample)."),
             corpus: Optional[str] = typer.Option(None, "--corpus", help="Corpus for C, long contexts and the scan."),
             rephrases: Optional[str] = typer.Option(None, "--rephrases", help="JSON subject -> [rephrases]."),
             top: int = typer.Option(10, "--top", help="Similar-but-unrelated corpus positions kept per subject."),
             n_docs: int = typer.Option(200, "--scan-docs", help="Corpus documents scanned."),
             ridge: Optional[float] = typer.Option(None, "--ridge", help="Ridge on C (fraction of its mean diagonal; default: ROME's mom2_ridge)."),
             edit: bool = typer.Option(True, "--edit/--no-edit", help="Value norms before/after single ROME edits."),
             hparams: Optional[str] = typer.Option(None, "--hparams", help="YAML overriding ROME's hparams."),
             n_long: int = typer.Option(4, "--n-long"), long_words: int = typer.Option(300, "--long-words"),
             mom2_tokens: Optional[int] = typer.Option(None, "--mom2-tokens", help="Corpus tokens for C."),
             stats_dir: Optional[str] = typer.Option(None, "--stats-dir", help="Covariance cache directory."),
             seed: int = typer.Option(0, "--seed"),
             device: str = DeviceOpt, dtype: str = DtypeOpt, device_map: str = DeviceMapOpt,
               as_json: bool = JsonOpt,
             verbose: bool = typer.Option(False, "--verbose", "-v")):
        """Whitening similarities of a subject's variants, similar-but-unrelated corpus keys, value norms."""
        from ..models import load_model
        from ..robust.geometry import run_geometry
        from ..robust.perturb import build_perturbations, corpus_words, load_rephrases
        from .common import build_hparams, hparams_profile, local_model_dir, make_stats, resolve_requests
        from ..stats.corpus import resolve_corpus

        adapter = load_model(model, device=default_device(device, device_map), dtype=dtype, device_map=device_map)
        mdir = local_model_dir(model)
        profile = hparams_profile(adapter, mdir)
        hp = build_hparams("rome", profile, hparams, adapter.n_layers, str(layer) if layer is not None else None,
                           mom2_tokens, corpus)
        layer_ = hp.layers[0]
        reqs = resolve_requests(mdir, requests, n=n, seed=seed)
        corpus_obj = resolve_corpus(adapter, corpus)
        texts = corpus_obj.texts
        psets, skips = build_perturbations(adapter.tokenizer, reqs, words=corpus_words(texts),
                                           rephrases=load_rephrases(rephrases) if rephrases else None,
                                           n_long=n_long, long_words=long_words,
                                           max_tokens=adapter.max_positions - 8, seed=seed)
        stats = make_stats(adapter, hp, stats_dir, corpus_obj)
        geometry = run_geometry(adapter, reqs, psets, layer_, stats, corpus_texts=texts,
                                ridge=hp.mom2_ridge if ridge is None else ridge, top=top,
                                n_docs=n_docs, edit_hp=hp if edit else None, seed=seed, fact_token=hp.fact_token)
        geometry.save(out)
        from ..report.keys_report import render_keys_plots, write_keys_report
        from ..report.provenance import record_command

        record_command(out)
        render_keys_plots(out)
        report = write_keys_report(out)
        result = {"out": str(out), "report": str(report), "profile": profile, "skips": skips,
                  **geometry.summary()}
        emit(result, as_json)
        return result
