"""Pages: one jinja2 environment (autoescape on) over ``report/templates``, and the objects pages show.

Every report is a :class:`Page` — header facts, sections of tables and figures — rendered through a
child template of ``base.html.j2`` (head, CSS, header with model/run facts, a nav of the sections, a
footer with the command that produced the page). Images are linked relative to the page (they live in
the run folder's ``plots/``), so a page, its run index and the figures stay one folder.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..utils.io import write_text_atomic
from .provenance import read_command

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class Figure:
    """An image with what to look for in it (``caption``; not a repeat of its title)."""

    path: Path
    alt: str
    caption: str


@dataclass(frozen=True)
class Column:
    """A table column: the row key, the header, and how cells are shown (num | int | deg | text)."""

    key: str
    label: str
    kind: str = "num"


@dataclass
class Table:
    columns: Sequence[Column]
    rows: Sequence[dict]
    caption: str = ""


@dataclass
class Section:
    """A titled part of a page (its ``id`` is the nav anchor)."""

    id: str
    title: str
    note: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Page:
    """What a report shows. ``template`` is a child of base.html.j2; ``sources`` are the files it read."""

    template: str
    title: str
    kind: str
    out_dir: Path
    info: list[tuple[str, Any]] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    filename: str = "report.html"


def fmt_num(value: Any) -> str:
    """A number as a table shows it: '–' for missing/NaN, thousands separators for big, 3 decimals else."""
    if value is None or isinstance(value, bool):
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return "–"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2e}"
    if abs(v) >= 1e6:
        return f"{v:.3g}"
    if abs(v) >= 1e4:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.3f}"


def cell(value: Any, kind: str) -> str:
    """A table cell: ``text`` as is, ``int`` whole numbers, ``deg`` one decimal, ``num`` via :func:`fmt_num`."""
    if kind == "text":
        return "–" if value is None else str(value)
    if kind == "deg" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.1f}"
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    return fmt_num(value)


def load_results(out: Path, name: str, command: str, required: Sequence[str] = ()) -> dict:
    """The JSON results file ``out/name`` a command wrote, checked: missing, unreadable, or lacking a
    ``required`` key are :class:`~superedit.errors.FileFormatError`s that say which command to rerun."""
    import json

    from ..errors import FileFormatError

    path = Path(out) / name
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file; this report is drawn from the files `superedit {command} "
                              f"--out {out}` writes: run it first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise FileFormatError(f"{path}: not valid JSON ({exc}); rerun `superedit {command}`") from exc
    for key in required:
        if not isinstance(data, dict) or key not in data:
            raise FileFormatError(f"{path}: has no {key!r}; it was not written by `superedit {command}`: rerun it")
    return data


def environment():
    """The jinja2 environment of the report templates (autoescape on, undefined names are errors)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = fmt_num
    env.filters["cell"] = cell
    return env


def _rel(path: Path | str, start: Path) -> str:
    return Path(os.path.relpath(Path(path), start)).as_posix()


def render(page: Page) -> Path:
    """Write ``page.out_dir/page.filename`` from its template; returns the path."""
    from .. import __version__

    out = Path(page.out_dir)
    cmd = read_command(out)
    html = environment().get_template(page.template).render(
        page=page, sections=page.sections, info=[(k, v) for k, v in page.info if v not in (None, "")],
        command=cmd.get("command"), command_time=cmd.get("time"), rel=lambda p: _rel(p, out),
        version=__version__, generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **page.extra)
    path = out / page.filename
    write_text_atomic(path, html)
    return path
