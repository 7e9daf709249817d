"""Key statistics: C = E[k kᵀ] of the MLP down-projection input over a text corpus, cached on disk."""

from .corpus import Corpus, corpus_for_model
from .covariance import (KeyCovariance, StatsKey, collect_covariances, collect_covariances_per_layer_full_pass,
                         default_cache_dir)

__all__ = ["Corpus", "corpus_for_model", "KeyCovariance", "StatsKey", "collect_covariances",
           "collect_covariances_per_layer_full_pass", "default_cache_dir"]
