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

Convergence stop (``stop=ConvergenceStop(...)``): ``n_tokens`` becomes the largest budget; at
checkpoints (after the first batch that reaches ``first_check``, 2·``first_check``, … accumulated tokens,
and when the budget or the corpus runs out) the
relative changes ‖C_j − C_{j−1}‖_F / ‖C_j‖_F and maxᵢ ‖uᵢ,j − uᵢ,j−1‖ / ‖uᵢ,j‖ with uᵢ = C_λ⁻¹ pᵢ for
probe keys pᵢ (C_λ: the ridge rule of ``stats/whitening.py``) are measured; a layer whose two changes
are both below ``tol`` at ``patience`` consecutive checkpoints is *frozen* there: its statistics are
those of that checkpoint, whatever other layers were requested with it, and the forward pass stops
after the deepest layer still collecting. The probes are the caller's keys (``probes={layer: (n, d)}``)
or ``n_probes`` corpus tokens of the first batch chosen by ``seed`` and held out of every sum. The
settings and the probes' fingerprint are part of the cache key (``StatsKey.stop``); the tokens used
and every checkpoint's changes are saved in the file's metadata (``KeyCovariance.convergence``).

Distributed (``shard=`` a :class:`~superedit.stats.distributed.Shard`): the batches above are formed
identically on every rank and batch b is run by rank ``b % world_size``; each rank accumulates its own
float64 sums, which are ``all_reduce``d (SUM) at each checkpoint and at the end. The keys of a batch
are the same whichever rank runs it (same kernels and thread count), so the result equals one
process's up to the order of the float64 additions (≈1e-16 relative), not bit for bit. Rank 0 reads and
writes the cache; hits are broadcast to the other ranks.
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
from ..models.positions import pad_id
from ..utils.io import atomic_path, write_json_atomic
from ..utils.logs import get_logger
from ..utils.progress import progress
from .corpus import Corpus
from .whitening import check_ridge, with_ridge

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
    stop: str = ""  #: convergence-stop settings and probe fingerprint (canonical JSON); "" = fixed budget

    @classmethod
    def for_layer(cls, adapter: ModelAdapter, layer: int, corpus: Corpus, n_tokens: int, max_length: int,
                  site: str = "key", tok_hash: str | None = None, stop: str = "") -> "StatsKey":
        ident = adapter.identity()
        return cls(source=ident["source"], revision=ident["revision"], config_hash=ident["config_hash"],
                   family=ident["family"], model_dtype=str(adapter.dtype).replace("torch.", ""),
                   tokenizer_hash=tok_hash or tokenizer_hash(adapter.tokenizer), layer=int(layer), site=site,
                   corpus=corpus.fingerprint(), n_tokens=int(n_tokens), max_length=int(max_length), stop=stop)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StatsKey":
        names = {f.name for f in fields(cls)}
        missing = names - set(d) - {"dtype", "version", "stop"}
        if missing:
            raise StatsError(f"statistics key is missing fields {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def digest(self) -> str:
        """Stable hash of all fields (sorted JSON → sha256, 32 hex chars); an empty ``stop`` is left out,
        so fixed-budget statistics keep the digests they had before the field existed."""
        d = self.to_dict()
        if not d["stop"]:
            del d["stop"]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def filename(self) -> str:
        return f"{self.digest()}.safetensors"


# ----- one layer's result -------------------------------------------------------------------
class KeyCovariance:
    """C = E[k kᵀ] of one layer: ``mom2`` (d×d float64), ``mean`` (d, float64), ``count`` tokens.

    ``path`` is the cache file it was saved to/loaded from (if any); ``cache_hit`` says whether it
    came from the cache; ``convergence`` the convergence-stop record (None for a fixed budget): settings,
    ``converged``, ``tokens_used`` and the per-checkpoint relative changes.
    """

    def __init__(self, key: StatsKey, mom2: torch.Tensor, mean: torch.Tensor, count: int,
                 path: Path | None = None, cache_hit: bool = False, convergence: dict | None = None):
        if mom2.dim() != 2 or mom2.shape[0] != mom2.shape[1] or mean.shape != (mom2.shape[0],):
            raise StatsError(f"inconsistent covariance shapes: mom2 {tuple(mom2.shape)}, mean {tuple(mean.shape)}")
        self.key = key
        self.mom2 = mom2
        self.mean = mean
        self.count = int(count)
        self.path = Path(path) if path is not None else None
        self.cache_hit = cache_hit
        self.convergence = convergence

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
        if self.convergence is not None:
            meta["convergence"] = json.dumps(self.convergence)
        tensors = {"mom2": self.mom2.detach().to("cpu", torch.float64).contiguous(),
                   "mean": self.mean.detach().to("cpu", torch.float64).contiguous()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        write_json_atomic(path.with_suffix(".json"), {**self.key.to_dict(), "digest": self.key.digest(),
                                                      "count": self.count, "dim": self.dim, "trace": self.trace(),
                                                      "convergence": self.convergence})
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
            convergence = json.loads(meta["convergence"]) if "convergence" in meta else None
        except StatsError:
            raise
        except Exception as exc:  # noqa: BLE001 - corrupt/unreadable file → user-facing error
            raise StatsError(f"cannot read covariance file {str(path)!r}: {exc}") from exc
        if device is not None:
            mom2, mean = mom2.to(device), mean.to(device)
        return cls(key, mom2, mean, count, path=path, cache_hit=True, convergence=convergence)

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


@dataclass(frozen=True)
class ConvergenceStop:
    """Stop collecting a layer once C has converged (see the module doc).

    Attributes:
        tol: both relative changes (of C, Frobenius, and of C_λ⁻¹p for every probe p) must be below it.
        first_check: tokens at the first checkpoint; the next ones at every doubling.
        patience: consecutive checkpoints that must pass.
        n_probes: held-out corpus keys used as probes when the caller passes none.
        seed: chooses the held-out probe tokens in the first batch.
        ridge: the ridge (fraction of C's mean diagonal, ``stats/whitening.py``) of the probe solves.
    """

    tol: float = 0.05
    first_check: int = 4096
    patience: int = 2
    n_probes: int = 16
    seed: int = 0
    ridge: float = 1e-3

    def __post_init__(self):
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 < self.tol < math.inf:
            raise StatsError(f"convergence tol must be a number > 0 (e.g. 0.05), got {self.tol!r}")
        for name in ("first_check", "patience", "n_probes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise StatsError(f"convergence {name} must be an integer ≥ 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise StatsError(f"convergence seed must be an integer, got {self.seed!r}")
        check_ridge(self.ridge, "convergence ")

    def key_string(self, probes: str) -> str:
        """The canonical JSON that goes into :attr:`StatsKey.stop` (``probes``: what the probes are)."""
        return json.dumps({"tol": float(self.tol), "first_check": self.first_check, "patience": self.patience,
                           "ridge": float(self.ridge), "probes": probes}, sort_keys=True, separators=(",", ":"))

    def probe_desc(self, probes: torch.Tensor | None) -> str:
        """``heldout:<n>:<seed>`` for held-out corpus probes, else ``sha256:<hex>`` of the caller's keys."""
        if probes is None:
            return f"heldout:{self.n_probes}:{self.seed}"
        raw = probes.detach().to("cpu", torch.float64).contiguous().view(torch.uint8).numpy().tobytes()
        return f"sha256:{hashlib.sha256(raw).hexdigest()[:32]}"


def _check_probes(probes, layers: list[int], dim: int) -> dict[int, torch.Tensor] | None:
    if probes is None:
        return None
    if not isinstance(probes, dict):
        raise StatsError("probes must be a dict {layer: tensor (n, d_mlp)} of probe keys")
    out = {}
    for l in layers:
        if l not in probes:
            raise StatsError(f"probes has no keys for layer {l}; pass probe keys for every requested layer "
                             "(or none, to hold out corpus keys)")
        p = torch.as_tensor(probes[l]).detach().to(torch.float64)
        p = p.unsqueeze(0) if p.dim() == 1 else p
        if p.dim() != 2 or p.shape[1] != dim or p.shape[0] < 1:
            raise StatsError(f"probes[{l}] has shape {tuple(p.shape)}; expected (n, {dim}) with n ≥ 1")
        if not torch.isfinite(p).all():
            raise StatsError(f"probes[{l}] holds non-finite values")
        out[l] = p
    return out


class _Accumulator:
    """Σ k kᵀ and Σ k over the accumulated tokens of each layer, float64 on the model's device (``device``:
    one device or {layer: device}, with a ``--device-map`` where each layer's keys are)."""

    def __init__(self, layers: list[int], dim: int, device):
        where = device if isinstance(device, dict) else {l: device for l in layers}
        self.mom2 = {l: torch.zeros(dim, dim, dtype=torch.float64, device=where[l]) for l in layers}
        self.sum = {l: torch.zeros(dim, dtype=torch.float64, device=where[l]) for l in layers}
        self.mask: torch.Tensor | None = None  # bool (batch, seq): tokens of the current batch that enter the sums
        self.probe_mask: torch.Tensor | None = None  # bool (batch, seq): held-out probe tokens, or None
        self.probes: dict[int, torch.Tensor] = {}  # layer -> (n_probes, d) float64 held-out keys

    def observer(self, layer: int):
        def fn(t: torch.Tensor) -> torch.Tensor:
            if self.probe_mask is not None:
                self.probes[layer] = t[self.probe_mask.to(t.device)].to(torch.float64)
            k = t[self.mask.to(t.device)].to(self.mom2[layer].device, torch.float64)  # (n_real, d); pad rows and held-out probes never enter
            upper_gram_update_(self.mom2[layer], k)
            self.sum[layer].add_(k.sum(0))
            return t

        return fn

    def full(self, layers: list[int]) -> None:
        """Fill the lower blocks of ``mom2`` from the upper ones (:func:`upper_gram_update_` writes only
        those); call before the sums are read or reduced."""
        for l in layers:
            symmetrize_from_upper_(self.mom2[l])


#: column blocks of the Σ k kᵀ update (:func:`upper_gram_update_`): 4 computes 10 of 16 blocks; measured
#: on SmolLM2's width (d 1,536, 2,048 tokens, float64, 1 thread): 0.097 s per update against 0.155 s
GRAM_BLOCKS = 4


def _block_edges(d: int, blocks: int) -> list[int]:
    return [i * d // blocks for i in range(blocks + 1)]


def upper_gram_update_(M: torch.Tensor, k: torch.Tensor, blocks: int = GRAM_BLOCKS) -> None:
    """M += kᵀk (M (d, d), k (n, d)) on M's upper block triangle only, diagonal blocks whole.

    Σ k kᵀ is symmetric, so the blocks below the diagonal are copies: computing only the upper ones
    saves (blocks − 1)/(2 · blocks) of the float64 multiply-adds (torch has no symmetric rank-k update;
    BLAS's dsyrk is CPU-only through scipy). Every entry is the same dot product over the same tokens
    as ``M.addmm_(k.T, k)`` (equal to float64 rounding). :func:`symmetrize_from_upper_` completes M."""
    e = _block_edges(M.shape[0], blocks)
    for i in range(blocks):
        M[e[i]:e[i + 1], e[i]:].addmm_(k[:, e[i]:e[i + 1]].T, k[:, e[i]:])


def symmetrize_from_upper_(M: torch.Tensor) -> None:
    """Copy M's upper triangle (:func:`upper_gram_update_` computes it) onto its lower one, in place:
    M becomes exactly symmetric."""
    M.copy_(torch.triu(M) + torch.triu(M, 1).T)


class _Convergence:
    """The checkpoint test of one collection (run on rank 0): relative changes, streaks, records."""

    def __init__(self, stop: ConvergenceStop, layers: list[int]):
        self.stop = stop
        self.prev_C: dict[int, torch.Tensor] = {}
        self.prev_U: dict[int, torch.Tensor] = {}
        self.streak = {l: 0 for l in layers}
        self.checkpoints: dict[int, list[dict]] = {l: [] for l in layers}

    def check(self, layer: int, mom2_sum: torch.Tensor, count: int, probes: torch.Tensor) -> bool:
        """Record checkpoint ``count`` of ``layer``; True when it has passed ``patience`` times in a row.

        Shapes: mom2_sum (d, d) float64 = Σ k kᵀ over ``count`` tokens; probes (n, d)."""
        C = mom2_sum / count
        prev = self.prev_C.get(layer)
        rel_C = None if prev is None else float(torch.linalg.matrix_norm(C - prev) / torch.linalg.matrix_norm(C))
        L, info = torch.linalg.cholesky_ex(with_ridge(C, self.stop.ridge))
        rel_u = None
        if int(info) == 0:
            U = torch.cholesky_solve(probes.to(C).T, L)  # (d, n) = C_λ⁻¹ Pᵀ
            prev_U = self.prev_U.get(layer)
            if prev_U is not None:
                rel_u = float(((U - prev_U).norm(dim=0) / U.norm(dim=0)).max())
            self.prev_U[layer] = U
        else:  # C_λ not positive definite (too few tokens, no ridge): not measurable, so not converged
            self.prev_U.pop(layer, None)
        self.prev_C[layer] = C
        passed = rel_C is not None and rel_u is not None and rel_C < self.stop.tol and rel_u < self.stop.tol
        self.streak[layer] = self.streak[layer] + 1 if passed else 0
        self.checkpoints[layer].append({"tokens": int(count), "rel_change_C": rel_C, "rel_change_u": rel_u})
        done = self.streak[layer] >= self.stop.patience
        if done:
            self.prev_C.pop(layer)
            self.prev_U.pop(layer, None)
        return done


def _collect(adapter: ModelAdapter, layers: list[int], corpus: Corpus, n_tokens: int, max_length: int,
             batch_tokens: int, early_exit: bool, padding_side: str = "right", stop: ConvergenceStop | None = None,
             probes: dict[int, torch.Tensor] | None = None, shard=None):
    """One sweep over the token budget. Returns (Σ k kᵀ, Σ k, token count, convergence record) per layer.

    Every rank forms the same batches; batch b is run by rank ``b % world_size``. Every rank returns
    the totals (all-reduced)."""
    from .distributed import LOCAL

    shard = shard or LOCAL
    model, tok = adapter.model, adapter.tokenizer
    device = adapter.device
    acc = _Accumulator(layers, adapter.d_mlp, {l: adapter.layer_device(l) for l in layers})
    pad = pad_id(tok)
    held_out = stop is not None and probes is None
    conv = _Convergence(stop, layers) if stop is not None and shard.is_main else None
    active = list(layers)  # layers still collecting
    counts: dict[int, int] = {}
    total = 0  # tokens accumulated so far, all ranks together
    threshold = stop.first_check if stop is not None else None
    last_check = 0  # tokens at the last checkpoint
    was_training = model.training
    model.eval()
    bar = (progress(total=n_tokens, desc=f"key stats L{','.join(map(str, layers))}", unit="tok") if shard.is_main
           else _NoBar())
    try:
        with torch.no_grad():
            for b, batch in enumerate(pack_batches(token_sequences(tok, corpus, n_tokens, max_length), batch_tokens)):
                n_real = sum(len(s) for s in batch)
                n_probe = min(stop.n_probes, n_real // 2) if held_out and b == 0 else 0
                if shard.owns(b):
                    ids, mask, pos = batch_tensors(batch, pad, padding_side, device)
                    real = mask.bool()
                    acc.probe_mask = None
                    if n_probe:
                        flat = real.flatten().nonzero().squeeze(1).cpu()
                        g = torch.Generator().manual_seed(stop.seed)
                        pick = flat[torch.randperm(flat.numel(), generator=g)[:n_probe]].sort().values
                        pm = torch.zeros(real.numel(), dtype=torch.bool)
                        pm[pick] = True
                        acc.probe_mask = pm.view(real.shape).to(device)
                        real = real & ~acc.probe_mask
                    acc.mask = real
                    edits = {("key", l): acc.observer(l) for l in active}
                    with Trace(adapter, edits=edits, stop_after=early_exit):
                        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                total += n_real - n_probe
                bar.update(n_real)
                if threshold is not None and total >= threshold:
                    while threshold <= total:
                        threshold *= 2
                    last_check = total
                    for l in _checkpoint(acc, active, total, conv, probes, shard, layers):
                        counts[l] = total
                        active.remove(l)
                    if not active:
                        break
        if stop is not None and active and total > last_check:  # the budget or the corpus ran out: a last record
            for l in _checkpoint(acc, active, total, conv, probes, shard, layers):
                counts[l] = total
                active.remove(l)
    finally:
        bar.close()
        if was_training:
            model.train()
    for l in active:
        counts[l] = total
    acc.full(layers)
    shard.all_reduce_([acc.mom2[l] for l in layers] + [acc.sum[l] for l in layers])
    records = None
    if stop is not None:
        if conv is not None:
            desc = {l: stop.probe_desc(None if probes is None else probes[l]) for l in layers}
            records = {l: {"tol": float(stop.tol), "first_check": stop.first_check, "patience": stop.patience,
                           "ridge": float(stop.ridge), "probes": desc[l],
                           "n_probes": int((probes[l] if probes is not None else acc.probes[l]).shape[0]),
                           "converged": l not in active, "tokens_used": counts[l],
                           "checkpoints": conv.checkpoints[l]} for l in layers}
        records = shard.broadcast_object(records)
    return acc.mom2, acc.sum, counts, records


class _NoBar:
    """The progress bar of a rank other than 0."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _checkpoint(acc: _Accumulator, active: list[int], total: int, conv: _Convergence | None, probes, shard,
                layers: list[int]) -> list[int]:
    """All-reduce the active layers' sums onto rank 0 (the others restart from zero), test them there;
    returns the layers that converged (the same list on every rank)."""
    acc.full(active)
    shard.all_reduce_([acc.mom2[l] for l in active] + [acc.sum[l] for l in active])
    frozen = []
    if shard.is_main:
        for l in active:
            p = probes[l] if probes is not None else acc.probes[l]
            if conv.check(l, acc.mom2[l], total, p):
                frozen.append(l)
    elif shard.world_size > 1:
        for l in active:
            acc.mom2[l].zero_()
            acc.sum[l].zero_()
    return shard.broadcast_object(frozen)


def _run(adapter: ModelAdapter, layers: list[int], corpus: Corpus, n_tokens: int, max_length: int,
         batch_tokens: int, early_exit: bool, padding_side: str = "right") -> tuple[dict, dict, int]:
    """One sweep over the token budget; keys of ``layers`` accumulated. Returns (mom2 sums, sums, count)."""
    mom2, sums, counts, _ = _collect(adapter, layers, corpus, n_tokens, max_length, batch_tokens, early_exit,
                                     padding_side)
    return mom2, sums, counts[layers[0]]


def _finish(keys: dict[int, StatsKey], mom2: dict, sums: dict, count, corpus: Corpus, n_tokens: int,
            records: dict | None = None):
    counts = count if isinstance(count, dict) else {l: count for l in keys}
    for l in keys:
        if counts[l] == 0:
            raise StatsError(f"corpus {corpus.source} produced no tokens")
    def expected(l):  # the budget less the held-out probe tokens
        held = records[l]["n_probes"] if records and records[l]["probes"].startswith("heldout") else 0
        return n_tokens - held

    short = [l for l in keys if counts[l] < expected(l) and not (records and records[l]["converged"])]
    if short:
        log.warning("corpus %s has only %d tokens (requested %d); using all of them", corpus.source,
                    counts[short[0]], n_tokens)
    return {l: KeyCovariance(keys[l], mom2[l] / counts[l], sums[l] / counts[l], counts[l],
                             convergence=records[l] if records else None) for l in keys}


def collect_covariances(adapter: ModelAdapter, layers: Iterable[int] | int, corpus, n_tokens: int,
                        max_length: int = 128, batch_tokens: int = 4096, cache_dir: str | Path | None = None,
                        recompute: bool = False, *, use_cache: bool = True,
                        padding_side: str = "right", stop: ConvergenceStop | None = None,
                        probes: dict[int, torch.Tensor] | None = None, shard=None) -> dict[int, KeyCovariance]:
    """C = E[k kᵀ] for every layer in ``layers``: cached ones are loaded, the rest computed in one pass.

    Args:
        adapter: the model.
        layers: layer indices (or one int).
        corpus: a :class:`Corpus`, a path (file or directory) or a list of strings.
        n_tokens: token budget (count actually used may be smaller for a small corpus); with ``stop``
            the largest budget.
        max_length: documents are truncated to this many tokens.
        batch_tokens: about this many (padded) tokens per forward pass.
        cache_dir: cache directory (default ``$SUPEREDIT_HOME/stats``).
        recompute: ignore cached files (they are overwritten).
        use_cache: False → neither read nor write the cache.
        padding_side: "right" (default) or "left"; does not change the result.
        stop: a :class:`ConvergenceStop`: stop each layer once C and C_λ⁻¹p have converged.
        probes: with ``stop``, ``{layer: (n, d_mlp)}`` probe keys (default: held-out corpus keys).
        shard: a :class:`~superedit.stats.distributed.Shard` (torch.distributed rank and world size);
            None → this process alone. Every rank must call with the same arguments.
    """
    from .distributed import LOCAL

    shard = shard or LOCAL
    layers = _check_args(adapter, layers, n_tokens, max_length, batch_tokens)
    if padding_side not in ("left", "right"):
        raise StatsError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if stop is not None and not isinstance(stop, ConvergenceStop):
        raise StatsError(f"stop must be a ConvergenceStop, got {type(stop).__name__}")
    if probes is not None and stop is None:
        raise StatsError("probes are only used by a convergence stop; pass stop=ConvergenceStop(...) too")
    probes = _check_probes(probes, layers, adapter.d_mlp)
    corpus = Corpus.coerce(corpus)
    tok_hash = tokenizer_hash(adapter.tokenizer)
    stop_str = {l: "" if stop is None else stop.key_string(stop.probe_desc(None if probes is None else probes[l]))
                for l in layers}
    keys = {l: StatsKey.for_layer(adapter, l, corpus, n_tokens, max_length, tok_hash=tok_hash, stop=stop_str[l])
            for l in layers}
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out: dict[int, KeyCovariance] = {}
    if use_cache and not recompute and shard.is_main:
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
    if shard.world_size > 1:
        out = _share_hits(out, keys, adapter, shard)
    missing = [l for l in layers if l not in out]
    if missing:
        log.info("stats cache miss: computing layers %s over %s (%d tokens, max_length %d) in one pass%s%s",
                 missing, corpus.source, n_tokens, max_length,
                 "" if stop is None else f", stopping at convergence (tol {stop.tol})",
                 "" if shard.world_size == 1 else f", rank {shard.rank} of {shard.world_size}")
        mom2, sums, counts, records = _collect(adapter, missing, corpus, n_tokens, max_length, batch_tokens,
                                               early_exit=True, padding_side=padding_side, stop=stop,
                                               probes=None if probes is None else {l: probes[l] for l in missing},
                                               shard=shard)
        new = _finish({l: keys[l] for l in missing}, mom2, sums, counts, corpus, n_tokens, records)
        for l, cov in new.items():
            if use_cache and shard.is_main:
                cov.save(cache)
                log.info("saved layer %d covariance to %s", l, cov.path)
            out[l] = cov
        shard.barrier()  # the files exist before any rank returns
    return {l: out[l] for l in layers}


def _share_hits(hits: dict[int, KeyCovariance], keys: dict[int, StatsKey], adapter: ModelAdapter,
                shard) -> dict[int, KeyCovariance]:
    """Rank 0's cache hits, broadcast to every rank (the others' ``path`` is None)."""
    meta = shard.broadcast_object({l: (c.count, c.convergence, str(c.path)) for l, c in hits.items()}
                                  if shard.is_main else None)
    out = {}
    d = adapter.d_mlp
    for l in sorted(meta):
        count, convergence, path = meta[l]
        if shard.is_main:
            mom2, mean = hits[l].mom2.to(adapter.device), hits[l].mean.to(adapter.device)
        else:
            mom2 = torch.empty(d, d, dtype=torch.float64, device=adapter.device)
            mean = torch.empty(d, dtype=torch.float64, device=adapter.device)
        shard.broadcast_(mom2)
        shard.broadcast_(mean)
        out[l] = KeyCovariance(keys[l], mom2, mean, count, path=path if shard.is_main else None, cache_hit=True,
                               convergence=convergence)
    return out


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
