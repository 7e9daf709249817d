"""General ability of a (possibly edited) model: one probe set, built once, measured any number of times.

Issue #14 item 5 / #16 item 4: editing should leave what the model could do before. A
:class:`GeneralAbility` is built once per run from what is available offline and
:meth:`GeneralAbility.measure` returns every metric with the number of items behind it:

* ``perplexity``: exp(mean token NLL) of held-out text (:func:`superedit.eval.scoring.perplexity`).
* ``fluency``: ROME's weighted n-gram entropy (:mod:`superedit.eval.fluency`) of seeded top-k samples
  after fixed prompts (the same seed every time, so measurements at different checkpoints are paired).
* ``known_retention``: teacher-forced recall (:func:`~superedit.eval.scoring.fact_recall`) of known
  facts, as a share of those the base model recalled (``base_hits``, filled by :meth:`baseline`).
* choice sets, each an accuracy over :class:`ChoiceItem`\\ s — the model's choice is

      argmax_c  log P(choice_c | prompt) = Σ_j log P(x_j | prompt, x_<j)    (teacher-forced),

  every ``(prompt, choice)`` pair scored by :func:`~superedit.eval.scoring.score_targets` (the one
  scorer), so an option's score is the probability of producing the whole answer:

  - ``known_mc``: a known fact's true object against 3 distractors, objects of the same relation
    elsewhere in the dataset (chance 0.25);
  - ``mqd_tf`` / ``mqd_mc``: MQD's own true/false ("yes" / "no", chance 0.5) and multiple-choice
    (letters a–d, chance 0.25) items (:mod:`superedit.data.mqd`) on tuples that were never edited.

* ``lm_eval``: downstream tasks through lm-evaluation-harness's Python API (``simple_evaluate`` on an
  ``HFLM`` wrapping the in-memory model) when ``lm_eval`` is importable and a task's data is available
  locally (run with ``HF_DATASETS_OFFLINE=1``/``HF_HUB_OFFLINE=1``: nothing is downloaded). Otherwise
  the task is reported as ``{"skipped": reason}``. lm-eval is an optional extra (``superedit[ability]``).
  :func:`write_lm_eval_task` turns any list of :class:`ChoiceItem`\\ s (e.g. the offline probes above)
  into a local lm-eval multiple-choice task (a JSONL file and its YAML), so the same items run through
  lm-eval's own scorer, offline, with ``include_path``.

Parts with no items are left out of the result. ``GeneralAbility`` is plain data
(:meth:`to_dict`/:meth:`from_dict`), so a run can save it and measure the same items after a resume.
"""

from __future__ import annotations

import math
import os
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from ..errors import UsageError
from ..utils.logs import get_logger

log = get_logger(__name__)

__all__ = ["ChoiceItem", "GeneralAbility", "choice_accuracy", "known_fact_questions", "mqd_choice_items",
           "object_pools", "run_lm_eval", "write_lm_eval_task"]

#: distractors per known-fact question (true object + 3 = four options, as MQD's multiple choice)
N_DISTRACTORS = 3


@dataclass(frozen=True)
class ChoiceItem:
    """A prompt, its options, and the index of the correct one."""

    prompt: str
    choices: tuple[str, ...]
    answer: int
    source: str = ""  #: the ``"subject|relation"`` tuple it asks about (runs drop those they edit)

    def __post_init__(self):
        if len(self.choices) < 2:
            raise UsageError(f"choice item {self.source or self.prompt!r}: needs at least 2 choices "
                             f"(got {len(self.choices)})")
        if not 0 <= self.answer < len(self.choices):
            raise UsageError(f"choice item {self.source or self.prompt!r}: answer index {self.answer} is not one "
                             f"of the {len(self.choices)} choices")

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "choices": list(self.choices), "answer": self.answer, "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ChoiceItem":
        return cls(d["prompt"], tuple(d["choices"]), int(d["answer"]), d.get("source", ""))


def choice_accuracy(adapter, items: Sequence[ChoiceItem], batch_size: int = 64) -> dict:
    """``{"accuracy", "n", "chance"}``: the share of items whose argmax-log-probability choice is the answer.

    All ``Σ len(choices)`` (prompt, choice) pairs go through one :func:`score_targets` call."""
    from .scoring import score_targets

    if not items:
        return {"accuracy": None, "n": 0, "chance": None}
    prompts = [it.prompt for it in items for _ in it.choices]
    targets = [c for it in items for c in it.choices]
    scores = score_targets(adapter, prompts, targets, batch_size)
    at, correct = 0, 0
    for it in items:
        lp = [s.logprob for s in scores[at:at + len(it.choices)]]
        at += len(it.choices)
        correct += int(max(range(len(lp)), key=lp.__getitem__) == it.answer)
    chance = sum(1 / len(it.choices) for it in items) / len(items)
    return {"accuracy": correct / len(items), "n": len(items), "chance": chance}


# ------------------------------------------------------------------------------------------ builders
def object_pools(facts: Sequence[Mapping]) -> dict[str, list[str]]:
    """relation → its distinct objects in first-seen order (case-insensitive), from ``{"relation",
    "target"}`` records (facts without a relation are ignored)."""
    pools: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    for f in facts:
        rel, obj = f.get("relation"), f.get("target")
        if not rel or not obj:
            continue
        if obj.lower() not in seen.setdefault(rel, set()):
            seen[rel].add(obj.lower())
            pools.setdefault(rel, []).append(obj)
    return pools


def known_fact_questions(facts: Sequence[Mapping], pools: Mapping[str, Sequence[str]], n: int | None = None,
                         seed: int = 0, n_distractors: int = N_DISTRACTORS) -> list[ChoiceItem]:
    """One multiple-choice question per fact ``{"prompt", "target", "relation"}``: the true object and
    ``n_distractors`` other objects of the same relation (``pools``), in a seeded order.

    Facts whose relation has too few other objects are skipped (logged). At most ``n`` questions."""
    rng = random.Random(f"superedit-ability-known:{seed}")
    out: list[ChoiceItem] = []
    short = 0
    for f in facts:
        rel, true = f.get("relation"), f.get("target")
        if not rel or not true:
            short += 1
            continue
        others = [o for o in pools.get(rel, ()) if o.lower() != true.lower()]
        if len(others) < n_distractors:
            short += 1
            continue
        options = [true] + rng.sample(others, n_distractors)
        rng.shuffle(options)
        out.append(ChoiceItem(f["prompt"], tuple(options), options.index(true), f"{f.get('subject', '')}|{rel}"))
        if n is not None and len(out) >= n:
            break
    if short:
        log.info("ability: %d known facts without a relation or with fewer than %d other objects of it: no "
                 "multiple-choice question", short, n_distractors)
    return out


def mqd_choice_items(requests: Sequence, edited: Sequence = (), n: int | None = None) -> dict[str, list[ChoiceItem]]:
    """MQD's true/false and multiple-choice requests as choice items, on tuples never edited.

    A tuple is ``(subject, relation_id)`` (head and ATOMIC relation); a request whose tuple is among
    ``edited`` (EditRequests or such pairs) is left out. T/F: choices ``("yes", "no")``, the answer the
    label; MC: the letters, the answer the true option's letter. Returns ``{"mqd_tf": [...],
    "mqd_mc": [...]}`` (at most ``n`` each); requests of other kinds are ignored."""
    from ..data.mqd import LETTERS

    done = {(e.subject, e.relation_id) if hasattr(e, "subject") else tuple(e) for e in edited}
    out: dict[str, list[ChoiceItem]] = {"mqd_tf": [], "mqd_mc": []}
    for r in requests:
        qtype = (r.meta or {}).get("question_type")
        if qtype not in ("tf", "mc") or (r.subject, r.relation_id) in done:
            continue
        key = f"mqd_{qtype}"
        if n is not None and len(out[key]) >= n:
            continue
        choices = ("yes", "no") if qtype == "tf" else tuple(LETTERS)
        if r.target_new not in choices:
            continue
        out[key].append(ChoiceItem(r.filled_prompt(), choices, choices.index(r.target_new),
                                    f"{r.subject}|{r.relation_id}"))
    return out


# ------------------------------------------------------------------------------------------ lm-eval
@contextmanager
def _offline() -> Iterator[None]:
    """HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set inside the block (the previous values restored)."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old = {k: os.environ.get(k) for k in names}
    os.environ.update({k: "1" for k in names})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run_lm_eval(adapter, tasks: Sequence[str], limit: int | None = None, batch_size: int = 16,
                include_path: str | None = None) -> dict[str, dict]:
    """task → its numeric metrics and ``n`` (lm-eval's effective sample count), or ``{"skipped": reason}``.

    Runs each task on the in-memory model (``HFLM(pretrained=adapter.model, tokenizer=...)``) offline;
    a task whose data is not cached locally, an unknown task, or a missing ``lm_eval`` is skipped
    with the reason. Never downloads anything. ``include_path``: a folder of extra task YAMLs (e.g.
    from :func:`write_lm_eval_task`), registered with lm-eval's ``TaskManager`` beside its own."""
    if not tasks:
        return {}
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        reason = f"lm_eval is not installed ({exc}); pip install 'superedit[ability]'"
        return {t: {"skipped": reason} for t in tasks}
    out: dict[str, dict] = {}
    with _offline():
        try:
            lm = HFLM(pretrained=adapter.model, tokenizer=adapter.tokenizer, batch_size=batch_size,
                      device=str(adapter.device))
        except Exception as exc:  # noqa: BLE001 — any failure of the optional tool is a reported skip
            reason = f"lm_eval could not wrap the model ({_first_line(exc)})"
            return {t: {"skipped": reason} for t in tasks}
        manager = None
        if include_path:
            try:
                from lm_eval.tasks import TaskManager

                manager = TaskManager(include_path=str(include_path))
            except Exception as exc:  # noqa: BLE001 — a broken task folder is a reported skip
                reason = f"lm_eval could not read the task folder {include_path} ({_first_line(exc)})"
                return {t: {"skipped": reason} for t in tasks}
        for task in tasks:
            try:
                res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, log_samples=False,
                                              bootstrap_iters=0, task_manager=manager)
            except Exception as exc:  # noqa: BLE001 — e.g. the task's data is not available offline
                out[task] = {"skipped": f"not run offline ({_first_line(exc)})"}
                continue
            metrics = (res or {}).get("results", {}).get(task)
            if not metrics:
                out[task] = {"skipped": "lm_eval returned no results for this task"}
                continue
            # lm-eval names a metric "<metric>,<filter>"; the default filter "none" is dropped from the name
            rec: dict[str, Any] = {k.removesuffix(",none"): float(v) for k, v in metrics.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
            n = ((res.get("n-samples") or {}).get(task) or {}).get("effective")
            rec["n"] = int(n) if n is not None else None
            out[task] = rec
    return out


#: characters allowed in a local lm-eval task name (it becomes a file name and a YAML value)
_TASK_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")


def write_lm_eval_task(items: Sequence["ChoiceItem"], out_dir, name: str) -> "Path":
    """Write ``items`` as a local lm-evaluation-harness multiple-choice task; returns the YAML's path.

    ``OUT/NAME.jsonl`` holds one ``{"prompt", "choices", "answer"}`` row per item and ``OUT/NAME.yaml``
    the task: ``output_type: multiple_choice`` over the local JSON file (``dataset_path: json`` with
    ``data_files``, so nothing is downloaded), the prompt as context and each choice as continuation
    after lm-eval's default ``target_delimiter`` " " — superedit's own encoding, ``prompt + " " +
    choice.strip()`` (:func:`~superedit.models.encode_prompt_target`).
    lm-eval then reports ``acc`` (argmax of the summed log-likelihood — the rule of
    :func:`choice_accuracy`) and ``acc_norm`` (length-normalised). Run it with
    ``run_lm_eval(adapter, [NAME], include_path=OUT)`` or ``lm_eval --include_path OUT --tasks NAME``.

    The YAML is written by hand (a fixed, flat schema with quoted scalars) rather than through a
    YAML library, so that the file reads exactly as lm-eval's own task files do."""
    import json
    from pathlib import Path

    from ..utils.io import write_text_atomic

    if not name or not set(name) <= _TASK_NAME_CHARS or name[0].isdigit():
        raise UsageError(f"lm-eval task name {name!r}: use lower-case letters, digits and '_' (not first a digit)")
    items = [c if isinstance(c, ChoiceItem) else ChoiceItem.from_dict(c) for c in items]
    if not items:
        raise UsageError(f"lm-eval task {name!r}: no items to write")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{name}.jsonl"
    write_text_atomic(data, "".join(json.dumps({"prompt": c.prompt, "choices": [x.strip() for x in c.choices],
                                                           "answer": c.answer},
                                               ensure_ascii=False) + "\n" for c in items))
    yaml = out / f"{name}.yaml"
    write_text_atomic(yaml, "\n".join([
        f"# superedit: {len(items)} multiple-choice items written by superedit.eval.ability.write_lm_eval_task",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: prompt",  # feature names: lm-eval reads the column as it is
        "doc_to_choice: choices",
        "doc_to_target: answer",
        'target_delimiter: " "',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        ""]))
    return yaml


# ------------------------------------------------------------------------------------------ the probe set
@dataclass
class GeneralAbility:
    """Fixed items measured at every checkpoint (see the module docstring).

    texts: held-out text for perplexity. fluency_prompts: prompts sampled after for n-gram entropy.
    facts: known facts ``{"prompt", "target"}`` for retention; base_hits: the base model's recall of
    them (:meth:`baseline`). choices: name → choice items (``known_mc``, ``mqd_tf``, ``mqd_mc``).
    lm_eval_tasks: lm-evaluation-harness task names (run only when available offline).
    lm_eval_include: a folder of extra lm-eval task YAMLs (e.g. :func:`write_lm_eval_task`'s).
    """

    texts: list[str] = field(default_factory=list)
    fluency_prompts: list[str] = field(default_factory=list)
    facts: list[dict] = field(default_factory=list)
    base_hits: list[bool] | None = None
    choices: dict[str, list[ChoiceItem]] = field(default_factory=dict)
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int | None = None
    lm_eval_include: str | None = None
    fluency_tokens: int = 40
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self):
        if self.fluency_tokens < 1:
            raise UsageError(f"GeneralAbility.fluency_tokens must be ≥ 1 (got {self.fluency_tokens})")
        if self.base_hits is not None and len(self.base_hits) != len(self.facts):
            raise UsageError(f"GeneralAbility.base_hits has {len(self.base_hits)} entries for {len(self.facts)} "
                             "facts; measure the baseline again (GeneralAbility.baseline)")
        self.choices = {k: [c if isinstance(c, ChoiceItem) else ChoiceItem.from_dict(c) for c in v]
                        for k, v in self.choices.items()}

    @classmethod
    def build(cls, *, texts: Sequence[str] = (), facts: Sequence[Mapping] = (), pool_facts: Sequence[Mapping] = (),
              mqd_requests: Sequence = (), edited: Sequence = (), n_questions: int = 100, n_fluency: int = 8,
              lm_eval_tasks: Sequence[str] = (), seed: int = 0, **kw) -> "GeneralAbility":
        """A probe set from what is available: perplexity on ``texts`` (and fluency after their first
        words), retention and multiple-choice questions on the known ``facts`` (distractors from the
        objects of ``pool_facts``, default ``facts``), MQD T/F and MC items from ``mqd_requests`` on
        tuples not in ``edited``."""
        fluency_prompts = [" ".join(t.split()[:4]) for t in texts if len(t.split()) >= 4][:n_fluency]
        facts = [{k: f[k] for k in ("prompt", "target", "subject", "relation") if f.get(k)} for f in facts]
        choices = {"known_mc": known_fact_questions(facts, object_pools(list(pool_facts) or facts), n_questions, seed)}
        choices.update(mqd_choice_items(mqd_requests, edited, n_questions))
        return cls(texts=list(texts), fluency_prompts=fluency_prompts, facts=[dict(f) for f in facts],
                   choices={k: v for k, v in choices.items() if v}, lm_eval_tasks=list(lm_eval_tasks), seed=seed,
                   **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["choices"] = {k: [c.to_dict() for c in v] for k, v in self.choices.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "GeneralAbility":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def n_items(self) -> dict[str, int]:
        """How many items each part holds (what :meth:`measure` reports as its n)."""
        return {"texts": len(self.texts), "fluency_prompts": len(self.fluency_prompts), "facts": len(self.facts),
                **{k: len(v) for k, v in self.choices.items()}}

    def recall(self, adapter) -> list[bool]:
        """Teacher-forced recall of each fact (every target token the argmax)."""
        from .scoring import fact_recall

        return fact_recall(adapter, [f["prompt"] for f in self.facts], [f["target"] for f in self.facts],
                           self.batch_size)

    def baseline(self, adapter) -> "GeneralAbility":
        """Record the (unedited) model's recall of the facts as ``base_hits``; returns self."""
        self.base_hits = self.recall(adapter) if self.facts else []
        return self

    def measure(self, adapter, known_hits: Sequence[bool] | None = None) -> dict[str, dict]:
        """Every metric with its n (parts without items are left out). ``known_hits``: the facts' recall
        when the caller has measured it already (not measured again)."""
        from .fluency import generate_texts, n_gram_entropy
        from .scoring import perplexity

        out: dict[str, dict] = {}
        if self.texts:
            ppl = perplexity(adapter, self.texts)
            out["perplexity"] = {"value": ppl if math.isfinite(ppl) else None, "n": len(self.texts)}
        if self.fluency_prompts:
            texts = generate_texts(adapter, self.fluency_prompts, self.fluency_tokens, seed=self.seed)
            out["fluency"] = {"value": n_gram_entropy(texts), "n": len(texts)}
        if self.facts:
            hits = list(known_hits) if known_hits is not None else self.recall(adapter)
            if len(hits) != len(self.facts):
                raise UsageError(f"known_hits has {len(hits)} entries for {len(self.facts)} facts")
            rec: dict[str, Any] = {"recall": sum(hits) / len(hits), "n_facts": len(hits)}
            if self.base_hits:
                kept = [h for h, b in zip(hits, self.base_hits) if b]
                rec.update(value=sum(kept) / len(kept) if kept else None, n=len(kept))
            out["known_retention"] = rec
        for name, items in self.choices.items():
            if items:
                res = choice_accuracy(adapter, items, self.batch_size)
                out[name] = {"value": res["accuracy"], "n": res["n"], "chance": res["chance"]}
        if self.lm_eval_tasks:
            out["lm_eval"] = run_lm_eval(adapter, self.lm_eval_tasks, self.lm_eval_limit,
                                         include_path=self.lm_eval_include)
        return out
