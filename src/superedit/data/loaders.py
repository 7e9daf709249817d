"""Read knowledge-editing datasets, unchanged, into :class:`EditRequest` lists.

Supported formats (a JSON list or JSONL, one record per element/line), detected from
the first record's keys by :func:`detect_format` unless ``fmt=`` says otherwise:

``counterfact``
    ROME/MEMIT CounterFact: ``case_id``, ``requested_rewrite{prompt, subject,
    relation_id, target_new{str,id}, target_true{str,id}}``, ``paraphrase_prompts``
    (answer target_new), ``neighborhood_prompts`` (answer target_true),
    ``attribute_prompts`` (answer target_new), ``generation_prompts``.
    ``requested_rewrite`` may be a list: one request per rewrite, with ``case_id``
    ``"<case_id>:<j>"``; the case-level prompt lists are attached only when the list
    has a single rewrite (they are about one subject), otherwise they stay in ``meta``.
``mquake``
    MQuAKE: ``case_id``, ``requested_rewrite`` (list of CounterFact-style rewrites,
    each with a single-hop ``question``), ``questions``, ``answer``, ``new_answer``, ...
    One request per rewrite (``case_id`` ``"<case_id>:<j>"``, ``meta["group_case_id"]``
    the original id, so a case's rewrites can be applied together). The rewrite's
    ``question`` (subject filled in, answer target_new) becomes a paraphrase prompt;
    the multi-hop fields are kept in ``meta``.
``easyedit``
    EasyEdit flat records: ``prompt`` with the subject already filled in, ``subject``,
    ``target_new``, ``ground_truth`` or ``target_true``, ``rephrase_prompt`` (str, list
    or null), ``locality_prompt`` + ``locality_ground_truth`` (str or list),
    ``subject_rephrase`` (list), optionally EasyEdit's nested
    ``locality{name: {prompt, ground_truth}}``. The template is made by replacing the
    first occurrence of the subject in ``prompt`` with ``{}``.
``zsre``
    zsRE as in MEND: ``subject``, ``src``, ``pred``, ``rephrase``, ``alt``,
    ``answers``, ``loc``, ``loc_ans``, ``cond``. Template from ``src``,
    target_new=``alt``, target_true=``answers[0]``, paraphrase ``[rephrase]``,
    neighbourhood ``[loc]`` answered by ``loc_ans``. ``loc`` is kept as is, including
    its ``"nq question: "`` prefix, exactly as MEND and EasyEdit evaluate it.
``superedit``
    Our own JSONL: one :meth:`EditRequest.to_dict` per line
    (see :func:`save_requests_jsonl`).

Fields a format does not map are kept in ``EditRequest.meta``. Targets are stripped of
surrounding whitespace (e.g. zsRE's ``" species"`` becomes ``"species"``).

Every problem raises :class:`superedit.errors.RequestFormatError` whose message names the
file, the 0-based record index and the raw field, and says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from superedit.data.requests import EditRequest, describe_source, request_error
from superedit.errors import RequestFormatError

__all__ = ["FORMATS", "detect_format", "load_requests", "save_requests_jsonl", "read_records"]

FORMATS = ("counterfact", "mquake", "easyedit", "zsre", "superedit")

_FMT_ALIASES = {
    "cf": "counterfact",
    "mcf": "counterfact",
    "multi_counterfact": "counterfact",
    "zsre-mend": "zsre",
    "zsre_mend": "zsre",
    "mend": "zsre",
    "easyedit-flat": "easyedit",
    "easyedit_flat": "easyedit",
    "jsonl": "superedit",
    "native": "superedit",
}

_REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(EditRequest))

_FORMAT_HELP = (
    "counterfact (keys case_id, requested_rewrite), "
    "mquake (requested_rewrite list + questions/new_answer), "
    "easyedit (prompt, subject, target_new with the subject filled into prompt), "
    "zsre (MEND: src, alt, answers, rephrase, loc, loc_ans), "
    "superedit (EditRequest.to_dict() per line)"
)


# --------------------------------------------------------------------------- detection
def detect_format(record: Mapping[str, Any], source: str = "") -> str:
    """Name the dataset format of one raw record from its keys.

    Returns one of :data:`FORMATS`; raises RequestFormatError for an unknown layout.
    """
    if not isinstance(record, Mapping):
        raise RequestFormatError(
            f"{describe_source(source)}: a record must be a JSON object, got "
            f"{type(record).__name__}. Each list element / JSONL line must be one request."
        )
    keys = set(record)
    if "requested_rewrite" in keys:
        if keys & {"questions", "new_answer", "new_single_hops"}:
            return "mquake"
        return "counterfact"
    if "src" in keys and ("alt" in keys or "answers" in keys):
        return "zsre"
    if {"prompt", "subject", "target_new"} <= keys:
        prompt = record.get("prompt")
        if keys <= _REQUEST_FIELDS and isinstance(prompt, str) and "{}" in prompt:
            return "superedit"
        return "easyedit"
    raise RequestFormatError(
        f"{describe_source(source)}: cannot tell the dataset format from the record keys "
        f"{sorted(keys)}. Known formats: {_FORMAT_HELP}. Convert the file to one of them, "
        "or pass fmt=... if it is one of them with missing keys."
    )


def _normalise_fmt(fmt: str) -> str:
    key = str(fmt).strip().lower()
    key = _FMT_ALIASES.get(key, key)
    if key not in FORMATS and key != "auto":
        raise RequestFormatError(
            f"unknown dataset format {fmt!r}. Use 'auto' or one of: {', '.join(FORMATS)}."
        )
    return key


# --------------------------------------------------------------------------- reading
def read_records(path: str | os.PathLike) -> list:
    """Read a JSON list (or a single JSON object) or a JSONL file into raw records."""
    p = Path(path)
    if not p.exists():
        raise RequestFormatError(
            f"request file not found: {p}. Check the path (datasets are read as JSON lists "
            "or JSONL files)."
        )
    if p.is_dir():
        raise RequestFormatError(f"{p} is a directory; pass the JSON/JSONL file inside it.")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RequestFormatError(f"{p} is not UTF-8 text ({exc}). Pass a JSON or JSONL file.") from exc
    except OSError as exc:
        raise RequestFormatError(f"cannot read {p}: {exc.strerror or exc}. Check the path and its permissions.") from exc
    stripped = text.strip()
    if not stripped:
        raise RequestFormatError(f"{p} is empty; it must hold a JSON list or JSONL records.")
    if stripped[0] == "[":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise RequestFormatError(
                f"{p} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}. "
                "Fix the file or re-export it."
            ) from exc
        except RecursionError:
            raise RequestFormatError(f"{p}: JSON nested too deeply to read; a request file is a list of "
                                     "flat records.") from None
        return data
    try:
        data = json.loads(stripped)
    except (json.JSONDecodeError, RecursionError):
        data = None
    else:
        if isinstance(data, dict):
            return [data]
        raise RequestFormatError(
            f"{p} holds a JSON {type(data).__name__}; expected a list of records or JSONL."
        )
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RequestFormatError(
                f"{p}, record #{len(records)} (line {lineno}) is not valid JSON: {exc.msg} at "
                f"column {exc.colno}. Each JSONL line must be one JSON object."
            ) from exc
        except RecursionError:
            raise RequestFormatError(f"{p}, record #{len(records)} (line {lineno}): JSON nested too deeply "
                                     "to read. Each JSONL line must be one flat request object.") from None
    return records


# --------------------------------------------------------------------------- raw helpers
def _missing(where: str, name: str, hint: str = "") -> RequestFormatError:
    return request_error(where, name, "is missing", hint or f"Add '{name}' to the record.")


def _scalar_str(value: Any, where: str, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise request_error(
            where, name, f"must be a string, got {type(value).__name__} ({_short(value)})",
            f"Give '{name}' as a JSON string.",
        )
    return str(value)


def _target(value: Any, where: str, name: str, required: bool) -> str | None:
    """A target given as a string, a CounterFact {'str','id'} dict or a 1-element list."""
    if value is None:
        if required:
            raise _missing(where, name)
        return None
    if isinstance(value, Mapping):
        if "str" not in value:
            raise request_error(
                where, f"{name}.str", "is missing",
                f"Give '{name}' as a string or as {{\"str\": ..., \"id\": ...}}.",
            )
        return _scalar_str(value["str"], where, f"{name}.str")
    if isinstance(value, list):
        if len(value) == 0:
            if required:
                raise request_error(where, name, "is an empty list", f"Give '{name}' as a string.")
            return None
        return _target(value[0], where, f"{name}[0]", required)
    return _scalar_str(value, where, name)


def _str_list(value: Any, where: str, name: str, dropped: dict | None = None) -> list:
    """None -> [], a string -> [string], a list stays (entries checked by EditRequest).

    With ``dropped`` (a dict), blank string entries are removed and their indices are
    recorded under ``dropped[name]`` (real datasets contain a few empty paraphrases);
    paired lists (prompt/answer) are passed without ``dropped`` so blanks stay errors.
    """
    if value is None:
        return []
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [str(value)]
    if isinstance(value, list):
        if dropped is None:
            return list(value)
        blank = [i for i, v in enumerate(value) if isinstance(v, str) and not v.strip()]
        if blank:
            dropped[name] = blank
        return [v for i, v in enumerate(value) if i not in set(blank)]
    raise request_error(
        where, name, f"must be a string or a list of strings, got {type(value).__name__}",
        f"Give '{name}' as a JSON string or list of strings.",
    )


def _short(value: Any, n: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def _template_from_filled(prompt: str, subject: str, where: str, prompt_field: str, subject_field: str) -> str:
    """Turn a prompt with the subject filled in into a template (first occurrence)."""
    prompt = prompt.strip()
    subj = subject.strip()
    if not subj:
        raise request_error(where, subject_field, "is empty", "Give the subject that occurs in the prompt.")
    if "{}" in prompt and subj not in prompt:
        return prompt  # already a template
    idx = prompt.find(subj)
    if idx < 0:
        raise request_error(
            where, subject_field,
            f"{subj!r} does not occur in '{prompt_field}' {prompt!r}",
            f"The subject must appear verbatim (same case and spelling) in '{prompt_field}'; "
            "fix the subject or the prompt, or write the prompt as a template with '{}'.",
        )
    return prompt[:idx] + "{}" + prompt[idx + len(subj):]


def _build(where: str, field_map: Mapping[str, str], **kwargs: Any) -> EditRequest:
    """Construct an EditRequest; re-raise its validation errors with raw field names."""
    try:
        return EditRequest(source=where, **kwargs)
    except RequestFormatError as exc:
        fld = getattr(exc, "field", None)
        if fld is None:
            raise
        base, bracket, rest = fld.partition("[")
        raw = field_map.get(base, base) + (bracket + rest if bracket else "")
        problem, hint = exc.problem, exc.hint  # type: ignore[attr-defined]
        for internal, external in field_map.items():  # speak the file's field names
            pat = re.compile(rf"(?<![\w.]){re.escape(internal)}(?!\w)")
            problem, hint = pat.sub(external, problem), pat.sub(external, hint)
        raise request_error(where, raw, problem, hint) from None


def _meta(record: Mapping[str, Any], used: Iterable[str]) -> dict:
    used = set(used)
    return {k: v for k, v in record.items() if k not in used}


# --------------------------------------------------------------------------- converters
_CF_CASE_LISTS = ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")


def _from_counterfact(record: Mapping[str, Any], where: str, index: int, mquake: bool = False) -> list[EditRequest]:
    if "requested_rewrite" not in record:
        raise _missing(where, "requested_rewrite", "CounterFact/MQuAKE records need 'requested_rewrite'.")
    rr = record["requested_rewrite"]
    case_id = record.get("case_id", index)
    if isinstance(rr, Mapping):
        rewrites, as_list = [rr], False
    elif isinstance(rr, list):
        if not rr:
            raise request_error(where, "requested_rewrite", "is an empty list", "Give at least one rewrite.")
        rewrites, as_list = rr, True
    else:
        raise request_error(
            where, "requested_rewrite", f"must be an object or a list of objects, got {type(rr).__name__}",
            "Give the rewrite as {prompt, subject, target_new, target_true, relation_id}.",
        )
    single = len(rewrites) == 1
    used = {"case_id", "requested_rewrite"}
    case_lists: dict[str, list] = {}
    dropped: dict = {}
    if single and not mquake:
        for name in _CF_CASE_LISTS:
            case_lists[name] = _str_list(record.get(name), where, name, dropped)
            used.add(name)
    meta_common = _meta(record, used)
    if dropped:
        meta_common["dropped_blank"] = dropped
    out = []
    for j, rw in enumerate(rewrites):
        pre = f"requested_rewrite[{j}]" if as_list else "requested_rewrite"
        if not isinstance(rw, Mapping):
            raise request_error(
                where, pre, f"must be an object, got {type(rw).__name__}",
                "Give each rewrite as {prompt, subject, target_new, target_true, relation_id}.",
            )
        for key in ("prompt", "subject"):
            if rw.get(key) is None:
                raise _missing(where, f"{pre}.{key}")
        prompt = _scalar_str(rw["prompt"], where, f"{pre}.prompt")
        subject = _scalar_str(rw["subject"], where, f"{pre}.subject")
        target_new = _target(rw.get("target_new"), where, f"{pre}.target_new", required=True)
        target_true = _target(rw.get("target_true"), where, f"{pre}.target_true", required=False)
        paraphrases = list(case_lists.get("paraphrase_prompts", []))
        if mquake and rw.get("question") is not None:
            paraphrases.append(_scalar_str(rw["question"], where, f"{pre}.question"))
        neighborhood = case_lists.get("neighborhood_prompts", [])
        if neighborhood and target_true is None:
            raise _missing(
                where, f"{pre}.target_true",
                "CounterFact neighborhood_prompts are answered by target_true; give it.",
            )
        attributes = case_lists.get("attribute_prompts", [])
        meta = dict(meta_common)
        extra_rw = {k: v for k, v in rw.items()
                    if k not in ("prompt", "subject", "target_new", "target_true", "relation_id", "question")}
        for key in ("target_new", "target_true"):
            if isinstance(rw.get(key), Mapping) and "id" in rw[key]:
                extra_rw[f"{key}_id"] = rw[key]["id"]
        if extra_rw:
            meta["rewrite"] = extra_rw
        if as_list:
            meta["group_case_id"] = case_id
        field_map = {
            "prompt": f"{pre}.prompt",
            "subject": f"{pre}.subject",
            "target_new": f"{pre}.target_new",
            "target_true": f"{pre}.target_true",
            "relation_id": f"{pre}.relation_id",
            "neighborhood_answers": f"{pre}.target_true",
            "attribute_answers": f"{pre}.target_new",
            "paraphrase_prompts": "paraphrase_prompts" if not mquake else f"{pre}.question",
        }
        out.append(_build(
            where, field_map,
            prompt=prompt,
            subject=subject,
            target_new=target_new,
            target_true=target_true,
            paraphrase_prompts=paraphrases,
            neighborhood_prompts=neighborhood,
            neighborhood_answers=[target_true] * len(neighborhood),
            attribute_prompts=attributes,
            attribute_answers=[target_new] * len(attributes),
            generation_prompts=case_lists.get("generation_prompts", []),
            case_id=f"{case_id}:{j}" if as_list else case_id,
            relation_id=rw.get("relation_id"),
            meta=meta,
        ))
    return out


def _from_mquake(record: Mapping[str, Any], where: str, index: int) -> list[EditRequest]:
    return _from_counterfact(record, where, index, mquake=True)


def _from_easyedit(record: Mapping[str, Any], where: str, index: int) -> list[EditRequest]:
    for key in ("prompt", "subject"):
        if record.get(key) is None:
            raise _missing(where, key, "EasyEdit records need 'prompt' (subject filled in) and 'subject'.")
    prompt = _scalar_str(record["prompt"], where, "prompt")
    subject = _scalar_str(record["subject"], where, "subject")
    template = _template_from_filled(prompt, subject, where, "prompt", "subject")
    target_new = _target(record.get("target_new"), where, "target_new", required=True)
    true_key = "ground_truth" if record.get("ground_truth") is not None else "target_true"
    target_true = _target(record.get(true_key), where, true_key, required=False)
    dropped: dict = {}
    paraphrases = _str_list(record.get("rephrase_prompt"), where, "rephrase_prompt", dropped)
    rephrased_subjects = _str_list(record.get("subject_rephrase"), where, "subject_rephrase", dropped)
    loc_prompts = _str_list(record.get("locality_prompt"), where, "locality_prompt")
    loc_answers = _str_list(record.get("locality_ground_truth"), where, "locality_ground_truth")
    answers_field = "locality_ground_truth"
    if loc_prompts and not loc_answers:
        raise _missing(where, "locality_ground_truth", "Give the answer(s) to 'locality_prompt'.")
    if len(loc_answers) == 1 and len(loc_prompts) > 1:
        loc_answers = loc_answers * len(loc_prompts)
    used = {"case_id", "prompt", "subject", "target_new", true_key, "rephrase_prompt",
            "locality_prompt", "locality_ground_truth", "subject_rephrase"}
    nested = record.get("locality")
    if isinstance(nested, Mapping):
        used.add("locality")
        if len(loc_prompts) != len(loc_answers):
            raise request_error(
                where, "locality_ground_truth",
                f"has {len(loc_answers)} answers for {len(loc_prompts)} locality_prompt entries",
                "Give one answer per locality prompt, or a single answer for all of them.",
            )
        for name, group in nested.items():
            fld = f"locality.{name}"
            if not isinstance(group, Mapping):
                raise request_error(where, fld, "must be an object with 'prompt' and 'ground_truth'", "")
            ps = _str_list(group.get("prompt"), where, f"{fld}.prompt")
            gs = _str_list(group.get("ground_truth"), where, f"{fld}.ground_truth")
            gs = [g[0] if isinstance(g, list) and g else g for g in gs]
            if len(gs) == 1 and len(ps) > 1:
                gs = gs * len(ps)
            if len(ps) != len(gs):
                raise request_error(
                    where, f"{fld}.ground_truth", f"has {len(gs)} answers for {len(ps)} prompts",
                    "Give one ground_truth per prompt, or a single one for all of them.",
                )
            loc_prompts += ps
            loc_answers += gs
        answers_field = "locality"
    field_map = {
        "prompt": "prompt",
        "target_true": true_key,
        "paraphrase_prompts": "rephrase_prompt",
        "neighborhood_prompts": "locality_prompt",
        "neighborhood_answers": answers_field,
        "subject_rephrases": "subject_rephrase",
    }
    return [_build(
        where, field_map,
        prompt=template,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=loc_prompts,
        neighborhood_answers=loc_answers,
        subject_rephrases=rephrased_subjects,
        case_id=record.get("case_id", index),
        relation_id=record.get("relation_id"),
        meta=_meta(record, used | {"relation_id"}) | ({"dropped_blank": dropped} if dropped else {}),
    )]


def _from_zsre(record: Mapping[str, Any], where: str, index: int) -> list[EditRequest]:
    for key in ("src", "subject"):
        if record.get(key) is None:
            raise _missing(where, key, "zsRE (MEND) records need 'src' (the question) and 'subject'.")
    src = _scalar_str(record["src"], where, "src")
    subject = _scalar_str(record["subject"], where, "subject")
    template = _template_from_filled(src, subject, where, "src", "subject")
    target_new = _target(record.get("alt"), where, "alt", required=True)
    answers = record.get("answers")
    if answers is not None and not isinstance(answers, list):
        answers = [answers]
    target_true = _target(answers, where, "answers", required=False)
    loc = _str_list(record.get("loc"), where, "loc")
    loc_ans = _str_list(record.get("loc_ans"), where, "loc_ans")
    if loc and not loc_ans:
        raise _missing(where, "loc_ans", "Give the answer to 'loc'.")
    dropped: dict = {}
    rephrase = _str_list(record.get("rephrase"), where, "rephrase", dropped)
    used = {"src", "subject", "alt", "rephrase", "loc", "loc_ans", "case_id"}
    meta = _meta(record, used)
    if dropped:
        meta["dropped_blank"] = dropped
    field_map = {
        "prompt": "src",
        "target_new": "alt",
        "target_true": "answers",
        "paraphrase_prompts": "rephrase",
        "neighborhood_prompts": "loc",
        "neighborhood_answers": "loc_ans",
    }
    return [_build(
        where, field_map,
        prompt=template,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=rephrase,
        neighborhood_prompts=loc,
        neighborhood_answers=loc_ans,
        case_id=record.get("case_id", index),
        meta=meta,
    )]


def _from_superedit(record: Mapping[str, Any], where: str, index: int) -> list[EditRequest]:
    if not isinstance(record, Mapping):
        raise request_error(where, "<record>", f"must be a JSON object, got {type(record).__name__}", "")
    try:
        req = EditRequest.from_dict(record, source=where)
    except RequestFormatError as exc:
        if getattr(exc, "field", None) is None:
            raise
        raise request_error(where, exc.field, exc.problem, exc.hint) from None  # type: ignore[attr-defined]
    stored = record.get("source")
    if stored:  # keep the original provenance (e.g. "counterfact.json#12")
        req = dataclasses.replace(req, source=str(stored))
    return [req]


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], str, int], list[EditRequest]]] = {
    "counterfact": _from_counterfact,
    "mquake": _from_mquake,
    "easyedit": _from_easyedit,
    "zsre": _from_zsre,
    "superedit": _from_superedit,
}


# --------------------------------------------------------------------------- public API
def load_requests(
    path: str | os.PathLike,
    fmt: str = "auto",
    limit: int | None = None,
    *,
    skip_invalid: bool = False,
) -> list[EditRequest]:
    """Load edit requests from a dataset file (JSON list or JSONL), unchanged on disk.

    Args:
        path: the dataset file.
        fmt: ``"auto"`` (detect from the first record's keys) or one of :data:`FORMATS`
            (aliases: ``mend``/``zsre-mend`` -> zsre, ``jsonl`` -> superedit, ``cf``).
        limit: keep only the first ``limit`` requests (a record with several rewrites
            yields several requests). ``None`` keeps all.
        skip_invalid: log and skip records that fail validation instead of raising.

    Each request's ``source`` is ``"<path>#<record index>"`` (0-based), except for the
    ``superedit`` format, which keeps the stored provenance.

    Raises:
        RequestFormatError: missing/unreadable file, unknown format, or a bad record (the
            message names the file, the record index and the field).
    """
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise RequestFormatError(f"limit must be a non-negative integer or None, got {limit!r}.")
    key = _normalise_fmt(fmt)
    records = read_records(path)
    name = str(path)
    if not isinstance(records, list):
        raise RequestFormatError(f"{name} must hold a JSON list of records or JSONL.")
    if not records:
        raise RequestFormatError(f"{name} holds no records; it must list at least one request.")
    if key == "auto":
        key = detect_format(records[0], f"{name}#0")
    convert = _CONVERTERS[key]
    out: list[EditRequest] = []
    skipped = 0
    for i, record in enumerate(records):
        if limit is not None and len(out) >= limit:
            break
        where = f"{name}#{i}"
        try:
            if not isinstance(record, Mapping):
                raise request_error(
                    where, "<record>", f"must be a JSON object, got {type(record).__name__}",
                    "Each list element / JSONL line must be one request object.",
                )
            out.extend(convert(record, where, i))
        except RequestFormatError as exc:
            if not skip_invalid:
                raise
            skipped += 1
            from superedit.utils.logs import get_logger

            get_logger(__name__).warning("skipping invalid record: %s", exc)
    if skipped:
        from superedit.utils.logs import get_logger

        get_logger(__name__).warning("%s: skipped %d invalid record(s) of %d", name, skipped, len(records))
    if limit is not None:
        out = out[:limit]
    return out


def save_requests_jsonl(path: str | os.PathLike, requests: Iterable[EditRequest]) -> None:
    """Write requests atomically as JSONL, one :meth:`EditRequest.to_dict` per line
    (readable back with ``load_requests(path)``; format ``superedit``)."""
    from superedit.utils.io import write_jsonl_atomic

    rows = []
    for i, req in enumerate(requests):
        if not isinstance(req, EditRequest):
            raise TypeError(f"save_requests_jsonl: item {i} is a {type(req).__name__}, not an EditRequest")
        rows.append(req.to_dict())
    write_jsonl_atomic(path, rows)
