"""The offline default corpus: text sampled from the model itself.

ROME and MEMIT estimate C = E[k kᵀ] on Wikipedia (wikitext / 100k documents). Without hub access a
model's own samples stand in: seeded ancestral sampling (``top_k``, ``temperature``) continuing short
neutral openers (:data:`OPENERS`, cycled), ``n_docs`` documents of ``doc_tokens`` new tokens each.
The keys such text induces follow the model's own distribution of contexts, which is what C is
for (the keys the edit must not disturb). ``docs/results/real-model.md`` compares it with another
corpus on the same edits.

Each batch of documents is sampled under its own seed (``seed + batch index``), so a long sampling run
resumes after an interruption with the same text. For a converted pretrained model whose corpus ships with superedit (``stats/corpora/``; matched by the
GGUF file's sha256 and the settings) the shipped copy is used instead of sampling. The documents are cached as JSONL under ``$SUPEREDIT_HOME/corpora`` keyed by the model's identity
(source, revision) and every sampling setting, so a changed model or setting samples anew, and the
resulting :class:`~superedit.stats.corpus.Corpus` fingerprint (hence every covariance cache key)
follows the text.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import StatsError
from ..utils.logs import get_logger
from .corpus import Corpus

log = get_logger(__name__)

#: neutral openers; every document continues one of them (cycled in order)
OPENERS = ("The", "In", "A", "It", "This", "When", "There", "He", "She", "They", "We", "After", "According to",
           "One", "Many", "For", "On", "Although", "During", "If")


@dataclass(frozen=True)
class SamplingSettings:
    n_docs: int = 256  #: documents
    doc_tokens: int = 128  #: new tokens per document (≈ n_docs · doc_tokens corpus tokens)
    top_k: int = 50
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 64

    def validate(self) -> None:
        for name in ("n_docs", "doc_tokens", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise StatsError(f"model-sampled corpus: {name} must be ≥ 1 (got {getattr(self, name)})")
        if not self.temperature > 0:
            raise StatsError(f"model-sampled corpus: temperature must be > 0 (got {self.temperature})")


def _cache_file(adapter, settings: SamplingSettings) -> Path:
    home = Path(os.environ.get("SUPEREDIT_HOME") or Path.home() / ".cache" / "superedit")
    key = json.dumps({"source": adapter.source, "revision": adapter.revision, "openers": OPENERS,
                      **asdict(settings)}, sort_keys=True)
    return home / "corpora" / f"sampled-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"


@torch.no_grad()
def sample_documents(adapter, settings: SamplingSettings, partial: Path | None = None) -> list[str]:
    """``n_docs`` seeded samples of the model; the RNG state outside is left as it was.

    Batch ``b`` is sampled under seed ``settings.seed + b``, so batches do not depend on each other:
    with ``partial`` (a JSONL file) every finished batch is appended there, and an interrupted run
    resumes at the first missing batch with the same result as an uninterrupted one."""
    from ..utils.io import append_jsonl, read_jsonl
    from ..utils.progress import progress

    settings.validate()
    tok = adapter.tokenizer
    done: dict[int, list[str]] = {}
    if partial is not None and partial.is_file():
        for row in read_jsonl(partial):
            done[int(row["batch"])] = list(row["texts"])
    starts = list(range(0, settings.n_docs, settings.batch_size))
    old_side = tok.padding_side
    devices = [adapter.device] if adapter.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        tok.padding_side = "left"
        try:
            for b, start in enumerate(progress(starts, desc="sampling corpus")):
                if b in done:
                    continue
                torch.manual_seed(settings.seed + b)
                n = min(settings.batch_size, settings.n_docs - start)
                openers = [OPENERS[(start + i) % len(OPENERS)] for i in range(n)]
                enc = tok(openers, return_tensors="pt", padding=True).to(adapter.device)
                out = adapter.model.generate(**enc, do_sample=True, top_k=settings.top_k,
                                             temperature=settings.temperature, max_new_tokens=settings.doc_tokens,
                                             min_new_tokens=settings.doc_tokens, eos_token_id=None,
                                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                             else tok.eos_token_id)
                done[b] = [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
                if partial is not None:
                    append_jsonl(partial, {"batch": b, "texts": done[b]})
                log.info("sampled corpus batch %d/%d", b + 1, len(starts))
        finally:
            tok.padding_side = old_side
    return [t for b in range(len(starts)) for t in done[b]]


SHIPPED = Path(__file__).parent / "corpora"


def shipped_corpus(adapter, settings: SamplingSettings) -> Path | None:
    """A corpus shipped with superedit for this model and these settings, else None.

    A shipped corpus (``stats/corpora/*.json`` + its JSONL) is what :func:`sample_documents` produced for a
    converted pretrained model, recorded with the GGUF file's sha256 (from the model's provenance file)
    and the sampling settings; it is used only when both match and its own sha256 checks out."""
    from ..models.pretrained import read_provenance
    from .corpus import _model_dir

    prov = read_provenance(_model_dir(adapter))
    if not prov or not SHIPPED.is_dir():
        return None
    for meta_file in sorted(SHIPPED.glob("*.json")):
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("model_gguf_sha256") == prov.get("gguf_sha256") and meta.get("settings") == asdict(settings):
            path = SHIPPED / meta["file"]
            if hashlib.sha256(path.read_bytes()).hexdigest() != meta.get("sha256"):
                log.warning("shipped corpus %s does not match its recorded sha256; sampling instead", path)
                return None
            return path
    return None


def sampled_corpus(adapter, settings: SamplingSettings | None = None) -> Corpus:
    """The model-sampled corpus: from the cache, else a shipped copy (:func:`shipped_corpus`), else sampled
    once and cached (atomic write)."""
    import shutil

    from ..utils.io import write_jsonl_atomic

    settings = settings or SamplingSettings()
    path = _cache_file(adapter, settings)
    if path.is_file():
        return Corpus.from_path(path)
    shipped = shipped_corpus(adapter, settings)
    if shipped is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shipped, path)
        log.info("model-sampled corpus: the copy shipped with superedit (%s)", shipped.name)
        return Corpus.from_path(path)
    log.info("sampling a %d-document corpus from %s for key statistics (cached in %s)", settings.n_docs,
             adapter.source, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.jsonl")
    docs = sample_documents(adapter, settings, partial)
    write_jsonl_atomic(path, [{"text": d} for d in docs])
    partial.unlink(missing_ok=True)
    return Corpus.from_path(path)
