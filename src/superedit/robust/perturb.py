"""Perturbed queries for an edit: subject rephrases, shuffled subject tokens and long contexts.

For each :class:`~superedit.data.EditRequest` three kinds of variants of the rewrite prompt are built:

* ``rephrase`` — the prompt template filled with another name of the subject
  (``request.subject_rephrases``, or a user mapping ``subject -> [names]``);
* ``shuffle`` — the subject's tokens permuted (up to ``n_shuffles`` distinct permutations, the original
  order excluded). A permutation is kept only if its text round-trips through the tokenizer
  (``tokenize(detokenize(perm)) == perm``); the subject is tokenized as it sits in running text
  (with a leading space for byte-level BPE), see :func:`shuffled_subjects`;
* ``long`` — a random span of about ``long_words`` words of a corpus prepended to the prompt (trimmed
  from its start until prompt + target fit into ``max_tokens``).

Each kind is split 50/50 (seeded, per request and kind) into ``id`` (in-domain: may be used to train
the adaptor) and ``ood`` (out-of-domain: never seen in training); the two halves are disjoint. With an
odd count the extra variant goes to ``ood``. Whatever cannot be built is recorded as a :class:`Skip`
(kind + reason) in the returned set — never a silent empty list.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import SupereditError

KINDS = ("rephrase", "shuffle", "long")
SPLITS = ("id", "ood")

#: skip reasons (stable strings, counted in the outputs)
SKIP_ONE_TOKEN = "single-token subject: no token permutation exists"
SKIP_NO_ROUNDTRIP = "no permutation of the subject's tokens round-trips through the tokenizer"
SKIP_NO_REPHRASES = "no subject rephrases (request.subject_rephrases empty and no entry in the rephrase file)"
SKIP_NO_CORPUS = "no corpus text for long contexts"
SKIP_TOO_LONG = "prompt alone does not fit the token budget for long contexts"
SKIP_NO_ID = "only one variant: none left for in-domain (adaptor training)"


class PerturbError(SupereditError):
    pass


@dataclass
class Perturbation:
    """One perturbed query: ``template`` (with one ``{}``) filled with ``subject``."""

    kind: str
    split: str
    template: str
    subject: str
    info: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        i = self.template.index("{}")
        return self.template[:i] + self.subject + self.template[i + 2:]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Skip:
    case_id: str | int | None
    kind: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PerturbationSet:
    """All variants of one request, plus what was skipped."""

    case_id: str | int | None
    items: list[Perturbation] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    def of(self, kind: str | None = None, split: str | None = None) -> list[Perturbation]:
        return [p for p in self.items if (kind is None or p.kind == kind) and (split is None or p.split == split)]

    def counts(self) -> dict[str, int]:
        return {f"{k}_{s}": len(self.of(k, s)) for k in KINDS for s in SPLITS}

    def to_dict(self) -> dict:
        return {"case_id": self.case_id, "items": [p.to_dict() for p in self.items],
                "skips": [s.to_dict() for s in self.skips], "counts": self.counts()}


# ------------------------------------------------------------------------------------------ helpers
def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def split_id_ood(items: Sequence, seed: int | str) -> tuple[list, list]:
    """Seeded 50/50 split into (in-domain, out-of-domain); disjoint, the odd one goes to OOD."""
    order = list(range(len(items)))
    random.Random(f"superedit-robust-split:{seed}").shuffle(order)
    n_id = len(items) // 2
    return [items[i] for i in sorted(order[:n_id])], [items[i] for i in sorted(order[n_id:])]


def shuffled_subjects(tokenizer, subject: str, max_n: int = 10, seed: int | str = 0) -> tuple[list[str], str | None]:
    """Up to ``max_n`` distinct token permutations of ``subject`` as text, and a skip reason (or None).

    The subject is tokenized both bare and with a leading space (how byte-level BPE sees it in running
    text); the form with more round-tripping permutations is used. A permutation ``perm`` of the ids
    is kept when ``tokenize(decode(perm)) == perm``, its text (without the leading space) is non-empty,
    has no surrounding whitespace and differs from the subject.
    """
    best: list[str] = []
    n_tokens = 0
    for lead in ("", " "):
        ids = _ids(tokenizer, lead + subject)
        n_tokens = max(n_tokens, len(ids))
        if len(ids) < 2:
            continue
        rng = random.Random(f"superedit-robust-shuffle:{seed}:{lead!r}")
        if len(ids) <= 7:
            perms = list(itertools.permutations(range(len(ids))))[1:]  # [0] is the identity
            rng.shuffle(perms)
        else:
            perms = []
            seen = set()
            for _ in range(50 * max_n):
                p = list(range(len(ids)))
                rng.shuffle(p)
                if tuple(p) not in seen:
                    seen.add(tuple(p))
                    perms.append(tuple(p))
        out, seen_ids = [], {tuple(ids)}
        for p in perms:
            perm = [ids[i] for i in p]
            if tuple(perm) in seen_ids:
                continue  # repeated tokens: same sequence as the original or an earlier permutation
            text = tokenizer.decode(perm, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if _ids(tokenizer, text) != perm or not text.startswith(lead):
                continue
            body = text[len(lead):]
            if not body or body != body.strip() or body == subject or "{}" in body:
                continue
            seen_ids.add(tuple(perm))
            out.append(body)
            if len(out) >= max_n:
                break
        if len(out) > len(best):
            best = out
    if best:
        return best, None
    return [], (SKIP_ONE_TOKEN if n_tokens < 2 else SKIP_NO_ROUNDTRIP)


def corpus_words(corpus) -> list[str]:
    """All words of a corpus (a :class:`superedit.stats.Corpus`, a path or a list of strings), braces removed."""
    if corpus is None:
        return []
    from ..stats import Corpus

    texts = Corpus.coerce(corpus).texts
    return " ".join(t.replace("{", " ").replace("}", " ") for t in texts).split()


def long_contexts(tokenizer, template: str, subject: str, target: str, words: Sequence[str], n: int,
                  long_words: int = 300, max_tokens: int | None = None, seed: int | str = 0) -> tuple[list[tuple[str, int]], str | None]:
    """``n`` templates ``span + " " + template`` with random corpus spans of ~``long_words`` words.

    Returns ``([(template, n_words)], skip_reason)``. With ``max_tokens`` the span is trimmed from its
    start until prompt + target fit.
    """
    if not words:
        return [], SKIP_NO_CORPUS
    filled = template.replace("{}", subject, 1)
    base = len(_ids(tokenizer, filled + " " + target)) + 2
    if max_tokens is not None and base >= max_tokens:
        return [], SKIP_TOO_LONG
    rng = random.Random(f"superedit-robust-long:{seed}")
    out = []
    for _ in range(n):
        k = min(long_words, len(words))
        start = rng.randrange(0, len(words) - k + 1)
        span = list(words[start:start + k])
        if max_tokens is not None:
            while span and len(_ids(tokenizer, " ".join(span))) + base > max_tokens:
                cut = max(1, len(span) // 10)
                span = span[cut:]
        if not span:
            return [], SKIP_TOO_LONG
        text = " ".join(span)
        if not text.rstrip().endswith((".", "!", "?")):
            text += "."
        out.append((text + " " + template, len(span)))
    return out, None


def load_rephrases(path: str | Path) -> dict[str, list[str]]:
    """A user file mapping subject → list of rephrases (JSON object, or JSONL of {subject, rephrases})."""
    p = Path(path)
    if not p.is_file():
        raise PerturbError(f"--rephrases {str(path)!r}: no such file; give a JSON object subject -> [rephrases]")
    text = p.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = {}
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PerturbError(f"{p}: line {i + 1} is not JSON: {exc}") from exc
            if not isinstance(rec, dict) or "subject" not in rec or "rephrases" not in rec:
                raise PerturbError(f"{p}: line {i + 1} must be an object with 'subject' and 'rephrases'")
            obj.setdefault(str(rec["subject"]), []).extend(rec["rephrases"])
    if not isinstance(obj, dict):
        raise PerturbError(f"{p}: expected a JSON object mapping subject -> list of rephrases")
    out = {}
    for k, v in obj.items():
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise PerturbError(f"{p}: the rephrases of {k!r} must be a list of strings")
        out[str(k)] = [x.strip() for x in v if x.strip()]
    return out


# ------------------------------------------------------------------------------------------ main entry
def make_perturbations(tokenizer, request, kinds: Sequence[str] = KINDS, words: Sequence[str] = (),
                       rephrases: dict[str, list[str]] | None = None, n_shuffles: int = 10, n_long: int = 4,
                       long_words: int = 300, max_tokens: int | None = None, seed: int = 0) -> PerturbationSet:
    """All perturbed queries of one request, split into in-domain / out-of-domain (see module doc)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise PerturbError(f"unknown perturbation kind(s) {bad}; choose from {KINDS}")
    cid = request.case_id
    key = f"{seed}:{cid}:{request.subject}"
    pset = PerturbationSet(case_id=cid)
    for kind in kinds:
        variants: list[Perturbation] = []
        reason = None
        if kind == "rephrase":
            names = list(request.subject_rephrases)
            if rephrases and request.subject in rephrases:
                names += rephrases[request.subject]
            names = [n for n in dict.fromkeys(names) if n and n != request.subject and "{}" not in n]
            if not names:
                reason = SKIP_NO_REPHRASES
            variants = [Perturbation(kind, "", request.prompt, n) for n in names]
        elif kind == "shuffle":
            texts, reason = shuffled_subjects(tokenizer, request.subject, n_shuffles, seed=key)
            variants = [Perturbation(kind, "", request.prompt, t) for t in texts]
        elif kind == "long":
            temps, reason = long_contexts(tokenizer, request.prompt, request.subject, request.target_new, words,
                                          n_long, long_words, max_tokens, seed=key)
            variants = [Perturbation(kind, "", t, request.subject, {"context_words": w}) for t, w in temps]
        if reason:
            pset.skips.append(Skip(cid, kind, reason))
            continue
        id_, ood = split_id_ood(variants, f"{key}:{kind}")
        for p in id_:
            p.split = "id"
        for p in ood:
            p.split = "ood"
        if not id_:
            pset.skips.append(Skip(cid, kind, SKIP_NO_ID))
        pset.items += id_ + ood
    return pset


def build_perturbations(tokenizer, requests: Sequence, **kwargs) -> tuple[list[PerturbationSet], dict]:
    """:func:`make_perturbations` for every request, plus a skip summary ``{kind: {reason: count}}``."""
    sets = [make_perturbations(tokenizer, r, **kwargs) for r in requests]
    return sets, skip_summary(sets)


def skip_summary(sets: Sequence[PerturbationSet]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s in sets:
        for sk in s.skips:
            out.setdefault(sk.kind, {}).setdefault(sk.reason, 0)
            out[sk.kind][sk.reason] += 1
    return out
