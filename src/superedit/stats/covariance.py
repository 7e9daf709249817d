"""Key covariance C = E[k kᵀ] (uncentered second moment of the MLP down-projection input).

Used by ROME/MEMIT/AlphaEdit (the ``C`` in the closed-form solves) and by superposition analyses.

Token selection: documents are taken in corpus order, each tokenized with the model's tokenizer
(special tokens as the tokenizer adds them, e.g. Llama's BOS) and truncated to ``max_length`` tokens;
documents are taken until ``n_tokens`` tokens are reached, the last one cut to make the count exact.
If the corpus is smaller, every token is used and ``count < n_tokens`` (a warning is logged).

Computation: sequences are packed into batches of about ``batch_tokens`` tokens (right padding,
explicit position ids), one forward pass per batch reads the keys of *all* requested layers and stops
right after the deepest one (``Trace(stop_after=True)``). Only non-pad tokens are accumulated, in
float64 on the model's device: ``mom2 = Σ k kᵀ / count`` and ``mean = Σ k / count``.

Caching: each layer's result is a safetensors file ``<cache_dir>/<StatsKey.digest()>.safetensors``
(default cache_dir ``$SUPEREDIT_HOME/stats``, SUPEREDIT_HOME defaults to ``~/.cache/superedit``).
The key holds the model identity (source, revision, config hash, family, weight dtype, tokenizer
hash), layer, site, corpus fingerprint, n_tokens, max_length and the accumulation dtype, so a change
of any of them never reuses an old matrix. ``batch_tokens`` and padding are not part of the key: they
do not change the result (beyond float rounding of the forward pass).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import StatsError
from ..models.adapter import ModelAdapter
from ..models.hooks import Trace
from ..utils.io import atomic_path, write_json_atomic
from ..utils.logs import get_logger
from ..utils.progress import progress
from .corpus import Corpus

log = get_logger(__name__)

FORMAT = "superedit.key_covariance"
FORMAT_VERSION = 1
ACC_DTYPE = "float64"
_POOL_BATCHES = 16  # sequences of this many batches are sorted by length together to reduce padding


def default_cache_dir() -> Path:
    home = os.environ.get("SUPEREDIT_HOME") or "~/.cache/superedit"
    return Path(home).expanduser() / "stats"


def tokenizer_hash(tokenizer) -> str:
    """A fingerprint of the tokenizer (its full serialized state when it is a fast tokenizer)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # call-time settings, mutated by tokenizer(..., truncation=True)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    else:  # pragma: no cover - superedit requires fast tokenizers
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token], default=str).encode())
    return h.hexdigest()[:16]


# ----- the cache key -------------------------------------------------------------------------
@dataclass(frozen=True)
class StatsKey:
    """Everything that determines one layer's covariance; ``digest()`` names its cache file."""

    source: str
    revision: str
    config_hash: str
    family: str
    model_dtype: str
    tokenizer_hash: str
    layer: int
    site: str
    corpus: str  #: corpus fingerprint (sha256 of the documents used)
    n_tokens: int  #: requested token budget
    max_length: int
    dtype: str = ACC_DTYPE  #: accumulation dtype
    version: int = FORMAT_VERSION

    @classmethod
    def for_layer(cls, adapter: ModelAdapter, layer: int, corpus: Corpus, n_tokens: int, max_length: int,
                  site: str = "key", tok_hash: str | None = None) -> "StatsKey":
        ident = adapter.identity()
        return cls(source=ident["source"], revision=ident["revision"], config_hash=ident["config_hash"],
                   family=ident["family"], model_dtype=str(adapter.dtype).replace("torch.", ""),
                   tokenizer_hash=tok_hash or tokenizer_hash(adapter.tokenizer), layer=int(layer), site=site,
                   corpus=corpus.fingerprint(), n_tokens=int(n_tokens), max_length=int(max_length))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StatsKey":
        names = {f.name for f in fields(cls)}
        missing = names - set(d) - {"dtype", "version"}
        if missing:
            raise StatsError(f"statistics key is missing fields {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def digest(self) -> str:
        """Stable hash of all fields (sorted JSON → sha256, 32 hex chars)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def filename(self) -> str:
        return f"{self.digest()}.safetensors"


# ----- one layer's result -------------------------------------------------------------------
class KeyCovariance:
    """C = E[k kᵀ] of one layer: ``mom2`` (d×d float64), ``mean`` (d, float64), ``count`` tokens.

    ``path`` is the cache file it was saved to/loaded from (if any); ``cache_hit`` says whether it
    came from the cache.
    """

    def __init__(self, key: StatsKey, mom2: torch.Tensor, mean: torch.Tensor, count: int,
                 path: Path | None = None, cache_hit: bool = False):
        if mom2.dim() != 2 or mom2.shape[0] != mom2.shape[1] or mean.shape != (mom2.shape[0],):
            raise StatsError(f"inconsistent covariance shapes: mom2 {tuple(mom2.shape)}, mean {tuple(mean.shape)}")
        self.key = key
        self.mom2 = mom2
        self.mean = mean
        self.count = int(count)
        self.path = Path(path) if path is not None else None
        self.cache_hit = cache_hit

    @property
    def layer(self) -> int:
        return self.key.layer

    @property
    def dim(self) -> int:
        return self.mom2.shape[0]

    def matrix(self, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """C on ``device`` in ``dtype`` (default: where it is, float64)."""
        return self.mom2.to(device=device if device is not None else self.mom2.device, dtype=dtype or self.mom2.dtype)

    def trace(self) -> float:
        return float(torch.trace(self.mom2))

    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of C (ascending, float64, on CPU)."""
        return torch.linalg.eigvalsh(self.mom2.detach().to("cpu", torch.float64))

    def condition_number(self) -> float:
        """λ_max / λ_min of C; ``inf`` when C is singular (e.g. fewer tokens than dimensions)."""
        ev = self.eigenvalues()
        lo, hi = float(ev[0]), float(ev[-1])
        if hi <= 0 or lo <= hi * self.dim * torch.finfo(torch.float64).eps:
            return math.inf
        return hi / lo

    # ----- persistence -----------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/<digest>.safetensors`` (tensors + JSON metadata in the header), atomically.

        A human-readable ``<digest>.json`` sidecar is written next to it (not needed to load).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        path = directory / self.key.filename()
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "key": json.dumps(self.key.to_dict()),
                "digest": self.key.digest(), "count": str(self.count)}
        tensors = {"mom2": self.mom2.detach().to("cpu", torch.float64).contiguous(),
                   "mean": self.mean.detach().to("cpu", torch.float64).contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        write_json_atomic(path.with_suffix(".json"), {**self.key.to_dict(), "digest": self.key.digest(),
                                                      "count": self.count, "dim": self.dim, "trace": self.trace()})
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, device=None) -> "KeyCovariance":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise StatsError(f"covariance file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise StatsError(f"{str(path)!r} is not a superedit key covariance file")
                mom2, mean = fh.get_tensor("mom2"), fh.get_tensor("mean")
            key = StatsKey.from_dict(json.loads(meta["key"]))
            count = int(meta["count"])
        except StatsError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt/unreadable file → user-facing error
            raise StatsError(f"cannot read covariance file {str(path)!r}: {exc}") from exc
        if device is not None:
            mom2, mean = mom2.to(device), mean.to(device)
        return cls(key, mom2, mean, count, path=path, cache_hit=True)

    def __repr__(self) -> str:
        return f"KeyCovariance(layer={self.layer}, dim={self.dim}, count={self.count}, digest={self.key.digest()[:12]})"


# ----- tokens and batches ---------------------------------------------------------------------
def token_sequences(tokenizer, corpus: Corpus, n_tokens: int, max_length: int, chunk: int = 256) -> Iterator[list[int]]:
    """Token id lists in corpus order, each ≤ max_length, totalling min(n_tokens, corpus tokens)."""
    remaining = n_tokens
    texts = corpus.texts
    for start in range(0, len(texts), chunk):
        enc = tokenizer(texts[start:start + chunk], truncation=True, max_length=max_length, add_special_tokens=True)
        for ids in enc["input_ids"]:
            ids = list(ids)[:remaining]
            if not ids:
                continue
            remaining -= len(ids)
            yield ids
            if remaining <= 0:
                return


def pack_batches(seqs: Iterable[list[int]], batch_tokens: int) -> Iterator[list[list[int]]]:
    """Group sequences into batches whose padded size rows × longest stays ≤ batch_tokens.

    Sequences are sorted by length (longest first) within pools of a few batches, so padding is small
    while memory stays bounded. A sequence longer than batch_tokens gets a batch of its own.
    """
    pool: list[list[int]] = []
    pool_tokens = 0
    limit = _POOL_BATCHES * batch_tokens

    def flush(pool):
        batch, longest = [], 0
        for s in sorted(pool, key=len, reverse=True):
            longest_new = max(longest, len(s))
            if batch and longest_new * (len(batch) + 1) > batch_tokens:
                yield batch
                batch, longest_new = [], len(s)
            batch.append(s)
            longest = longest_new
        if batch:
            yield batch

    for s in seqs:
        pool.append(s)
        pool_tokens += len(s)
        if pool_tokens >= limit:
            yield from flush(pool)
            pool, pool_tokens = [], 0
    if pool:
        yield from flush(pool)


def batch_tensors(batch: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right", device=None):
    """(input_ids, attention_mask, position_ids) for a list of id lists."""
    longest = max(len(s) for s in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, s in enumerate(batch):
        if padding_side == "right":
            ids[i, :len(s)] = torch.as_tensor(s)
            mask[i, :len(s)] = 1
        else:
            ids[i, longest - len(s):] = torch.as_tensor(s)
            mask[i, longest - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


# ----- collection ------------------------------------------------------------------------------
def _check_args(adapter: ModelAdapter, layers, n_tokens: int, max_length: int, batch_tokens: int) -> list[int]:
    if isinstance(layers, int):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise StatsError("no layers requested")
    n = adapter.n_layers
    bad = [l for l in layers if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < n]
    if bad:
        raise StatsError(f"layer(s) {bad} out of range: this model has layers 0..{n - 1}")
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise StatsError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if not isinstance(max_length, int) or max_length <= 0:
        raise StatsError(f"max_length must be a positive integer, got {max_length!r}")
    if not isinstance(batch_tokens, int) or batch_tokens <= 0:
        raise StatsError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
    n_pos = getattr(adapter.config, "n_positions", None)  # learned absolute positions (gpt2-style)
    if n_pos is not None and max_length > int(n_pos):
        raise StatsError(f"max_length {max_length} exceeds the model's {n_pos} positions; pass --max-length ≤ {n_pos}")
    return sorted(set(layers))


class _Accumulator:
    """Σ k kᵀ and Σ k over the non-pad tokens of each layer, float64 on the model's device."""

    def __init__(self, layers: list[int], dim: int, device):
        self.mom2 = {l: torch.zeros(dim, dim, dtype=torch.float64, device=device) for l in layers}
        self.sum = {l: torch.zeros(dim, dtype=torch.float64, device=device) for l in layers}
        self.count = 0
        self.mask: torch.Tensor | None = None  # bool (batch, seq) of the current batch

    def observer(self, layer: int):
        def fn(t: torch.Tensor) -> torch.Tensor:
            k = t[self.mask].to(torch.float64)  # (n_real, d); pad rows never enter
            self.mom2[layer].addmm_(k.T, k)
            self.sum[layer].add_(k.sum(0))
            return t

        return fn


def _run(adapter: ModelAdapter, layers: list[int], corpus: Corpus, n_tokens: int, max_length: int,
         batch_tokens: int, early_exit: bool, padding_side: str = "right") -> tuple[dict, dict, int]:
    """One sweep over the token budget; keys of ``layers`` accumulated. Returns (mom2 sums, sums, count)."""
    model, tok = adapter.model, adapter.tokenizer
    device = adapter.device
    acc = _Accumulator(layers, adapter.d_mlp, device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    bar = progress(total=n_tokens, desc=f"key stats L{','.join(map(str, layers))}", unit="tok")
    try:
        with torch.no_grad():
            for batch in pack_batches(token_sequences(tok, corpus, n_tokens, max_length), batch_tokens):
                ids, mask, pos = batch_tensors(batch, pad_id, padding_side, device)
                acc.mask = mask.bool()
                edits = {("key", l): acc.observer(l) for l in layers}
                with Trace(adapter, edits=edits, stop_after=early_exit):
                    model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                n = int(acc.mask.sum())
                acc.count += n
                bar.update(n)
    finally:
        bar.close()
        if was_training:
            model.train()
    return acc.mom2, acc.sum, acc.count


def _finish(keys: dict[int, StatsKey], mom2: dict, sums: dict, count: int, corpus: Corpus, n_tokens: int):
    if count == 0:
        raise StatsError(f"corpus {corpus.source} produced no tokens")
    if count < n_tokens:
        log.warning("corpus %s has only %d tokens (requested %d); using all of them", corpus.source, count, n_tokens)
    return {l: KeyCovariance(keys[l], mom2[l] / count, sums[l] / count, count) for l in keys}


def collect_covariances(adapter: ModelAdapter, layers: Iterable[int] | int, corpus, n_tokens: int,
                        max_length: int = 128, batch_tokens: int = 4096, cache_dir: str | Path | None = None,
                        recompute: bool = False, *, use_cache: bool = True,
                        padding_side: str = "right") -> dict[int, KeyCovariance]:
    """C = E[k kᵀ] for every layer in ``layers``: cached ones are loaded, the rest computed in one pass.

    Args:
        adapter: the model.
        layers: layer indices (or one int).
        corpus: a :class:`Corpus`, a path (file or directory) or a list of strings.
        n_tokens: token budget (count actually used may be smaller for a small corpus).
        max_length: documents are truncated to this many tokens.
        batch_tokens: about this many (padded) tokens per forward pass.
        cache_dir: cache directory (default ``$SUPEREDIT_HOME/stats``).
        recompute: ignore cached files (they are overwritten).
        use_cache: False → neither read nor write the cache.
        padding_side: "right" (default) or "left"; does not change the result.
    """
    layers = _check_args(adapter, layers, n_tokens, max_length, batch_tokens)
    if padding_side not in ("left", "right"):
        raise StatsError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    corpus = Corpus.coerce(corpus)
    tok_hash = tokenizer_hash(adapter.tokenizer)
    keys = {l: StatsKey.for_layer(adapter, l, corpus, n_tokens, max_length, tok_hash=tok_hash) for l in layers}
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out: dict[int, KeyCovariance] = {}
    if use_cache and not recompute:
        for l in layers:
            path = cache / keys[l].filename()
            if not path.exists():
                continue
            try:
                cov = KeyCovariance.load(path, device=adapter.device)
            except StatsError as exc:
                log.warning("ignoring unreadable cache file %s: %s", path, exc)
                continue
            if cov.key != keys[l]:
                log.warning("cache file %s holds a different key; recomputing layer %d", path, l)
                continue
            out[l] = cov
            log.info("stats cache hit: layer %d (%d tokens) %s", l, cov.count, path)
    missing = [l for l in layers if l not in out]
    if missing:
        log.info("stats cache miss: computing layers %s over %s (%d tokens, max_length %d) in one pass",
                 missing, corpus.source, n_tokens, max_length)
        mom2, sums, count = _run(adapter, missing, corpus, n_tokens, max_length, batch_tokens, early_exit=True,
                                 padding_side=padding_side)
        new = _finish({l: keys[l] for l in missing}, mom2, sums, count, corpus, n_tokens)
        for l, cov in new.items():
            if use_cache:
                cov.save(cache)
                log.info("saved layer %d covariance to %s", l, cov.path)
            out[l] = cov
    return {l: out[l] for l in layers}


def collect_covariances_per_layer_full_pass(adapter: ModelAdapter, layers: Iterable[int] | int, corpus,
                                            n_tokens: int, max_length: int = 128,
                                            batch_tokens: int = 4096) -> dict[int, KeyCovariance]:
    """Slow reference: one full forward pass (no early exit) per layer, no cache. For benchmarks/tests."""
    layers = _check_args(adapter, layers, n_tokens, max_length, batch_tokens)
    corpus = Corpus.coerce(corpus)
    tok_hash = tokenizer_hash(adapter.tokenizer)
    out = {}
    for l in layers:
        key = StatsKey.for_layer(adapter, l, corpus, n_tokens, max_length, tok_hash=tok_hash)
        mom2, sums, count = _run(adapter, [l], corpus, n_tokens, max_length, batch_tokens, early_exit=False)
        out.update(_finish({l: key}, mom2, sums, count, corpus, n_tokens))
    return out
