"""`superedit testbed build|info`: build a testbed checkpoint, show the built-in ones."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


from superedit.commands.common import command, emit as _emit, size_choices


def _summary(d: Path) -> dict:
    from superedit.testbed.build import read_testbed_meta

    meta = read_testbed_meta(d)
    fig = meta.get("figures", {})
    world = meta.get("world", {})
    return dict(path=str(d), size=meta.get("size"), seed=meta.get("seed"),
                n_subjects=len(world.get("subjects", [])), n_relations=len(world.get("relations", [])),
                epochs=fig.get("epochs"), recall=fig.get("recall"), paraphrase_recall=fig.get("paraphrase_recall"),
                n_params=fig.get("n_params"), build_command=meta.get("build_command"),
                mechanistic=meta.get("mechanistic"))


def register(app: typer.Typer) -> None:
    sub = typer.Typer(help="Built-in testbed: synthetic fact world + small GPT-2-style model trained on CPU.",
                      no_args_is_help=True)

    @sub.command("build")
    @command
    def build(size: str = typer.Option("small", "--size", help=f"testbed size ({size_choices()})"),
              out: Path = typer.Option(..., "--out", help="output model directory"),
              facts: Optional[Path] = typer.Option(None, "--facts", help="learn the true facts of a CounterFact/EasyEdit file"),
              seed: int = typer.Option(0, "--seed"),
              epochs: Optional[int] = typer.Option(None, "--epochs", help="override the size's number of epochs "
                                                   "(recorded in testbed.json)"),
              as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line")):
        """Train a testbed and write a standard HF model dir plus testbed.json."""
        from superedit.errors import UsageError
        from superedit.testbed.build import build_testbed

        if epochs is not None and epochs < 1:
            raise UsageError(f"--epochs must be ≥ 1 (got {epochs})")
        d = build_testbed(size, out, seed=seed, facts_file=facts, epochs=epochs)
        _emit(_summary(d), as_json)

    @sub.command("info")
    @command
    def info(as_json: bool = typer.Option(False, "--json")):
        """Show the sizes and which built-in testbeds are available."""
        from superedit.testbed.registry import SHIPPED_DIR, superedit_home
        from superedit.testbed.sizes import DEFAULT_SIZE, SIZES

        built = {}
        root = superedit_home() / "testbeds"
        if root.exists():
            for d in sorted(root.iterdir()):
                if (d / "testbed.json").exists():
                    built[d.name] = str(d)
        shipped = _summary(SHIPPED_DIR) if (SHIPPED_DIR / "testbed.json").exists() else None
        _emit(dict(default_size=DEFAULT_SIZE, sizes={k: v.to_dict() for k, v in SIZES.items()},
                   shipped=shipped, built=built, home=str(superedit_home())), as_json)

    app.add_typer(sub, name="testbed")
