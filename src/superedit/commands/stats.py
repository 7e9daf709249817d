"""``superedit stats``: key covariance C = E[k kᵀ] per layer, computed once and cached;
``superedit stats export|import``: share cached matrices as one verified bundle file."""

from __future__ import annotations

import math
import time

import typer

from ..errors import UsageError
from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, emit, parse_layers


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
        until_converged: bool = typer.Option(False, "--until-converged", help="Stop each layer once C and C⁻¹p "
                                             "for probe keys p change by less than --tol at --patience consecutive "
                                             "checkpoints (every doubling of tokens); --tokens is then the most."),
        tol: float = typer.Option(0.05, "--tol", help="With --until-converged: relative-change tolerance."),
        first_check: int = typer.Option(4096, "--first-check", help="With --until-converged: tokens at the first "
                                        "checkpoint."),
        patience: int = typer.Option(2, "--patience", help="With --until-converged: consecutive checkpoints."),
        probes: int = typer.Option(16, "--probes", help="With --until-converged: corpus keys held out as probes."),
        probe_ridge: float = typer.Option(1e-3, "--probe-ridge", help="With --until-converged: ridge (fraction of "
                                          "C's mean diagonal) of the probe solves C⁻¹p."),
        distributed: bool = typer.Option(False, "--distributed", help="Shard the batches over the processes of a "
                                         "torchrun launch (gloo on cpu, nccl on cuda) and all-reduce the sums; "
                                         "rank 0 writes the cache and the output."),
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Compute (or load from the cache) the key covariance C = E(k kᵀ), k = MLP down-projection input, per layer."""
        if ctx.invoked_subcommand is not None:
            return
        from ..models import load_model
        from ..stats import collect_covariances, default_cache_dir
        from ..stats.corpus import resolve_corpus
        from ..stats.covariance import ConvergenceStop
        from ..stats.distributed import LOCAL, destroy_shard, init_shard

        stop = (ConvergenceStop(tol=tol, first_check=first_check, patience=patience, n_probes=probes,
                                ridge=probe_ridge) if until_converged else None)
        shard = init_shard(device) if distributed else LOCAL
        finished = False
        try:
            if distributed and device_map is not None:
                raise UsageError("--distributed places one model copy per process; it does not take --device-map")
            adapter = load_model(model, device=shard.device if distributed else device, dtype=dtype,
                                 device_map=device_map)
            layer_list = parse_layers(layers, adapter.n_layers)
            corp = resolve_corpus(adapter, corpus, field=text_field)
            t0 = time.perf_counter()
            covs = collect_covariances(adapter, layer_list, corp, tokens, max_length=max_length,
                                       batch_tokens=batch_tokens, cache_dir=cache_dir, recompute=recompute,
                                       stop=stop, shard=shard)
            seconds = time.perf_counter() - t0
            finished = True
        finally:
            destroy_shard(shard, synchronise=finished)
        if not shard.is_main:
            return
        rows = []
        for layer, cov in covs.items():
            cond = cov.condition_number()
            row = {"layer": layer, "path": str(cov.path), "count": cov.count, "dim": cov.dim,
                   "trace": cov.trace(), "condition_number": cond if math.isfinite(cond) else None,
                   "singular": not math.isfinite(cond), "cache_hit": cov.cache_hit}
            if cov.convergence is not None:
                row["converged"] = cov.convergence["converged"]
                row["checkpoints"] = cov.convergence["checkpoints"]
            rows.append(row)
        result = {"model": model, "corpus": corp.source, "corpus_sha256": corp.fingerprint(),
                  "n_documents": len(corp), "tokens": tokens, "max_length": max_length,
                  "cache_dir": str(cache_dir or default_cache_dir()), "world_size": shard.world_size, "seconds": seconds, "layers": rows}
        if as_json:
            emit(result, True)
            return
        for r in rows:
            cond = "inf (singular)" if r["singular"] else f"{r['condition_number']:.3e}"
            conv = "" if "converged" not in r else f"{'converged' if r['converged'] else 'NOT converged'}  "
            typer.echo(f"layer {r['layer']:3d}  {'hit ' if r['cache_hit'] else 'miss'}  count={r['count']}  {conv}"
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
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Write the cached covariances of MODEL at LAYERS into one self-describing, hashed bundle file."""
        from ..models import load_model
        from ..stats.bundle import export_bundle

        adapter = load_model(model, device=device, dtype=dtype, device_map=device_map)
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
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Verify BUNDLE (hashes, the model's identity, d_mlp, tokenizer) and put its matrices into the cache."""
        from ..models import load_model
        from ..stats.bundle import import_bundle

        adapter = load_model(model, device=device, dtype=dtype, device_map=device_map)
        result = import_bundle(bundle, adapter, cache_dir=cache_dir)
        if not as_json:
            for e in result["entries"]:
                typer.echo(f"layer {e['layer']:3d}  {e['status']:8s}  n_tokens={e['n_tokens']}  {e['path']}", err=True)
        emit(result if as_json else {k: v for k, v in result.items() if k != "entries"}, as_json)
