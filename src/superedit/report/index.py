"""``index.html`` of a run directory: every stage's report, summary files and figures, linked.

:func:`find_stages` walks ``run_dir`` (it and its sub-folders, a few levels deep) and takes as a
stage every folder holding a report, a results file a superedit command writes, or figures;
:func:`write_index` renders them through ``index.html.j2``. Nothing is computed here: the page links
what the commands saved (and shows a stage's headline numbers from its own summary file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .page import Page, render
from .provenance import read_command

#: results files → what kind of stage wrote them (the first one present names the stage)
STAGE_FILES = {
    "real.json": "a real model (SmolLM2-135M), edited",
    "metrics.jsonl": "lifelong editing",
    "scaling.json": "superposition scaling law",
    "stats.json": "knowledge in superposition",
    "table.json": "robust edits (REP)",
    "geometry.json": "key geometry",
    "trace.json": "causal tracing",
    "forecast.json": "interference forecast",
    "summary.json": "edits and their evaluation",
    "demo.json": "demo run",
}
#: other files worth a link when present
EXTRA_FILES = ("records.jsonl", "run.json", "command.json", "table.csv", "stats.csv", "top_pairs.csv",
               "scaling.csv", "similar_keys.jsonl", "check.json")
#: folders that hold a stage's internals, never stages of their own
SKIP_DIRS = {"plots", "ledger", "edits", "matrices", "__pycache__"}
MAX_DEPTH = 3
#: the post-edit means an edit stage's card shows first
EDIT_HEADLINE = ("efficacy_score", "paraphrase_score", "neighborhood_score", "score", "efficacy_magnitude",
                 "rewrite_prob_new", "rewrite_prob_true")
#: demo.json entries that are paths or bookkeeping, not figures
DEMO_SKIP = ("report", "records", "files")


@dataclass
class Stage:
    """One stage folder: its path relative to the run, its kind, report, files and figures."""

    path: str
    kind: str
    report: str | None = None
    files: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    headline: list[tuple[str, object]] = field(default_factory=list)
    command: str | None = None

    @property
    def anchor(self) -> str:
        return "stage-" + ("run" if self.path == "." else self.path.replace("/", "-"))

    @property
    def title(self) -> str:
        return "this folder" if self.path == "." else self.path


def _scalars(d: dict, limit: int = 8) -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, (int, float, str)) and not isinstance(v, bool) and len(str(v)) <= 40:
            out.append((k, v))
        if len(out) >= limit:
            break
    return out


def _with_intervals(means: dict, cis, counts) -> dict:
    """Each mean that has its n and 95% interval in the summary as "0.980 (n 100, 95% CI 0.95–1.00)"."""
    cis = cis if isinstance(cis, dict) else {}
    counts = counts if isinstance(counts, dict) else {}
    out = {}
    for k, v in means.items():
        ci, n = cis.get(k), counts.get(k)
        if (isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(n, int) and n > 0
                and isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci)):
            out[k] = f"{v:.3f} (n {n}, 95% CI {ci[0]:.2f}–{ci[1]:.2f})"
        else:
            out[k] = v
    return out


def _headline(folder: Path, marker: str) -> list[tuple[str, object]]:
    """A few scalar figures from the stage's own results file (edit summaries: the post-edit means)."""
    if marker not in ("summary.json", "trace.json", "table.json") or not (folder / marker).is_file():
        return []
    try:
        data = json.loads((folder / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    if marker == "summary.json" and isinstance(data.get("post"), dict):
        post = data["post"]
        return _scalars(_with_intervals({k: post[k] for k in EDIT_HEADLINE if k in post} or post,
                                        data.get("post_ci"), data.get("counts")))
    if marker == "trace.json" and isinstance(data.get("summary"), dict):
        return _scalars(data["summary"])
    if marker == "table.json":
        return _scalars({k: data.get(k) for k in ("n_requests", "n_errors") if k in data})
    return _scalars(data)


def _stage(folder: Path, run_dir: Path) -> Stage | None:
    names = {p.name for p in folder.iterdir() if p.is_file()}
    marker = next((f for f in STAGE_FILES if f in names), None)
    pngs = sorted(p for p in folder.glob("*.png"))
    report = "report.html" if "report.html" in names else None
    if marker is None and report is None and not pngs:
        return None
    rel = folder.relative_to(run_dir).as_posix() or "."
    files = [f for f in list(STAGE_FILES) + list(EXTRA_FILES) if f in names]
    figures = [p.relative_to(run_dir).as_posix() for p in pngs]
    if report is None and (folder / "plots").is_dir():
        figures += [p.relative_to(run_dir).as_posix() for p in sorted((folder / "plots").glob("*.png"))]
    kind = STAGE_FILES.get(marker, "figures") if marker else ("report" if report else "figures")
    return Stage(rel, kind, f"{rel}/{report}" if report and rel != "." else report,
                 [f"{rel}/{f}" if rel != "." else f for f in files], figures,
                 _headline(folder, marker) if marker else [], read_command(folder).get("command"))


def find_stages(run_dir: str | Path) -> list[Stage]:
    """Every stage folder under ``run_dir`` (``run_dir`` itself first when it is one), in path order."""
    run_dir = Path(run_dir)
    found: list[Stage] = []

    def walk(folder: Path, depth: int) -> None:
        st = _stage(folder, run_dir)
        if st is not None and not (folder == run_dir and st.kind == "demo run" and not st.report and not st.figures):
            found.append(st)
        if depth >= MAX_DEPTH:
            return
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            if sub.name not in SKIP_DIRS and not sub.name.startswith("."):
                walk(sub, depth + 1)

    walk(run_dir, 0)
    return found


def _demo_summary(run_dir: Path) -> list[tuple[str, list[tuple[str, object]]]]:
    """Scalar figures of each stage in a demo's ``demo.json`` (e.g. the recall stage has no folder)."""
    path = run_dir / "demo.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return []
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict):
        return []
    return [(name, _scalars({k: v for k, v in sec.items() if k not in DEMO_SKIP}, limit=10))
            for name, sec in stages.items() if isinstance(sec, dict)]


def write_index(run_dir: str | Path) -> Path:
    """``run_dir/index.html`` linking every stage found under ``run_dir``; returns its path."""
    from ..errors import UsageError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such directory; give the --out folder of a superedit run")
    stages = find_stages(run_dir)
    demo = _demo_summary(run_dir)
    params = read_command(run_dir).get("params", {})
    info = [("folder", run_dir.name or str(run_dir)), ("stages", len(stages)), ("model", params.get("model"))]
    return render(Page("index.html.j2", "Run index", "index", run_dir, info, [], [],
                       {"stages": stages, "demo": demo}, filename="index.html"))
