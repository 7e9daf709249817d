"""Where methods get C = E[k kᵀ] from: a small protocol plus two sources.

``FixedCovariance`` wraps matrices already in hand (tests, analyses); ``CorpusCovariance`` computes
them lazily from a corpus through ``superedit.stats`` (cached on disk under the full stats key).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..models import ModelAdapter


class CovarianceSource(Protocol):
    def mom2(self, layer: int) -> torch.Tensor:
        """E[k kᵀ] at ``layer``, float64, (d_mlp, d_mlp)."""


class FixedCovariance:
    def __init__(self, matrices: dict[int, torch.Tensor]):
        self.matrices = {int(l): m.to(torch.float64) for l, m in matrices.items()}

    def mom2(self, layer: int) -> torch.Tensor:
        if layer not in self.matrices:
            raise KeyError(f"no covariance for layer {layer} (have {sorted(self.matrices)})")
        return self.matrices[layer]


class CorpusCovariance:
    """C from a corpus, computed for all needed layers in one pass on first use."""

    def __init__(self, adapter: ModelAdapter, corpus: str | None = None, n_tokens: int = 100_000,
                 max_length: int = 128, cache_dir: str | None = None, layers: list[int] | None = None):
        self.adapter, self.corpus, self.n_tokens = adapter, corpus, n_tokens
        self.max_length, self.cache_dir = max_length, cache_dir
        self.prefetch = list(layers or [])
        self._mats: dict[int, torch.Tensor] = {}

    def mom2(self, layer: int) -> torch.Tensor:
        if layer not in self._mats:
            from ..stats import Corpus, collect_covariances, corpus_for_model

            wanted = sorted(set(self.prefetch + [layer]) - set(self._mats))
            corpus = Corpus.coerce(self.corpus) if self.corpus else corpus_for_model(self.adapter)
            covs = collect_covariances(self.adapter, wanted, corpus, n_tokens=self.n_tokens,
                                       max_length=self.max_length, cache_dir=self.cache_dir)
            for l, c in covs.items():
                self._mats[l] = c.matrix(device=self.adapter.layer_device(l), dtype=torch.float64)
        return self._mats[layer]
