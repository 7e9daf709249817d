"""Analyses of where facts live in a model: causal tracing and the state-swap test
(``superedit.analysis.tracing``), superposition statistics and forecasts.

Names are exported lazily so that importing one analysis module does not import the others.
"""

from __future__ import annotations

import importlib

_TRACING = (
    "CATEGORIES", "KIND_SITES", "Fact", "SwapResult", "TraceResult", "as_fact", "average_by_category",
    "category_positions", "default_window", "embedding_noise_std", "pair_facts", "restored_probs", "state_swap",
    "summarize_traces", "target_token_id", "trace_fact", "trace_fact_kinds", "window_layers",
)

__all__ = list(_TRACING)


def __getattr__(name: str):
    if name in _TRACING:
        return getattr(importlib.import_module(".tracing", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
