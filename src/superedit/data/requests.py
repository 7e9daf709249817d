"""The one validated edit-request type that feeds every method and metric.

An :class:`EditRequest` describes one fact rewrite ``(subject, relation) -> target_new``:

* ``prompt`` is a *template* with exactly one ``{}`` where the subject goes, e.g.
  ``"{} is owned by"``. Fill it with :meth:`EditRequest.filled_prompt` (which uses
  ``str.replace``, so other braces in the template are harmless; do not call
  ``template.format``).
* Targets (``target_new``, ``target_true`` and every answer list) are stored as plain
  words **without a leading space**, whitespace-stripped. The target is predicted
  right after the prompt with one separating space: the text scored is
  ``filled_prompt() + " " + target_new``. Tokenise the target as ``" " + target``.
* Prompts in the list fields (paraphrases, neighbourhood, attribute, generation)
  already contain their subject; they are whitespace-stripped for the same reason.

Validation runs on construction (``__post_init__`` calls :meth:`EditRequest.validate`)
and raises :class:`superedit.errors.RequestFormatError` with a message naming the
source (file and record index), the field, what is wrong and what to do.

The dataclass is frozen (attributes cannot be reassigned; use
``dataclasses.replace``); the list fields are plain lists, so do not mutate them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from superedit.errors import RequestFormatError

__all__ = ["EditRequest", "request_error", "describe_source"]


def describe_source(source: str) -> str:
    """Human form of a ``"file.json#12"`` source string: ``"file.json, record #12"``."""
    if not source:
        return "edit request"
    if "#" in source:
        file, rest = source.rsplit("#", 1)
        return f"{file}, record #{rest}"
    return source


def request_error(source: str, field_name: str, problem: str, hint: str) -> RequestFormatError:
    """Build a RequestFormatError with a uniform message and structured attributes.

    The message reads ``"<file>, record #<i>: field '<field>' <problem>. <hint>"``.
    The parts are kept as attributes (``source``, ``field``, ``problem``, ``hint``) so a
    loader can re-raise the error with its own file position or raw field name.
    """
    msg = f"{describe_source(source)}: field '{field_name}' {problem}."
    if hint:
        msg += f" {hint}"
    err = RequestFormatError(msg)
    err.source = source  # type: ignore[attr-defined]
    err.field = field_name  # type: ignore[attr-defined]
    err.problem = problem  # type: ignore[attr-defined]
    err.hint = hint  # type: ignore[attr-defined]
    return err


_LIST_FIELDS = (
    "paraphrase_prompts",
    "neighborhood_prompts",
    "neighborhood_answers",
    "attribute_prompts",
    "attribute_answers",
    "subject_rephrases",
    "generation_prompts",
)


@dataclass(frozen=True)
class EditRequest:
    """One fact rewrite. See the module docstring for conventions.

    Fields:
        prompt: template with exactly one ``{}`` where the subject goes.
        subject: the subject string as it appears in the filled prompt.
        target_new: the new object (plain word(s), no leading space).
        target_true: the current/true object, or None when unknown.
        paraphrase_prompts: rephrasings of the rewrite prompt, subject filled in;
            answer ``target_new`` after an edit.
        neighborhood_prompts: prompts about *other* subjects that must not change.
        neighborhood_answers: their answers; same length as ``neighborhood_prompts``,
            or a single answer that is broadcast to every prompt.
        attribute_prompts: prompts about other subjects whose true answer is
            ``target_new`` (CounterFact's attribute prompts).
        attribute_answers: their answers (same length or one broadcast answer).
        subject_rephrases: other names of the subject (aliases).
        generation_prompts: open-ended prompts for fluency/consistency generation.
        case_id: the dataset's id for the record (str or int; None when unknown).
        relation_id: e.g. Wikidata ``"P127"``, or None.
        source: where the request came from, ``"file.json#12"`` (0-based record index).
        meta: extra JSON-serialisable data from the source record (e.g. MQuAKE's
            multi-hop ``questions``, zsRE's ``cond``); never used for validation.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_answers: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    attribute_answers: list[str] = field(default_factory=list)
    subject_rephrases: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    case_id: str | int | None = None
    relation_id: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _err(self, field_name: str, problem: str, hint: str) -> RequestFormatError:
        return request_error(self.source, field_name, problem, hint)

    def _normalise(self) -> None:
        """Strip strings, turn None/tuples/single strings into lists, broadcast answers."""
        if not isinstance(self.source, str):
            self._set("source", str(self.source))
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise self._err(
                    name,
                    f"must be a string, got {type(value).__name__}",
                    f"Give '{name}' as a JSON string.",
                )
            self._set(name, str(value).strip())
        tt = self.target_true
        if tt is not None:
            if isinstance(tt, bool) or not isinstance(tt, (str, int, float)):
                raise self._err(
                    "target_true",
                    f"must be a string or null, got {type(tt).__name__}",
                    "Give 'target_true' as a JSON string, or null when unknown.",
                )
            tt = str(tt).strip()
            self._set("target_true", tt or None)
        for name in ("relation_id",):
            value = getattr(self, name)
            if value is not None:
                self._set(name, str(value))
        if isinstance(self.case_id, bool) or not (
            self.case_id is None or isinstance(self.case_id, (str, int))
        ):
            raise self._err(
                "case_id",
                f"must be a string or an integer, got {type(self.case_id).__name__}",
                "Give 'case_id' as a JSON string or integer.",
            )
        for name in _LIST_FIELDS:
            value = getattr(self, name)
            if value is None:
                value = []
            elif isinstance(value, str):
                value = [value]
            elif isinstance(value, (list, tuple)):
                value = list(value)
            else:
                raise self._err(
                    name,
                    f"must be a list of strings, got {type(value).__name__}",
                    f"Give '{name}' as a JSON list of strings.",
                )
            out = []
            for i, item in enumerate(value):
                if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                    raise self._err(
                        f"{name}[{i}]",
                        f"must be a string, got {type(item).__name__}",
                        f"Every entry of '{name}' must be a JSON string.",
                    )
                item = str(item).strip()
                if not item:
                    raise self._err(
                        f"{name}[{i}]",
                        "is empty",
                        "Remove the empty entry or fill it in.",
                    )
                out.append(item)
            self._set(name, out)
        for prompts, answers in (
            ("neighborhood_prompts", "neighborhood_answers"),
            ("attribute_prompts", "attribute_answers"),
        ):
            p, a = getattr(self, prompts), getattr(self, answers)
            if len(a) == 1 and len(p) != 1:
                self._set(answers, a * len(p))
        if self.meta is None:
            self._set("meta", {})
        elif not isinstance(self.meta, dict):
            raise self._err(
                "meta",
                f"must be a JSON object, got {type(self.meta).__name__}",
                "Give 'meta' as a JSON object (or leave it out).",
            )

    def validate(self) -> None:
        """Check the request; raise RequestFormatError naming source and field."""
        n = self.prompt.count("{}")
        if n == 0:
            raise self._err(
                "prompt",
                f"has no '{{}}' placeholder for the subject (got {self.prompt!r})",
                "Write the prompt as a template with exactly one '{}' where the subject goes, "
                "e.g. '{} is owned by'.",
            )
        if n > 1:
            raise self._err(
                "prompt",
                f"has {n} '{{}}' placeholders (got {self.prompt!r}); exactly one is allowed",
                "Keep a single '{}' where the subject goes and write any other mention out.",
            )
        if not self.subject:
            raise self._err(
                "subject",
                "is empty",
                "Give the subject whose fact is rewritten, e.g. 'Google Trends'.",
            )
        if "{}" in self.subject:
            raise self._err(
                "subject",
                f"contains '{{}}' (got {self.subject!r})",
                "The subject is plain text; only the prompt template holds '{}'.",
            )
        if not self.target_new:
            raise self._err(
                "target_new",
                "is empty",
                "Give the new object as plain words without a leading space, e.g. 'Seoul'.",
            )
        if self.target_true is not None and self.target_new == self.target_true:
            raise self._err(
                "target_new",
                f"equals target_true ({self.target_true!r}): the edit would change nothing and every "
                "edit score would be 0",
                "Give a new object that differs from the true one, or remove this record.",
            )
        for prompts, answers in (
            ("neighborhood_prompts", "neighborhood_answers"),
            ("attribute_prompts", "attribute_answers"),
        ):
            p, a = getattr(self, prompts), getattr(self, answers)
            if len(p) != len(a):
                raise self._err(
                    answers,
                    f"has {len(a)} answers for the {len(p)} entries of '{prompts}'",
                    f"Give one answer per entry of '{prompts}', or a single answer for all of them.",
                )

    # ------------------------------------------------------------------ helpers
    def filled_prompt(self) -> str:
        """The prompt with the subject filled in (the target follows after one space)."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def fact_key(self) -> tuple[str, str]:
        """The fact the request is about: (subject, relation_id), the template standing in for a missing
        relation id. Two requests with the same key rewrite the same fact."""
        return self.subject, self.relation_id or self.prompt

    def __hash__(self) -> int:  # lists make the generated hash fail; hash the identity
        return hash((self.case_id, self.prompt, self.subject, self.target_new, self.target_true, self.source))

    def to_dict(self) -> dict:
        """A JSON-serialisable dict with every field (the ``superedit`` JSONL format)."""
        out: dict = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = list(value)
            elif isinstance(value, dict):
                value = copy.deepcopy(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> "EditRequest":
        """Inverse of :meth:`to_dict`.

        ``source`` overrides the stored ``source`` field when given. Unknown keys and
        missing required keys raise RequestFormatError naming the field.
        """
        where = source if source is not None else (str(data.get("source", "") or "") if isinstance(data, Mapping) else "")
        if not isinstance(data, Mapping):
            raise request_error(
                where, "<record>", f"must be a JSON object, got {type(data).__name__}",
                "Write one EditRequest.to_dict() object per record.",
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise request_error(
                where, unknown[0], "is not an EditRequest field",
                f"Allowed fields: {', '.join(names)}. Rename or remove it "
                "(or load the file with the right fmt=...).",
            )
        for required in ("prompt", "subject", "target_new"):
            if data.get(required) is None:
                raise request_error(
                    where, required, "is missing", f"Every request needs '{required}'.",
                )
        kwargs = {k: data[k] for k in names if k in data}
        if source is not None:
            kwargs["source"] = source
        return cls(**kwargs)
