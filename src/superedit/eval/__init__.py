"""Evaluation: teacher-forced fact recall, CounterFact/zsRE editing metrics, generation fluency.

Names are imported lazily so ``import superedit.eval`` stays cheap (no torch).

* :mod:`superedit.eval.recall`   — ``fact_recall``, ``recall_rate``, ``target_logprobs_batch``.
* :mod:`superedit.eval.metrics`  — ``target_nll``, ``token_accuracy``, ``teacher_forced``,
  ``evaluate_request``, ``summarize``, ``harmonic_mean``, ``locality_from_argmax``.
* :mod:`superedit.eval.fluency`  — ``compute_n_gram_entropy``, ``n_gram_entropy``,
  ``word_tokenize``, ``generate_texts``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "fact_recall": "recall", "recall_rate": "recall", "target_logprobs_batch": "recall",
    "target_nll": "metrics", "token_accuracy": "metrics", "argmax_tokens": "metrics",
    "teacher_forced": "metrics", "TeacherForced": "metrics", "evaluate_request": "metrics",
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
