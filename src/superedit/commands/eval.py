"""``superedit eval``: evaluate a saved delta (pre = the model without it, post = with it)."""

from __future__ import annotations

import typer

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command
from .edit import FormatOpt, GenTokensOpt, GreedyTokensOpt, LimitOpt, RequestsOpt, SeedOpt


def register(app) -> None:
    @app.command("eval")
    @command
    def eval_(
        model: str = ModelOpt,
        delta: str = typer.Option(..., "--delta", "-d", help="Directory of a saved delta (edit --save-delta)."),
        requests: str = RequestsOpt,
        fmt: str = FormatOpt,
        limit: int = LimitOpt,
        out: str = typer.Option(None, "--out", "-o", help="Write records.jsonl and summary.json here."),
        gen_tokens: int = GenTokensOpt,
        greedy_tokens: int = GreedyTokensOpt,
        seed: int = SeedOpt,
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        device_map: str = DeviceMapOpt,
        as_json: bool = JsonOpt,
    ):
        """Evaluate a saved delta on edit requests: every metric without (pre) and with (post) the delta."""
        from ..editing.delta import DeltaError, WeightDelta
        from ..editing.run import evaluate_delta
        from ..models import load_model
        from ..utils.integrity import check_finite
        from ..utils.io import write_json_atomic
        from ..utils.seed import seed_everything
        from .common import local_model_dir, resolve_requests
        from .edit import print_summary, start_out_dir

        seed_everything(seed)
        wd = WeightDelta.load(delta)  # its hashes verified, its tensors finite (else exit 2 naming the file)
        adapter = load_model(model, device=device, dtype=dtype, device_map=device_map)
        with wd.applied(adapter):  # W₀ + ΔW can still overflow the model's dtype
            check_finite({f"layer {l} down-projection weight": adapter.down_weight(l) for l in sorted(wd.layers)},
                         f"{delta}: the model with this delta applied", DeltaError)
        reqs = resolve_requests(local_model_dir(model), requests, fmt, limit, seed=seed)
        out_dir = start_out_dir(out, "eval") if out else None
        records, summary = evaluate_delta(adapter, reqs, wd, out_path=out_dir / "records.jsonl" if out_dir else None,
                                          gen_tokens=gen_tokens, eval_seed=seed,
                                          greedy_tokens=greedy_tokens)
        summary.update({"model": model, "delta": str(delta), "delta_layers": sorted(wd.layers),
                        "requests_file": requests, "limit": limit, "gen_tokens": gen_tokens, "seed": seed,
                        "out_dir": str(out_dir) if out_dir else None})
        if out_dir:
            write_json_atomic(out_dir / "summary.json", summary)
        print_summary(summary, as_json)
