"""Keys to Robust Edits (REP): perturbed queries, key geometry, a gated key adaptor and its evaluation.

Heavy imports happen inside the submodules' functions only where needed; see
``perturb`` (variants + ID/OOD split), ``adaptor`` (KeyAdaptor/RobustAdaptor, training, save/load),
``geometry`` (whitening similarities, similar-but-unrelated keys, value norms) and ``evaluate``
(metrics, single-edit protocol, τ sweep).
"""

__all__ = ["perturb", "adaptor", "geometry", "evaluate"]
