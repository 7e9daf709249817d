"""Evaluation: teacher-forced fact recall, CounterFact/zsRE editing metrics, generation fluency.

Names are imported lazily so ``import superedit.eval`` stays cheap (no torch).

* :mod:`superedit.eval.scoring`  — the one teacher-forced scorer: ``score_targets`` (``TargetScore``),
  ``score_token_rows``, and its reductions ``fact_recall`` and ``perplexity``.
* :mod:`superedit.eval.metrics`  — ``target_nll``, ``token_accuracy``, ``evaluate_request``,
  ``evaluate_requests``, ``batch_evaluate``, ``summarize``, ``harmonic_mean``, ``locality_from_argmax``.
* :mod:`superedit.eval.fluency`  — ``compute_n_gram_entropy``, ``n_gram_entropy``,
  ``word_tokenize``, ``generate_texts``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "score_targets": "scoring", "score_token_rows": "scoring", "TargetScore": "scoring",
    "fact_recall": "scoring", "perplexity": "scoring",
    "target_nll": "metrics", "token_accuracy": "metrics", "evaluate_request": "metrics",
    "evaluate_requests": "metrics", "batch_evaluate": "metrics",
    "summarize": "metrics", "harmonic_mean": "metrics", "locality_from_argmax": "metrics",
    "SCALAR_METRICS": "metrics",
    "compute_n_gram_entropy": "fluency", "n_gram_entropy": "fluency", "word_tokenize": "fluency",
    "generate_texts": "fluency",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
