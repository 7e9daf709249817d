"""``superedit stats``: key covariance C = E[k kᵀ] per layer, computed once and cached;
``superedit stats export|import``: share cached matrices as one verified bundle file."""

from __future__ import annotations

import math

import typer

from .common import DeviceOpt, JsonOpt, ModelOpt, command, emit, parse_layers


def register(app) -> None:
    stats_app = typer.Typer(help="Key covariance C = E(k kᵀ) per layer (computed once, cached); export/import "
                                 "cached matrices as a verified bundle.", no_args_is_help=False)
    app.add_typer(stats_app, name="stats")

    @stats_app.callback(invoke_without_command=True)
    @command
    def stats(
        ctx: typer.Context,
        model: str = ModelOpt,
        layers: str = typer.Option("all", "--layers", "-l", help="Layers: '3,4,5', '2-6' or 'all'."),
        corpus: str = typer.Option(None, "--corpus", help="Text corpus: .txt (blank-line separated paragraphs, or one "
                                   "document per line), .jsonl/.json (field --text-field) or a directory of them. "
                                   "Default: the testbed's own corpus (testbed models only)."),
        tokens: int = typer.Option(100_000, "--tokens", "-n", help="Token budget."),
        max_length: int = typer.Option(128, "--max-length", help="Documents are truncated to this many tokens."),
        batch_tokens: int = typer.Option(4096, "--batch-tokens", help="About this many tokens per forward pass."),
        text_field: str = typer.Option("text", "--text-field", help="JSON field holding the text in .jsonl/.json."),
        cache_dir: str = typer.Option(None, "--cache-dir", help="Cache directory (default $SUPEREDIT_HOME/stats)."),
        recompute: bool = typer.Option(False, "--recompute", help="Ignore cached matrices and overwrite them."),
        device: str = DeviceOpt,
        as_json: bool = JsonOpt,
    ):
        """Compute (or load from the cache) the key covariance C = E(k kᵀ), k = MLP down-projection input, per layer."""
        if ctx.invoked_subcommand is not None:
            return
        from ..models import load_model
        from ..stats import collect_covariances, default_cache_dir
        from ..stats.corpus import resolve_corpus

        adapter = load_model(model, device=device)
        layer_list = parse_layers(layers, adapter.n_layers)
        corp = resolve_corpus(adapter, corpus, field=text_field)
        covs = collect_covariances(adapter, layer_list, corp, tokens, max_length=max_length,
                                   batch_tokens=batch_tokens, cache_dir=cache_dir, recompute=recompute)
        rows = []
        for layer, cov in covs.items():
            cond = cov.condition_number()
            rows.append({"layer": layer, "path": str(cov.path), "count": cov.count, "dim": cov.dim,
                         "trace": cov.trace(), "condition_number": cond if math.isfinite(cond) else None,
                         "singular": not math.isfinite(cond), "cache_hit": cov.cache_hit})
        result = {"model": model, "corpus": corp.source, "corpus_sha256": corp.fingerprint(),
                  "n_documents": len(corp), "tokens": tokens, "max_length": max_length,
                  "cache_dir": str(cache_dir or default_cache_dir()), "layers": rows}
        if as_json:
            emit(result, True)
            return
        for r in rows:
            cond = "inf (singular)" if r["singular"] else f"{r['condition_number']:.3e}"
            typer.echo(f"layer {r['layer']:3d}  {'hit ' if r['cache_hit'] else 'miss'}  count={r['count']}  "
                       f"trace={r['trace']:.6g}  cond={cond}  {r['path']}", err=True)
        emit({k: v for k, v in result.items() if k != "layers"}, False)

    @stats_app.command("export")
    @command
    def export(
        model: str = ModelOpt,
        layers: str = typer.Option(..., "--layers", "-l", help="Layers to export: '3,4,5', '2-6' or 'all'."),
        out: str = typer.Option(..., "--out", "-o", help="Bundle file to write (.safetensors)."),
        tokens: int = typer.Option(None, "--tokens", "-n", help="Only matrices of this token budget (default: every "
                                   "cached one)."),
        cache_dir: str = typer.Option(None, "--cache-dir", help="Cache directory (default $SUPEREDIT_HOME/stats)."),
        device: str = DeviceOpt,
        as_json: bool = JsonOpt,
    ):
        """Write the cached covariances of MODEL at LAYERS into one self-describing, hashed bundle file."""
        from ..models import load_model
        from ..stats.bundle import export_bundle

        adapter = load_model(model, device=device)
        result = export_bundle(adapter, parse_layers(layers, adapter.n_layers), out, cache_dir=cache_dir,
                               n_tokens=tokens)
        if not as_json:
            for e in result["entries"]:
                typer.echo(f"layer {e['layer']:3d}  n_tokens={e['n_tokens']}  count={e['count']}  "
                           f"corpus={e['corpus'][:12]}", err=True)
        emit(result if as_json else {k: v for k, v in result.items() if k not in ("entries", "model")}, as_json)

    @stats_app.command("import")
    @command
    def import_(
        bundle: str = typer.Argument(..., help="Bundle file written by 'superedit stats export'."),
        model: str = ModelOpt,
        cache_dir: str = typer.Option(None, "--cache-dir", help="Cache directory (default $SUPEREDIT_HOME/stats)."),
        device: str = DeviceOpt,
        as_json: bool = JsonOpt,
    ):
        """Verify BUNDLE (hashes, the model's identity, d_mlp, tokenizer) and put its matrices into the cache."""
        from ..models import load_model
        from ..stats.bundle import import_bundle

        adapter = load_model(model, device=device)
        result = import_bundle(bundle, adapter, cache_dir=cache_dir)
        if not as_json:
            for e in result["entries"]:
                typer.echo(f"layer {e['layer']:3d}  {e['status']:8s}  n_tokens={e['n_tokens']}  {e['path']}", err=True)
        emit(result if as_json else {k: v for k, v in result.items() if k != "entries"}, as_json)
