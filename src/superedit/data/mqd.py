"""The Multi-Question Dataset (MQD): edit requests of three question types from ATOMIC tuples.

The D4S study (Huang et al., "Reasons and Solutions for the Decline in Model Performance after
Editing", NeurIPS 2024) builds MQD from ATOMIC commonsense tuples to ask whether the *kind of editing
objective* decides how much an edit damages a model. Every tuple ``head @@ relation -> tails`` becomes,
through the relation's hand-written question (:mod:`superedit.data.mqd_templates`), three requests
whose subject is the head event and whose objectives differ:

* ``tf`` — true/false: a proposed tail follows the question; the objective is ``yes`` when it is one of
  the head's tails and ``no`` when it is a *corrupted* tail (a tail of another head of the same
  relation). The mix is balanced: over a type ``|#yes − #no| ≤ 1``, and within every relation too.
* ``mc`` — multiple choice: four options ``(a)``–``(d)``, the true tail and three tails of other heads
  of the same relation, in a seeded order; the objective is the letter of the true tail.
* ``dg`` — direct generation: the objective is the tail itself.

Prompts (``Q`` is the relation's question with ``{}`` for the head; the objective follows after a
space, as for every superedit request)::

    dg: "Question: Q Answer:"                                                  -> "get the phone"
    tf: "Question: Q Proposed answer: T. Is the proposed answer correct? Answer yes or no. Answer:"
                                                                               -> "yes" | "no"
    mc: "Question: Q Options: (a) A (b) B (c) C (d) D. Answer with a, b, c or d. Answer:" -> "c"

``target_new`` is the objective (what the edit writes: the ATOMIC-correct answer). ``target_true`` is
the competing answer the edit must beat, since MQD has no counterfactual "old" answer: for ``tf`` the
opposite of the objective, for ``mc`` the letter of a randomly chosen distractor, for ``dg`` a tail of
another head of the same relation (``None`` when the relation has no other head). ``meta`` holds
``question_type``, ``relation``, ``head``, the ATOMIC ``line`` and, per type, ``true_tail``,
``shown_tail`` and ``label`` (tf), ``options`` and ``answer_index`` (mc).

Tails are cleaned (whitespace collapsed, a trailing full stop dropped); ``none``, empty tails and tails
with braces are skipped, and tails equal up to case count once. Every random choice comes from
``random.Random`` seeded with a string of the seed and the type, over lists in file order, so the same
file and seed give byte-identical outputs on every machine.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import FileFormatError, UsageError
from .mqd_templates import RELATION_QUESTIONS
from .requests import EditRequest

__all__ = [
    "AtomicFormatError", "AtomicTuple", "MQDataset", "QUESTION_TYPES", "TYPE_NAMES", "FILE_NAMES",
    "LETTERS", "clean_tail", "parse_atomic_line", "read_atomic", "build_mqd", "write_mqd",
]

QUESTION_TYPES = ("tf", "mc", "dg")
TYPE_NAMES = {"tf": "true/false", "mc": "multiple-choice", "dg": "direct generation"}
FILE_NAMES = {"tf": "true_false.jsonl", "mc": "multiple_choice.jsonl", "dg": "direct_generation.jsonl"}
ALL_FILE = "mqd.jsonl"
LETTERS = ("a", "b", "c", "d")
PAPER_PER_TYPE = 4000  #: the D4S study's MQD size per question type

#: distractor tails needed per type (tf: one corruption; mc: three wrong options; dg: none required)
_NEEDED = {"tf": 1, "mc": len(LETTERS) - 1, "dg": 0}

_FORMAT_HINT = ("Each line must be 'head @@ relation', a tab, then the tails separated by '|' "
                "(ATOMIC-2020's tab-separated format, e.g. 'PersonX calls PersonY ambulance @@ xNeed\\t"
                "get the phone| to see PersonY is hurt').")


class AtomicFormatError(FileFormatError):
    """An ATOMIC tuple file cannot be read; the message names the file, the line and what to do."""


@dataclass(frozen=True)
class AtomicTuple:
    """One ATOMIC line: ``head @@ relation`` and its usable tails (cleaned, ``none`` dropped)."""

    line: int  #: 1-based line number in the file
    head: str
    relation: str
    tails: tuple[str, ...]


def clean_tail(text: str) -> str | None:
    """A displayable tail, or None for ``none`` / empty / braces: whitespace collapsed, one trailing
    full stop dropped (``"to get a phone."`` -> ``"to get a phone"``)."""
    tail = re.sub(r"\s+", " ", text).strip()
    if tail.endswith(".") and not tail.endswith(".."):
        tail = tail[:-1].rstrip()
    if not tail or tail.lower() == "none" or "{" in tail or "}" in tail:
        return None
    return tail


def parse_atomic_line(text: str, line: int, where: str = "ATOMIC file") -> AtomicTuple | None:
    """Parse one line (None for a blank line); raise :class:`AtomicFormatError` naming the line."""
    if not text.strip():
        return None
    here = f"{where}, line {line}"
    fields = text.rstrip("\r\n").split("\t")
    if len(fields) != 2:
        raise AtomicFormatError(f"{here}: expected 2 tab-separated fields, found {len(fields)} "
                                f"({_short(text)!r}). {_FORMAT_HINT}")
    left, right = fields
    if left.count("@@") != 1:
        raise AtomicFormatError(f"{here}: the first field must hold one '@@' between head and relation "
                                f"(got {_short(left)!r}). {_FORMAT_HINT}")
    head, relation = (part.strip() for part in left.split("@@"))
    head = re.sub(r"\s+", " ", head)
    if not head or not relation:
        missing = "head" if not head else "relation"
        raise AtomicFormatError(f"{here}: the {missing} before/after '@@' is empty (got {_short(left)!r}). "
                                f"{_FORMAT_HINT}")
    if "{}" in head:
        raise AtomicFormatError(f"{here}: the head {head!r} contains '{{}}', which superedit reserves for the "
                                "subject's place in a prompt. Rewrite or remove this line.")
    if relation not in RELATION_QUESTIONS:
        raise AtomicFormatError(
            f"{here}: unknown relation {relation!r}. Known relations: {', '.join(sorted(RELATION_QUESTIONS))}. "
            "Add a question for it to superedit/data/mqd_templates.py, or remove the line.")
    tails: list[str] = []
    seen: set[str] = set()
    for raw in right.split("|"):
        tail = clean_tail(raw)
        if tail is not None and tail.lower() not in seen:
            seen.add(tail.lower())
            tails.append(tail)
    return AtomicTuple(line, head, relation, tuple(tails))


def _short(text: str, n: int = 80) -> str:
    text = text.rstrip("\r\n")
    return text if len(text) <= n else text[:n] + "…"


def read_atomic(path: str | Path) -> list[AtomicTuple]:
    """Every tuple of an ATOMIC tab-separated file, in file order (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise AtomicFormatError(f"{p}: no such file. Give an ATOMIC-2020 tuple file (--atomic).")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise AtomicFormatError(f"{p}: not UTF-8 text ({exc}). Give ATOMIC's tab-separated tuples.") from None
    out = [t for i, text in enumerate(lines, 1) if (t := parse_atomic_line(text, i, str(p))) is not None]
    if not out:
        raise AtomicFormatError(f"{p}: holds no tuples. {_FORMAT_HINT}")
    return out


@dataclass
class MQDataset:
    """The three request lists (file order of their ATOMIC lines) and the build report."""

    requests: dict[str, list[EditRequest]]
    report: dict = field(default_factory=dict)


class _Pool:
    """A relation's distinct tails (file order) and, per head, the tails that are true for it."""

    def __init__(self, tuples: Sequence[AtomicTuple]):
        self.tails: list[str] = []
        self._seen: set[str] = set()
        self.own: dict[str, set[str]] = {}
        for t in tuples:
            own = self.own.setdefault(t.head.lower(), set())
            for tail in t.tails:
                own.add(tail.lower())
                if tail.lower() not in self._seen:
                    self._seen.add(tail.lower())
                    self.tails.append(tail)

    def available(self, head: str) -> int:
        """How many of the relation's tails are not true for ``head``."""
        return len(self.tails) - len(self.own.get(head.lower(), ()))

    def draw(self, rng: random.Random, head: str, k: int) -> list[str]:
        """``k`` distinct tails that are not true for ``head`` (caller checked :meth:`available`)."""
        own = self.own.get(head.lower(), set())
        picked: list[str] = []
        keys: set[str] = set()
        for _ in range(64 * (k + 1)):  # rejection sampling: fast when few tails are excluded
            tail = self.tails[rng.randrange(len(self.tails))]
            if tail.lower() not in own and tail.lower() not in keys:
                picked.append(tail)
                keys.add(tail.lower())
                if len(picked) == k:
                    return picked
        rest = [t for t in self.tails if t.lower() not in own and t.lower() not in keys]
        return picked + rng.sample(rest, k - len(picked))


def _balanced_labels(items: Sequence[AtomicTuple]) -> dict[int, str]:
    """``yes``/``no`` per tuple line: alternating within each relation (in the given, shuffled order),
    the first label of each odd-sized relation alternating too, so overall and per relation
    ``|#yes − #no| ≤ 1``."""
    by_rel: dict[str, list[AtomicTuple]] = {}
    for t in items:
        by_rel.setdefault(t.relation, []).append(t)
    labels: dict[int, str] = {}
    start = 0
    for rel in sorted(by_rel):
        group = by_rel[rel]
        for j, t in enumerate(group):
            labels[t.line] = ("yes", "no")[(start + j) % 2]
        if len(group) % 2:
            start = 1 - start
    return labels


def _question(relation: str) -> str:
    return "Question: " + RELATION_QUESTIONS[relation].question


def _make_request(qtype: str, t: AtomicTuple, pool: _Pool, rng: random.Random, label: str | None,
                  source_name: str) -> EditRequest:
    tail = rng.choice(t.tails)
    q = _question(t.relation)
    meta: dict = {"question_type": qtype, "relation": t.relation, "head": t.head, "line": t.line,
                  "true_tail": tail}
    if qtype == "dg":
        prompt, objective = f"{q} Answer:", tail
        other = pool.draw(rng, t.head, 1) if pool.available(t.head) else []
        competing = other[0] if other else None
    elif qtype == "tf":
        shown = tail if label == "yes" else pool.draw(rng, t.head, 1)[0]
        prompt = f"{q} Proposed answer: {shown}. Is the proposed answer correct? Answer yes or no. Answer:"
        objective, competing = label, ("no" if label == "yes" else "yes")
        meta.update(label=label, shown_tail=shown)
    else:
        options = [tail] + pool.draw(rng, t.head, len(LETTERS) - 1)
        rng.shuffle(options)
        answer = options.index(tail)
        listed = " ".join(f"({letter}) {opt}" for letter, opt in zip(LETTERS, options))
        prompt = f"{q} Options: {listed}. Answer with {', '.join(LETTERS[:-1])} or {LETTERS[-1]}. Answer:"
        objective = LETTERS[answer]
        competing = rng.choice([letter for letter in LETTERS if letter != objective])
        meta.update(options=options, answer_index=answer)
    return EditRequest(prompt=prompt, subject=t.head, target_new=objective, target_true=competing,
                       case_id=f"{qtype}-{t.line}", relation_id=t.relation,
                       source=f"{source_name}#{t.line - 1}", meta=meta)


def build_mqd(tuples: Sequence[AtomicTuple], per_type: int = PAPER_PER_TYPE, seed: int = 0,
              source_name: str = "atomic") -> MQDataset:
    """Up to ``per_type`` requests of each type (one per tuple), chosen and built with ``seed``.

    A tuple is usable when it has a tail; ``tf`` also needs one tail of another head of its relation,
    ``mc`` three. The usable tuples are shuffled per type, the first ``per_type`` kept, and the
    requests listed in file order. The report counts requests per type and relation and the skips."""
    if isinstance(per_type, bool) or not isinstance(per_type, int) or per_type < 1:
        raise UsageError(f"--per-type must be a positive integer (got {per_type!r}); the D4S study used "
                         f"{PAPER_PER_TYPE}.")
    pools: dict[str, _Pool] = {}
    by_rel: dict[str, list[AtomicTuple]] = {}
    for t in tuples:
        by_rel.setdefault(t.relation, []).append(t)
    for rel, group in by_rel.items():
        pools[rel] = _Pool(group)
    with_tails = [t for t in tuples if t.tails]
    requests: dict[str, list[EditRequest]] = {}
    types_report: dict[str, dict] = {}
    for qtype in QUESTION_TYPES:
        rng = random.Random(f"superedit-mqd:{seed}:{qtype}")
        need = _NEEDED[qtype]
        eligible = [t for t in with_tails if pools[t.relation].available(t.head) >= need]
        order = list(range(len(eligible)))
        rng.shuffle(order)
        chosen_shuffled = [eligible[i] for i in order[:per_type]]
        labels = _balanced_labels(chosen_shuffled) if qtype == "tf" else {}
        chosen = sorted(chosen_shuffled, key=lambda t: t.line)
        reqs = [_make_request(qtype, t, pools[t.relation], rng, labels.get(t.line), source_name) for t in chosen]
        requests[qtype] = reqs
        types_report[qtype] = _type_report(qtype, reqs, len(with_tails) - len(eligible), len(eligible))
    report = {
        "n_lines": len(tuples),
        "n_without_tail": len(tuples) - len(with_tails),
        "per_type_requested": per_type,
        "seed": seed,
        "types": types_report,
        "relations": {rel: RELATION_QUESTIONS[rel].question for rel in sorted(by_rel)},
    }
    return MQDataset(requests, report)


def _type_report(qtype: str, reqs: Sequence[EditRequest], n_too_few: int, n_eligible: int) -> dict:
    per_rel = Counter(r.relation_id for r in reqs)
    out = {"name": TYPE_NAMES[qtype], "file": FILE_NAMES[qtype], "n": len(reqs), "n_eligible": n_eligible,
           "skipped_too_few_distractors": n_too_few,
           "per_relation": dict(sorted(per_rel.items())),
           "objectives": dict(sorted(Counter(r.target_new for r in reqs).items())) if qtype != "dg" else None}
    if qtype == "tf":
        yes = Counter(r.relation_id for r in reqs if r.target_new == "yes")
        out["yes_no_per_relation"] = {rel: [yes[rel], n - yes[rel]] for rel, n in sorted(per_rel.items())}
    return out


def write_mqd(dataset: MQDataset, out_dir: str | Path, atomic_path: str | Path | None = None) -> dict:
    """Write one JSONL per type, ``mqd.jsonl`` with all three, and ``report.json``; return the report."""
    from ..utils.io import write_json_atomic
    from .loaders import save_requests_jsonl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for qtype in QUESTION_TYPES:
        save_requests_jsonl(out / FILE_NAMES[qtype], dataset.requests[qtype])
    save_requests_jsonl(out / ALL_FILE, [r for q in QUESTION_TYPES for r in dataset.requests[q]])
    report = dict(dataset.report)
    if atomic_path is not None:
        report["atomic"] = str(atomic_path)
        report["atomic_sha256"] = hashlib.sha256(Path(atomic_path).read_bytes()).hexdigest()
    report["files"] = {q: FILE_NAMES[q] for q in QUESTION_TYPES} | {"all": ALL_FILE}
    write_json_atomic(out / "report.json", report)
    return report
