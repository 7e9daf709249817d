"""Shareable statistics: a self-describing bundle of cached key covariances, verified on import.

A bundle is ONE safetensors file holding, for each entry, C = E[k kᵀ] (``e<i>.mom2``, d_mlp × d_mlp,
float64) and the mean key (``e<i>.mean``, d_mlp), with everything needed to trust it in the
metadata header (plain JSON strings, readable by any safetensors reader)::

    format            "superedit.stats_bundle"          format_version  "1"
    superedit_version the version that wrote it          created         UTC time
    model             identity of the model it was computed on (source, revision, config hash,
                      family, weight dtype, tokenizer hash) and its d_mlp, n_layers
    entries           one record per matrix: the full StatsKey (model identity, layer, site, corpus
                      fingerprint, token budget, max length, accumulation dtype, format version),
                      the token count actually used, and the sha256 of each tensor's bytes

:func:`export_bundle` collects the cache entries of one model (``$SUPEREDIT_HOME/stats``, see
:mod:`superedit.stats.covariance`); :func:`import_bundle` verifies every entry (hashes, shapes, finite
values, the model's identity: revision, config hash, family, dtype, tokenizer, d_mlp) BEFORE writing
anything, and writes the matrices into the cache under the importing model's key, so
``collect_covariances`` (and every method) finds them instead of recomputing.

A different ``source`` (a local path on another machine) is accepted only when the revision is a
content fingerprint of the weights (``local-…``) and equal; a hub revision must come with the same
hub id.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import StatsError
from ..models.adapter import ModelAdapter
from ..utils.integrity import check_finite, sha256_file
from ..utils.io import atomic_path
from ..utils.logs import get_logger
from .covariance import FORMAT as COV_FORMAT
from .covariance import KeyCovariance, StatsKey, default_cache_dir, tokenizer_hash

log = get_logger(__name__)

BUNDLE_FORMAT = "superedit.stats_bundle"
BUNDLE_VERSION = 1
#: StatsKey fields that identify the model (all must match on import; ``source`` see the module doc)
MODEL_FIELDS = ("source", "revision", "config_hash", "family", "model_dtype", "tokenizer_hash")


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (CPU, contiguous, its own dtype; little-endian as safetensors stores it)."""
    return hashlib.sha256(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def model_identity(adapter: ModelAdapter) -> dict:
    """The model fields of a StatsKey for ``adapter``, plus d_mlp and n_layers."""
    ident = adapter.identity()
    return {"source": ident["source"], "revision": ident["revision"], "config_hash": ident["config_hash"],
            "family": ident["family"], "model_dtype": str(adapter.dtype).replace("torch.", ""),
            "tokenizer_hash": tokenizer_hash(adapter.tokenizer), "d_mlp": adapter.d_mlp,
            "n_layers": adapter.n_layers}


@dataclass
class BundleEntry:
    key: StatsKey
    count: int
    mom2: torch.Tensor
    mean: torch.Tensor


def _cache_entries(cache: Path) -> list[tuple[Path, StatsKey]]:
    """(path, key) of every covariance file in ``cache``, read from the headers only."""
    from safetensors import safe_open

    found = []
    for path in sorted(cache.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
            if meta.get("format") != COV_FORMAT:
                continue
            found.append((path, StatsKey.from_dict(json.loads(meta["key"]))))
        except Exception as exc:  # noqa: BLE001 - an unreadable cache file is skipped, as collect_covariances does
            log.warning("skipping unreadable cache file %s: %s", path, exc)
    return found


def export_bundle(adapter: ModelAdapter, layers: list[int], out: str | Path, cache_dir: str | Path | None = None,
                  n_tokens: int | None = None) -> dict:
    """Write the cached covariances of ``adapter`` at ``layers`` (every corpus and token budget found,
    or only ``n_tokens``) into one bundle file ``out``; returns a summary with the file's sha256.

    Raises StatsError, writing nothing, when a requested layer has no cached matrix."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    ident = model_identity(adapter)
    want = {f: ident[f] for f in MODEL_FIELDS}
    picked = [(p, k) for p, k in _cache_entries(cache) if k.site == "key" and k.layer in layers
              and {f: getattr(k, f) for f in MODEL_FIELDS} == want and (n_tokens is None or k.n_tokens == n_tokens)]
    missing = sorted(set(layers) - {k.layer for _, k in picked})
    if missing:
        budget = f" with --tokens {n_tokens}" if n_tokens is not None else ""
        raise StatsError(f"no cached covariance{budget} for model {ident['source']!r} at layer(s) {missing} in "
                         f"{str(cache)!r}: compute them first (superedit stats --model {ident['source']} --layers "
                         f"{','.join(map(str, missing))}{budget}) or pass --cache-dir")
    tensors, records = {}, []
    for i, (path, key) in enumerate(sorted(picked, key=lambda pk: (pk[1].layer, pk[1].n_tokens, pk[1].corpus))):
        cov = KeyCovariance.load(path)
        if cov.key != key:
            raise StatsError(f"cache file {str(path)!r} changed while it was read; run the export again")
        check_finite({"mom2": cov.mom2, "mean": cov.mean}, str(path), StatsError)
        mom2, mean = cov.mom2.to(torch.float64).contiguous(), cov.mean.to(torch.float64).contiguous()
        tensors[f"e{i}.mom2"], tensors[f"e{i}.mean"] = mom2, mean
        records.append({"key": key.to_dict(), "digest": key.digest(), "count": cov.count,
                        "sha256": {"mom2": tensor_sha256(mom2), "mean": tensor_sha256(mean)}})
    from safetensors.torch import save_file

    from .. import __version__

    meta = {"format": BUNDLE_FORMAT, "format_version": str(BUNDLE_VERSION), "superedit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": json.dumps(ident),
            "entries": json.dumps(records),
            "about": "superedit key covariances C = E[k k^T] of the MLP down-projection input; "
                     "load with: superedit stats import FILE --model MODEL"}
    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return {"path": str(out), "sha256": sha256_file(out), "bytes": out.stat().st_size, "model": ident,
            "entries": [{"layer": r["key"]["layer"], "n_tokens": r["key"]["n_tokens"], "count": r["count"],
                         "corpus": r["key"]["corpus"], "digest": r["digest"]} for r in records]}


def read_bundle(path: str | Path) -> tuple[dict, list[BundleEntry]]:
    """The bundle's metadata and entries, every tensor checked against its recorded sha256, shape
    and finiteness. Raises StatsError naming the file and the entry on any mismatch."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StatsError(f"statistics bundle {str(path)!r} does not exist")
    where = f"statistics bundle {str(path)!r}"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != BUNDLE_FORMAT:
                raise StatsError(f"{where} is not a superedit statistics bundle (format {meta.get('format')!r}); "
                                 "make one with: superedit stats export")
            if meta.get("format_version") != str(BUNDLE_VERSION):
                raise StatsError(f"{where} has format version {meta.get('format_version')!r}; this superedit reads "
                                 f"version {BUNDLE_VERSION}: export it again with this version")
            records = json.loads(meta["entries"])
            names = set(fh.keys())
            entries = []
            for i, rec in enumerate(records):
                for part in ("mom2", "mean"):
                    if f"e{i}.{part}" not in names:
                        raise StatsError(f"{where}: entry {i} (layer {rec['key'].get('layer')}) has no tensor "
                                         f"'e{i}.{part}'; the file is incomplete, download or export it again")
                mom2, mean = fh.get_tensor(f"e{i}.mom2"), fh.get_tensor(f"e{i}.mean")
                for part, t in (("mom2", mom2), ("mean", mean)):
                    if tensor_sha256(t) != rec["sha256"][part]:
                        raise StatsError(f"{where}: entry {i} (layer {rec['key'].get('layer')}) tensor {part!r} does "
                                         "not match its recorded sha256; the file is damaged, download or export it again")
                key = StatsKey.from_dict(rec["key"])
                if key.digest() != rec["digest"]:
                    raise StatsError(f"{where}: entry {i} key does not match its recorded digest; the metadata was edited")
                if mom2.shape != (mean.shape[0], mean.shape[0]):
                    raise StatsError(f"{where}: entry {i} has mom2 {tuple(mom2.shape)} and mean {tuple(mean.shape)}")
                check_finite({f"e{i}.mom2": mom2, f"e{i}.mean": mean}, where, StatsError)
                entries.append(BundleEntry(key, int(rec["count"]), mom2, mean))
            meta = {**meta, "model": json.loads(meta["model"])}
    except StatsError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt file or header → user-facing error
        raise StatsError(f"cannot read {where}: {exc}; download or export it again") from exc
    if not entries:
        raise StatsError(f"{where} holds no entries")
    return meta, entries


def _check_model(entry: BundleEntry, i: int, ident: dict, where: str) -> StatsKey:
    """The entry's key for the importing model, or StatsError naming the first mismatching field."""
    key = entry.key
    for f in ("family", "config_hash", "tokenizer_hash", "model_dtype", "revision"):
        if getattr(key, f) != ident[f]:
            raise StatsError(f"{where}: entry {i} (layer {key.layer}) was computed for {f} {getattr(key, f)!r} but "
                             f"model {ident['source']!r} has {f} {ident[f]!r}; it belongs to another model "
                             "(or weights, dtype, tokenizer): use it with that model, or compute the statistics "
                             "for this one (superedit stats)")
    if entry.mom2.shape[0] != ident["d_mlp"] or not 0 <= key.layer < ident["n_layers"]:
        raise StatsError(f"{where}: entry {i} is {entry.mom2.shape[0]}-dimensional at layer {key.layer}, but model "
                         f"{ident['source']!r} has d_mlp {ident['d_mlp']} and {ident['n_layers']} layers")
    if key.source != ident["source"]:
        if not key.revision.startswith("local-"):
            raise StatsError(f"{where}: entry {i} was computed for {key.source!r} at hub revision {key.revision!r}, "
                             f"not for {ident['source']!r}; load the model by the same id")
        key = replace(key, source=ident["source"])  # same weight fingerprint, loaded from another place
    return key


def import_bundle(path: str | Path, adapter: ModelAdapter, cache_dir: str | Path | None = None) -> dict:
    """Verify the bundle ``path`` against ``adapter`` and write its matrices into the statistics cache.

    Nothing is written unless every entry verifies. Entries already in the cache are left as they are."""
    meta, entries = read_bundle(path)
    ident = model_identity(adapter)
    where = f"statistics bundle {str(path)!r}"
    keys = [_check_model(e, i, ident, where) for i, e in enumerate(entries)]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    rows = []
    for entry, key in zip(entries, keys):
        target = cache / key.filename()
        present = target.exists()
        if not present:
            KeyCovariance(key, entry.mom2, entry.mean, entry.count).save(cache)
        rows.append({"layer": key.layer, "n_tokens": key.n_tokens, "count": entry.count, "corpus": key.corpus,
                     "path": str(target), "status": "present" if present else "imported"})
    return {"path": str(path), "sha256": sha256_file(path), "superedit_version": meta.get("superedit_version"),
            "created": meta.get("created"), "cache_dir": str(cache), "entries": rows}
