"""Text corpora for key statistics.

A :class:`Corpus` is an ordered list of documents (non-empty strings). Sources:

* an in-memory list of strings (:meth:`Corpus.from_texts`);
* a ``.txt`` file: documents are **paragraphs separated by one or more blank lines** (newlines inside
  a paragraph are kept). If the file contains no blank line at all, **every non-empty line is a
  document** (the common "one document per line" format);
* a ``.jsonl`` file: one JSON object per line, the document is its ``field`` (default ``"text"``);
  a line that is a bare JSON string is used as is; blank lines are skipped;
* a ``.json`` file: a list of such objects/strings, or an object holding such a list under
  ``field + "s"``/``"data"``/``"texts"``;
* a directory: all ``.txt``/``.jsonl``/``.json`` files below it, in sorted relative-path order.

Each document is stripped of surrounding whitespace; empty documents are dropped. The
:meth:`~Corpus.fingerprint` is the sha256 of the documents actually used, in order (length-prefixed,
so document boundaries count), so any change of the text, the order, the field or the split rule
changes every statistics cache key that depends on it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import StatsError
from ..utils.logs import get_logger

log = get_logger(__name__)

SUFFIXES = (".txt", ".jsonl", ".json")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


class Corpus:
    """An ordered, non-empty list of documents with a content fingerprint."""

    def __init__(self, texts: Sequence[str], source: str = "<memory>"):
        docs = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise StatsError(f"corpus {source}: document {i} is a {type(t).__name__}, expected a string")
            t = t.strip()
            if t:
                docs.append(t)
        if not docs:
            raise StatsError(f"corpus {source} is empty: it contains no non-blank document. "
                             "Pass a .txt/.jsonl/.json file or directory with text in it.")
        self.texts: list[str] = docs
        self.source = source
        self._fingerprint: str | None = None

    # ----- constructors --------------------------------------------------------------------
    @classmethod
    def from_texts(cls, texts: Sequence[str], source: str = "<memory>") -> "Corpus":
        return cls(list(texts), source=source)

    @classmethod
    def from_path(cls, path: str | Path, field: str = "text") -> "Corpus":
        p = Path(path).expanduser()
        if not p.exists():
            raise StatsError(f"corpus path {str(path)!r} does not exist; pass a .txt/.jsonl/.json file or a directory of them")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not files:
                raise StatsError(f"corpus directory {str(p)!r} contains no {'/'.join(SUFFIXES)} file")
            texts: list[str] = []
            for f in files:
                texts.extend(_read_file(f, field))
        else:
            texts = _read_file(p, field)
        return cls(texts, source=str(p))

    @classmethod
    def coerce(cls, corpus: "Corpus | str | Path | Sequence[str]", field: str = "text") -> "Corpus":
        """A Corpus from a Corpus, a path, or a list of strings."""
        if isinstance(corpus, Corpus):
            return corpus
        if isinstance(corpus, (str, Path)):
            return cls.from_path(corpus, field=field)
        if corpus is None:
            raise StatsError("no corpus given; pass --corpus PATH (a .txt/.jsonl/.json file or a directory)")
        return cls.from_texts(list(corpus))

    # ----- content -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.texts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.texts)

    def __getitem__(self, i):
        return self.texts[i]

    def fingerprint(self) -> str:
        """sha256 hex of the documents in order (each length-prefixed)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for t in self.texts:
                b = t.encode("utf-8")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Corpus({self.source!r}, {len(self.texts)} documents, sha256={self.fingerprint()[:12]})"


def split_txt(text: str) -> list[str]:
    """The .txt rule: blank-line separated paragraphs, or one document per line if there is no blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    stripped = text.strip("\n")
    if _BLANK_LINE.search(stripped):
        return [p.strip() for p in _BLANK_LINE.split(stripped) if p.strip()]
    return [line.strip() for line in stripped.split("\n") if line.strip()]


def _from_record(rec, field: str, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict):
        if field not in rec:
            raise StatsError(f"{where}: record has no field {field!r} (fields: {sorted(rec)[:10]}); "
                             f"choose the text field with --text-field")
        value = rec[field]
        if not isinstance(value, str):
            raise StatsError(f"{where}: field {field!r} is a {type(value).__name__}, expected a string")
        return value
    raise StatsError(f"{where}: expected an object with a {field!r} field or a string, got {type(rec).__name__}")


def _read_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise StatsError(f"corpus file {str(path)!r} is not UTF-8 text: {exc}") from exc
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StatsError(f"corpus file {str(path)!r} line {i + 1} is not valid JSON: {exc}") from exc
            out.append(_from_record(rec, field, f"corpus file {str(path)!r} line {i + 1}"))
        return out
    if suffix == ".json":
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StatsError(f"corpus file {str(path)!r} is not valid JSON: {exc}") from exc
        if isinstance(obj, dict):
            for k in (field + "s", "data", "texts"):
                if isinstance(obj.get(k), list):
                    obj = obj[k]
                    break
            else:
                raise StatsError(f"corpus file {str(path)!r}: expected a JSON list of records (or an object with a "
                                 f"{field + 's'!r}/'data'/'texts' list)")
        if not isinstance(obj, list):
            raise StatsError(f"corpus file {str(path)!r}: expected a JSON list, got {type(obj).__name__}")
        return [_from_record(r, field, f"corpus file {str(path)!r} item {i}") for i, r in enumerate(obj)]
    return split_txt(raw)


# ----- the default corpus of a model ------------------------------------------------------------
def _model_dir(adapter_or_model_dir) -> Path | None:
    if isinstance(adapter_or_model_dir, (str, Path)):
        spec = str(adapter_or_model_dir)
        candidates = [spec]
    else:
        spec = str(getattr(adapter_or_model_dir, "source", ""))
        cfg = getattr(getattr(adapter_or_model_dir, "model", None), "config", None)
        candidates = [spec, str(getattr(cfg, "_name_or_path", "") or "")]
    for c in candidates:
        if not c:
            continue
        if c == "builtin" or c.startswith("builtin:"):
            from ..models.loading import resolve_model_path

            return Path(resolve_model_path(c)[0])
        p = Path(c).expanduser()
        if p.is_dir():
            return p
    return None


def corpus_for_model(adapter_or_model_dir) -> Corpus:
    """The default statistics corpus of a model.

    A testbed model (its directory has a ``testbed.json``) uses its own training corpus
    (``superedit.testbed.access.testbed_corpus``). Any other model, given as a loaded adapter, uses
    text sampled from the model itself (:func:`superedit.stats.sampled.sampled_corpus`: seeded,
    cached by model identity and sampling settings) — the offline default; pass ``--corpus`` (a
    .txt/.jsonl/.json file or directory, e.g. wikitext) to use real text instead.
    """
    model_dir = _model_dir(adapter_or_model_dir)
    if model_dir is None or not (model_dir / "testbed.json").exists():
        if hasattr(adapter_or_model_dir, "model") and hasattr(adapter_or_model_dir, "tokenizer"):
            from .sampled import sampled_corpus

            return sampled_corpus(adapter_or_model_dir)
        name = model_dir or getattr(adapter_or_model_dir, "source", adapter_or_model_dir)
        raise StatsError(f"--corpus is required for {name}: it is not a testbed model and no loaded model was "
                         "given to sample a corpus from; pass a .txt/.jsonl/.json file or a directory of them")
    from ..testbed.access import testbed_corpus

    return Corpus(list(testbed_corpus(model_dir)), source=f"testbed:{model_dir}")


def resolve_corpus(adapter, corpus: "Corpus | str | Path | Sequence[str] | None" = None,
                   field: str = "text") -> Corpus:
    """``corpus`` (a :class:`Corpus`, a file/directory path — JSON records read at ``field`` — or a list
    of texts) when given, else the model's default (:func:`corpus_for_model`)."""
    return Corpus.coerce(corpus, field=field) if corpus else corpus_for_model(adapter)
