"""``superedit forecast``: predict which protected facts a ROME edit will disturb, per layer, and check it.

    superedit forecast --model builtin:small --requests cf.json --request-index 3 --protected-n 50 \\
        --layers all --layer auto --json
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UsageError
from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, default_device, emit, parse_layers


def register(app) -> None:
    @app.command("forecast")
    @command
    def forecast(
        model: str = ModelOpt,
        requests: Optional[str] = typer.Option(None, "--requests", help="Dataset file holding the edit request "
                                                                        "(default on testbed models: its edit requests)."),
        request_index: int = typer.Option(..., "--request-index", help="Index of the pending edit in --requests."),
        protected: Optional[str] = typer.Option(None, "--protected", help="Dataset file of facts to protect "
                                                                          "(their prompt → target_true)."),
        protected_n: Optional[int] = typer.Option(None, "--protected-n", help="Protect N other requests of --requests "
                                                                              "(seeded choice; default 20)."),
        layers: str = typer.Option("all", "--layers", help="Candidate layers: 'all', '3,4' or '2-5'."),
        layer: str = typer.Option("auto", "--layer", help="Layer to perform and check the edit at: 'auto' (the "
                                                          "recommended one), a layer index, or 'none' (no check)."),
        hparams: Optional[str] = typer.Option(None, "--hparams", help="ROME hparams YAML (overrides defaults)."),
        ridge: Optional[float] = typer.Option(None, "--ridge", help="Ridge on C (fraction of mean diagonal); "
                                                                    "default: the hparams' mom2_ridge."),
        corpus: Optional[str] = typer.Option(None, "--corpus", help="Corpus for C (default: hparams / the model's own)."),
        mom2_tokens: Optional[int] = typer.Option(None, "--mom2-tokens", help="Corpus tokens for C (default: hparams)."),
        top_k: int = typer.Option(10, "--top-k", help="Protected facts listed per layer."),
        seed: int = typer.Option(0, "--seed", help="Seed of the --protected-n choice."),
        out: Optional[str] = typer.Option(None, "--out", help="Folder for forecast.json (and check.json)."),
        device: Optional[str] = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Interference forecast p(k*, kⱼ)·δ of a pending ROME edit on protected facts; recommends the layer with
        the least predicted interference and checks the prediction against the real edit (Spearman)."""
        from ..analysis.forecast import check_forecast, forecast_interference
        from ..data import load_requests, sample_requests
        from ..editing.covariance import CorpusCovariance
        from ..editing.hparams import ROMEHParams, load_hparams
        from ..errors import SupereditError
        from ..models import load_model
        from ..utils.io import write_json_atomic
        from .common import hparams_profile, local_model_dir, resolve_requests

        if protected and protected_n is not None:
            raise SupereditError("give either --protected FILE or --protected-n N, not both")
        n_protect = 20 if protected_n is None else protected_n
        if n_protect < 1:
            raise SupereditError(f"--protected-n must be ≥ 1 (got {n_protect})")
        adapter = load_model(model, device=default_device(device, device_map), dtype=dtype, device_map=device_map)
        cand = parse_layers(layers, adapter.n_layers)
        reqs = resolve_requests(local_model_dir(model), requests, seed=seed,
                                default_n=max(request_index + 1 + n_protect, 64))
        if not 0 <= request_index < len(reqs):
            raise UsageError(f"--request-index {request_index} is out of range: the requests hold {len(reqs)} "
                             f"items (0..{len(reqs) - 1})")
        req = reqs[request_index]
        if protected:
            prot = load_requests(protected)
        else:
            others = [r for i, r in enumerate(reqs) if i != request_index]
            prot = sample_requests(others, n_protect, seed)
        hp = load_hparams(ROMEHParams, "rome", profile=hparams_profile(adapter, local_model_dir(model)), path=hparams)
        if ridge is not None:
            hp = hp.replace(mom2_ridge=float(ridge))
        check_layer = None
        if layer not in ("none", "auto"):
            try:
                check_layer = int(layer)
            except ValueError:
                raise SupereditError(f"--layer {layer!r}: give 'auto', 'none' or a layer index") from None
            adapter.check_layer(check_layer)
        cov_layers = sorted(set(cand) | ({check_layer} if check_layer is not None else set()))
        cov = CorpusCovariance(adapter, corpus or hp.mom2_corpus or None, n_tokens=mom2_tokens or hp.mom2_n_tokens,
                               max_length=hp.mom2_max_length, layers=cov_layers)
        fc = forecast_interference(adapter, req, prot, cov, cand, hp, top_k=top_k)
        result = {"model": model, "request_index": request_index, "request": fc.request,
                  "recommended_layer": fc.recommended_layer, "n_protected": len(fc.protected),
                  "layers": [{k: v for k, v in lf.to_dict().items() if k not in ("p", "predicted")}
                             for lf in fc.layers.values()]}
        check = None
        if layer != "none":
            at = fc.recommended_layer if layer == "auto" else check_layer
            check = check_forecast(adapter, req, prot, cov, at, hp, forecast=fc)
            result["check"] = {k: v for k, v in check.items() if k != "rows"}
        if out:
            write_json_atomic(Path(out) / "forecast.json", fc.to_dict())
            if check is not None:
                write_json_atomic(Path(out) / "check.json", check)
            result["out"] = out
        emit(result, as_json)
