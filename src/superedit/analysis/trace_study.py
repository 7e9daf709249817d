"""A causal-tracing study of many facts: which facts, traced how, summarised how (no files, no plots).

:func:`load_facts` reads the facts to trace (one template, a fact file or dataset, or a testbed's
world); :func:`trace_study` traces each of them for every kind of hidden state (ROME's causal tracing,
:func:`superedit.analysis.tracing.trace_fact_kinds`), summarises per kind
(:func:`~superedit.analysis.tracing.summarize_traces`) and optionally runs the state-swap test. The
``superedit trace`` command and ``superedit demo`` render a :class:`TraceStudy` (heatmaps, trace.json).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import RequestFormatError, SupereditError
from ..utils.logs import get_logger

log = get_logger(__name__)

#: facts traced on a testbed when no --n is given
TESTBED_DEFAULT_N = 50
TARGET_RULE = "probability of the target's first token at the last prompt token"

__all__ = ["TraceStudy", "load_facts", "read_fact_file", "testbed_facts", "trace_study", "TESTBED_DEFAULT_N"]


# ----------------------------------------------------------------------------------------- facts
def read_fact_file(path: str | Path) -> list:
    """Facts from a JSON list / JSONL file of ``{"prompt", "subject", "target"}`` records, or any
    dataset ``superedit.data.load_requests`` reads (traced with ``target_true``)."""
    from ..data import load_requests
    from ..utils.io import read_jsonl
    from .tracing import as_fact

    p = Path(path)
    if not p.is_file():
        raise RequestFormatError(f"--requests {str(path)!r}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
        records = records if isinstance(records, list) else [records]
    except json.JSONDecodeError:
        records = read_jsonl(p)
    if not records:
        raise RequestFormatError(f"--requests {str(path)!r} holds no records")
    simple = all(isinstance(r, dict) and {"prompt", "subject"} <= set(r) and "target_new" not in r
                 and "requested_rewrite" not in r for r in records)
    if simple:
        return [as_fact(r, f"{path}#{i}") for i, r in enumerate(records)]
    return [as_fact(r, r.source or f"{path}#{i}") for i, r in enumerate(load_requests(str(path)))]


def testbed_facts(model: str) -> list:
    """True facts of a testbed model's world (the first training template of each relation)."""
    from ..models.loading import resolve_model_path
    from ..testbed import load_world
    from .tracing import Fact

    hint = "pass --requests FILE or --prompt/--subject/--target"
    path, is_local = resolve_model_path(model)
    if not is_local or not (Path(path) / "testbed.json").exists():
        raise SupereditError(f"no facts given and --model {model!r} is not a testbed model (no testbed.json); {hint}")
    world = load_world(path)
    facts = []
    for s in world.subjects:
        for rid, obj in s.facts.items():
            templates = world.relation(rid).train_templates
            if templates:
                facts.append(Fact(templates[0], s.name, obj))
    if not facts:
        raise SupereditError(f"the testbed world of --model {model!r} lists no facts; {hint}")
    return facts


def load_facts(*, model: str, prompt: str | None = None, subject: str | None = None, target: str | None = None,
               requests: str | None = None, n: int | None = None, seed: int = 0) -> list:
    """The facts to trace: ``prompt``/``subject``/``target``, else the ``requests`` file, else the
    testbed world of ``model`` (``TESTBED_DEFAULT_N`` of them unless ``n``); ``n`` picks a seeded,
    order-preserving sample."""
    from .tracing import as_fact

    if prompt is not None and requests is not None:
        raise SupereditError("give either --prompt/--subject/--target or --requests, not both")
    if n is not None and n < 1:
        raise SupereditError(f"--n must be >= 1, got {n}")
    if prompt is not None or subject is not None:
        if prompt is None or subject is None:
            raise SupereditError("--prompt (template with {}) and --subject go together (--target optional)")
        facts = [as_fact({"prompt": prompt, "subject": subject, "target": target}, "--prompt")]
    elif requests is not None:
        facts = read_fact_file(requests)
    else:
        facts = testbed_facts(model)
        n = n or TESTBED_DEFAULT_N
    if n is not None and n < len(facts):
        keep = sorted(random.Random(f"superedit-trace:{seed}").sample(range(len(facts)), n))
        facts = [facts[i] for i in keep]
    return facts


# ----------------------------------------------------------------------------------------- study
@dataclass
class TraceStudy:
    """Traces of ``facts`` per kind, their summaries and the optional state swap."""

    facts: list
    kinds: list[str]
    windows: dict[str, int]
    by_kind: dict[str, list]  #: kind → one TraceResult per fact
    summary: dict[str, dict]  #: kind → summarize_traces(...)
    swap: Any = None  #: SwapResult or None
    config: dict[str, Any] = field(default_factory=dict)

    def per_fact(self) -> list[dict[str, Any]]:
        return [{"prompt": f.prompt, "subject": f.subject, "target": f.target,
                 "traces": {k: self.by_kind[k][i].to_dict() for k in self.kinds}}
                for i, f in enumerate(self.facts)]


def trace_study(adapter, facts: Sequence, *, kinds: Sequence[str] = ("resid", "mlp", "attn"),
                window: int | None = None, noise: float = 3.0, samples: int = 10, seed: int = 0,
                swap: bool = False, batch_size: int = 256, model: str | None = None) -> TraceStudy:
    """Trace every fact for every kind (restored windows: 1 for resid, ``window`` or the depth's
    default for mlp/attn), summarise per kind, and run the state swap when ``swap``."""
    from ..utils.progress import progress
    from .tracing import KIND_SITES, default_window, state_swap, summarize_traces, trace_fact_kinds

    kinds = list(kinds)
    bad = [k for k in kinds if k not in KIND_SITES]
    if bad or not kinds:
        raise SupereditError(f"kinds {kinds}: unknown {bad}; choose from {sorted(KIND_SITES)}")
    if window is not None and window < 1:
        raise SupereditError(f"--window must be >= 1, got {window}")
    if not facts:
        raise SupereditError("no facts to trace")
    nl = adapter.n_layers
    windows = {k: (1 if k == "resid" else (window or default_window(k, nl))) for k in kinds}
    log.info("tracing %d fact(s) on %s: kinds %s, windows %s, noise %.2f x emb std, %d samples",
             len(facts), model or adapter.source, kinds, windows, noise, samples)
    by_kind: dict[str, list] = {k: [] for k in kinds}
    for fact in progress(list(facts), total=len(facts), desc="trace"):
        for k, r in trace_fact_kinds(adapter, fact, kinds, windows, noise, samples, seed, batch_size).items():
            by_kind[k].append(r)
    summary = {k: summarize_traces(rs) for k, rs in by_kind.items()}
    sw = state_swap(adapter, list(facts), seed=seed, batch_size=min(batch_size, 64)) if swap else None
    config = dict(model=model or str(adapter.source), identity=adapter.identity(), n_layers=nl, kinds=kinds,
                  windows=windows, noise_scale=noise, samples=samples, seed=seed, target_rule=TARGET_RULE)
    return TraceStudy(facts=list(facts), kinds=kinds, windows=windows, by_kind=by_kind, summary=summary, swap=sw,
                      config=config)
