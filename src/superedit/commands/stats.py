"""``superedit stats``: key covariance C = E[k kᵀ] per layer, computed once and cached."""

from __future__ import annotations

import math

import typer

from .common import DeviceOpt, JsonOpt, ModelOpt, command, emit, parse_layers


def register(app) -> None:
    @app.command("stats")
    @command
    def stats(
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
