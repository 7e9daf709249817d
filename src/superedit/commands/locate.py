"""``superedit locate``: where facts live, averaged over many facts (MLP / attention restorations at the
last subject token, the other subject tokens and the last token), with bootstrap intervals and a figure."""

from __future__ import annotations

import typer

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, emit


def register(app) -> None:
    @app.command("locate")
    @command
    def locate(
        model: str = ModelOpt,
        requests: str = typer.Option(..., "--requests", "-r", help="Facts: a dataset file; each record's TRUE fact "
                                     "(prompt, subject, target_true) is traced."),
        n: int = typer.Option(100, "--n", help="Trace the first N records."),
        kinds: str = typer.Option("mlp,attn", "--kinds", help="Comma-separated: mlp, attn, resid."),
        samples: int = typer.Option(3, "--samples", help="Noise draws per restoration (ROME: 10)."),
        noise: float = typer.Option(3.0, "--noise", help="Noise std in units of the embedding std (ROME: 3)."),
        window: int = typer.Option(None, "--window", help="Layers restored together (default: ROME's 10 scaled to depth)."),
        layer_stride: int = typer.Option(1, "--layer-stride", help="Centre windows on every N-th layer only (cheaper)."),
        out: str = typer.Option(..., "--out", "-o", help="Directory: locate.jsonl (one line per fact; a rerun resumes), "
                                "summary.json, locate.png."),
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Average causal trace over many facts at the token groups ROME's figure needs (resumable)."""
        from pathlib import Path

        from ..analysis.locate import plot_locate, run_locate, save_summary, summarise_locate
        from ..analysis.tracing import KIND_SITES
        from ..data import load_requests
        from ..errors import SupereditError
        from ..models import load_model

        kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
        bad = [k for k in kind_list if k not in KIND_SITES]
        if bad or not kind_list:
            raise SupereditError(f"--kinds {kinds!r}: choose from {', '.join(KIND_SITES)}")
        if n < 1 or samples < 1 or noise < 0 or (window is not None and window < 1) or layer_stride < 1:
            raise SupereditError("--n, --samples and --layer-stride must be ≥ 1, --noise ≥ 0, --window ≥ 1")
        facts = [r for r in load_requests(requests) if r.target_true][:n]
        if not facts:
            raise SupereditError(f"{requests}: no record has a target_true to trace")
        adapter = load_model(model, device=device, dtype=dtype, device_map=device_map)
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        windows = {k: window for k in kind_list} if window else None
        records = run_locate(adapter, facts, out_dir / "locate.jsonl", kinds=tuple(kind_list), windows=windows,
                             noise_scale=noise, samples=samples, layer_stride=layer_stride)
        summary = summarise_locate(records)
        summary.update({"model": model, "requests": requests, "n_requested": n})
        save_summary(summary, out_dir / "summary.json")
        plot_locate(summary, out_dir / "locate.png",
                    title=f"{model}: causal trace averaged over {summary['n_facts']} facts (shaded: 95% bootstrap CI)")
        peaks = {f"{k}/{g}": s["peak_layer"] for k, gs in summary["aie"].items() for g, s in gs.items()}
        emit({"n_facts": summary["n_facts"], "mean_p_clean": summary["mean_p_clean"],
              "mean_p_corrupt": summary["mean_p_corrupt"], "peak_layers": peaks, "out_dir": str(out_dir)}, as_json)
