"""The ``superedit`` console command.

Each command lives in ``superedit.commands.<name>`` and exposes ``register(app)``; heavy imports
happen inside the command functions, so ``superedit --help`` is fast.
"""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = [
    "info",
    "testbed",
    "trace",
    "demo",
    "stats",
    "edit",
    "eval",
    "superposition",
    "forecast",
    "robust",
    "keys",
    "lifelong",
    "ledger",
    "data",
    "models",
    "locate",
]

app = typer.Typer(
    name="superedit",
    help="Lifelong knowledge editing of transformer LMs (ROME, MEMIT, FT, D4S, AlphaEdit), "
         "superposition analysis and robust keys. Every command takes --json: the last stdout line is then "
         "one JSON object; human output goes to stderr.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: help texts are shown as written (no rich markup that eats "[rephrases]" and the like)
    rich_markup_mode=None,
)


@app.callback()
def _root(threads: int = typer.Option(None, "--threads", envvar="SUPEREDIT_THREADS",
                                      help="torch CPU threads (default: torch's own; 1 is often fastest for the "
                                           "small testbed models on a busy machine).")) -> None:
    """superedit: lifelong knowledge editing toolkit."""
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter(f"--threads must be ≥ 1 (got {threads})")
        import torch

        torch.set_num_threads(threads)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"superedit.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"superedit.commands.{name}":
                continue  # command not written yet
            raise
        module.register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
