"""``superedit info``: family, sizes and site paths of a model."""

from __future__ import annotations

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, command, emit


def register(app) -> None:
    @app.command("info")
    @command
    def info(model: str = ModelOpt, device: str = DeviceOpt, dtype: str = DtypeOpt, device_map: str = DeviceMapOpt,
             as_json: bool = JsonOpt):
        """Show a model's family, layers, d_model, d_mlp (key size) and the site paths."""
        from ..models import load_model

        adapter = load_model(model, device=device, dtype=dtype, device_map=device_map)
        result = {
            "model": model,
            "family": adapter.family,
            "config_class": type(adapter.config).__name__,
            "n_layers": adapter.n_layers,
            "d_model": adapter.d_model,
            "d_mlp": adapter.d_mlp,
            "n_params": sum(p.numel() for p in adapter.model.parameters()),
            "dtype": str(adapter.dtype).replace("torch.", ""),
            "revision": adapter.revision,
            "sites": adapter.site_paths(),
        }
        emit(result, as_json)
