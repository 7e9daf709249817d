"""Hyperparameters as validated pydantic models, loaded from YAML.

Defaults live in ``superedit/configs/hparams/<method>/<family-or-testbed-size>.yaml``; a
``--hparams FILE`` overrides them field by field. Every field carries its help text (the field's
description) and its bounds next to it; unknown fields are rejected. Names follow the literature
(ROME/MEMIT code): layers, v_num_grad_steps, v_lr, v_loss_layer, v_weight_decay, clamp_norm_factor,
kl_factor, mom2_update_weight, mom2_n_tokens.

Types are strict where YAML is loose: an integer field takes ``30`` or ``30.0`` but not ``30.7``; a
number field takes no ``true``; a boolean field takes only ``true``/``false``. Numbers written as
strings are read as numbers (PyYAML reads ``1e-3`` without a dot as a string). Every invalid value
raises :class:`HParamsError` naming the source (file), the field, the value and what is accepted.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ..errors import SupereditError


class HParamsError(SupereditError):
    """An invalid hyperparameter; the message names the source, the field and what is accepted."""

    validation_error: Any = None  #: pydantic's ValidationError behind it, if any


FactToken = Literal["subject_last", "subject_first", "last"]
KLDirection = Literal["edited_orig", "orig_edited"]
FactorKind = Literal["cholesky", "inverse"]
FACT_TOKENS = get_args(FactToken)
KL_DIRECTIONS = get_args(KLDirection)
FACTOR_KINDS = get_args(FactorKind)


# ----- field types: YAML values checked strictly, with messages that say what is accepted ------------------
_INT_LIMIT = 2**63 - 1  # torch seeds and sizes are int64


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not true/false")
    if isinstance(value, int):
        if abs(value) > _INT_LIMIT:
            raise ValueError(f"is too large (at most {_INT_LIMIT})")
        return value
    if isinstance(value, str):
        try:
            parsed: int | None = int(value.strip())
        except ValueError:
            parsed = None
        if parsed is not None:
            return _integer(parsed)
        try:
            value = _number(value)
        except ValueError:
            raise ValueError("must be an integer (e.g. 30)") from None
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return _integer(int(value))
        raise ValueError("must be a whole number (an integer such as 30; 30.0 is accepted, 30.7 is not)")
    raise ValueError(f"must be an integer, not a {type(value).__name__}")


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("must be a number (e.g. 0.5 or 1e-3)") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, not a {type(value).__name__}")
    try:
        out = float(value)
    except OverflowError:
        raise ValueError("is too large for a number") from None
    if not math.isfinite(out):
        raise ValueError("must be a finite number (not nan or inf)")
    return out


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not a {type(value).__name__}")
    return value


def _path_or_empty(value: Any) -> str:
    return "" if value is None else _string(value)


Int = Annotated[int, BeforeValidator(_integer)]
Float = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
Str = Annotated[str, BeforeValidator(_string)]
PathOrEmpty = Annotated[str, BeforeValidator(_path_or_empty)]
LayerIndex = Annotated[int, BeforeValidator(_integer), Field(ge=0)]
#: non-empty list of layer indices ≥ 0 (checked against the model by ``commands.common.build_hparams``)
Layers = Annotated[list[LayerIndex], Field(min_length=1)]


def _templates(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty list of prompts, each with one '{}' for the subject (or null)")
    for i, t in enumerate(value):
        if not isinstance(t, str) or t.count("{}") != 1 or not t.replace("{}", "").strip():
            raise ValueError(f"item {i} ({t!r}) must be a prompt with exactly one '{{}}' for the subject and "
                             "some words around it")
    return list(value)


#: prompt templates with one ``{}`` each, or None (the default list)
Templates = Annotated[list[str] | None, BeforeValidator(_templates)]
#: token lengths of context prefixes, each ≥ 1 (may be empty: no prefixes)
Lengths = list[Annotated[int, BeforeValidator(_integer), Field(ge=1)]]


def _f(default: Any, help: str, **bounds: Any) -> Any:
    """A field with its help text and bounds (``ge``, ``gt``, ``le``, ``lt``)."""
    if isinstance(default, list):
        return Field(default_factory=lambda: list(default), description=help, **bounds)
    return Field(default=default, description=help, **bounds)


def _value_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def describe_validation_error(exc: ValidationError, cls: type, source: str,
                              origin: dict[str, str] | None = None) -> str:
    """One message for all of ``exc``'s errors: ``source: field = value: what is accepted; …``.

    ``origin`` maps a field to where its value came from (a file); such problems name that instead."""
    origin = origin or {}
    unknown: list[str] = []
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        loc = err.get("loc", ())
        name = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        if err["type"] == "extra_forbidden":
            unknown.append(name)
            continue
        ctx_error = (err.get("ctx") or {}).get("error")
        msg = str(ctx_error) if err["type"] == "value_error" and ctx_error is not None else err["msg"]
        msg = msg.replace("Input should be", "must be").replace("List should", "must").replace(" after validation", "")
        if loc:
            where = origin.get(str(loc[0]), source)
            problems.append(f"{where}: field {name!r} = {_value_repr(err.get('input'))}: {msg}")
        else:
            problems.append(f"{source}: {msg}")
    if unknown:
        where = sorted({origin.get(u, source) for u in unknown})
        problems.insert(0, f"{' + '.join(where)}: unknown field(s) {sorted(unknown)} for {cls.__name__}; "
                           f"valid fields: {sorted(cls.model_fields)}")
    return "; ".join(problems)


class HParams(BaseModel):
    """Base: YAML loading, validation, help text.

    Construction, :meth:`from_dict`, :meth:`replace` and attribute assignment all validate and raise
    :class:`HParamsError` (never pydantic's ValidationError).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = HParamsError(describe_validation_error(exc, type(self), f"{type(self).__name__}(…)"))
            err.validation_error = exc  # from_dict re-describes it with the file it read
            raise err from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise HParamsError(describe_validation_error(exc, type(self), f"{type(self).__name__}.{name}")) from None

    @classmethod
    def help(cls) -> dict[str, str]:
        """``{field: help text}`` in declaration order."""
        return {name: info.description or "" for name, info in cls.model_fields.items()}

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(cls.model_fields)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", origin: dict[str, str] | None = None) -> "HParams":
        """Validate ``data`` (field → value); errors name ``source`` (or the field's ``origin``) and the field."""
        if not isinstance(data, dict):
            raise HParamsError(f"{source}: expected a mapping of field: value, got {type(data).__name__}")
        bad = [k for k in data if not isinstance(k, str)]
        if bad:  # e.g. YAML "?" or "1: x": a key that is no field name (Python refuses it as a keyword)
            raise HParamsError(f"{source}: field names must be text; got the key {bad[0]!r} "
                               f"({type(bad[0]).__name__}). Valid fields: {', '.join(sorted(cls.model_fields))}")
        try:
            return cls.model_validate(data)  # runs __init__, which turns a ValidationError into HParamsError
        except HParamsError as exc:
            inner = getattr(exc, "validation_error", None)
            if inner is None:
                raise
            raise HParamsError(describe_validation_error(inner, cls, source, origin)) from None
        except ValidationError as exc:
            raise HParamsError(describe_validation_error(exc, cls, source, origin)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> "HParams":
        """A validated copy with ``changes`` applied."""
        return type(self).from_dict({**self.to_dict(), **changes}, source="<replace>")

    def validate(self, source: str = "<hparams>") -> None:  # type: ignore[override]
        """Re-check the current values (they are checked on construction and assignment already)."""
        type(self).from_dict(self.to_dict(), source)


def _distinct_layers(hp: HParams) -> HParams:
    layers = getattr(hp, "layers", None)
    if layers is not None and len(set(layers)) != len(layers):
        raise ValueError(f"field 'layers' = {layers}: each layer may appear only once")
    return hp


class ContextHParams(HParams):
    """How keys and values are averaged over context prefixes (ROME's context templates)."""

    context_lengths: Lengths = _f([5, 10], "Token lengths of generated context prefixes (one group per length).")
    n_prefixes: Int = _f(5, "Prefixes generated per length (plus the empty prefix).", ge=0)
    fact_token: FactToken = _f("subject_last", "Where the key is read: subject_last | subject_first | last.")
    seed: Int = _f(0, "Seed for generated prefixes.", ge=0)


class ValueHParams(ContextHParams):
    """Optimisation of the target value v* (ROME's compute_v / MEMIT's compute_z)."""

    v_num_grad_steps: Int = _f(20, "Gradient steps for the value delta.", ge=0)
    v_lr: Float = _f(0.5, "Adam learning rate of the value delta.", gt=0)
    v_loss_layer: Int = _f(-1, "Layer whose output feeds the loss (-1: the model's last layer; kept for the "
                               "field's naming).", ge=-1)
    v_weight_decay: Float = _f(0.5, "Weight of ||delta|| / ||v0||² in the loss (ROME/MEMIT's form).", ge=0)
    clamp_norm_factor: Float = _f(4.0, "Clamp ||delta|| to this multiple of the original value's norm.", gt=0)
    kl_factor: Float = _f(0.0625, "Weight of the KL term on '{} is a' that keeps the subject's essence.", ge=0)
    v_early_stop_nll: Float = _f(0.05, "Stop when the target NLL falls below this.", ge=0)
    kl_direction: KLDirection = _f("edited_orig", "Direction of the KL term: edited_orig = KL(P_edited ‖ P_orig) as "
                                                  "in ROME eq. 4 and its code (default); orig_edited = "
                                                  "KL(P_orig ‖ P_edited), what superedit used before 0.2.")
    preserve_factor: Float = _f(0.0, "Weight of the KL term that keeps the model's next-token distribution after "
                                     "prompts about the subject's OTHER attributes (preserve_templates, filled with "
                                     "the request's subject, read at their last token), so an edit of one fact "
                                     "moves its subject's other answers less; 0: off (default, as in ROME/MEMIT).",
                             ge=0)
    preserve_templates: Templates = _f(None, "Prompts for the preservation term, each with one '{}' for the "
                                             "subject; null: superedit's own list "
                                             "(editing.attribute_templates). A prompt whose unedited top token is "
                                             "the request's own answer or its new target is left out for that "
                                             "request (it asks the edited question).")
    preserve_other_kinds: Bool = _f(False, "Leave out, per request, the preservation prompts whose answer is of "
                                           "the same kind as the request's (a country for a citizenship edit: "
                                           "they ask the edited question or a near-synonym of it), before the "
                                           "draw of preserve_n. Needs the request's relation to be a Wikidata "
                                           "property listed in editing.attribute_templates.RELATION_KINDS "
                                           "(CounterFact's, MQuAKE's) and superedit's own templates; otherwise "
                                           "nothing is left out.")
    preserve_n: Int = _f(0, "How many of preserve_templates each request reads (a seeded draw per request, from "
                            "its subject and prompt); 0: all. Each costs one short row per v* step.", ge=0)
    norm_anchor: Float = _f(0.0, "NAS (Norm-Anchor Scaling, Liu et al. 2026): rescale every solved value vector v* "
                                 "(ROME: the edited layer's MLP output; MEMIT, D4S, AlphaEdit: the last edited "
                                 "layer's MLP output plus z's delta) to this norm before the solve; 0: off (default). "
                                 "The paper's anchor is the mean ‖v*‖ of reference edits on the ORIGINAL model: "
                                 "measure it with superedit.editing.methods.anchors.reference_value_norm.", ge=0)


class ROMEHParams(ValueHParams):
    layers: Layers = _f([3], "The single layer ROME edits.")
    mom2_n_tokens: Int = _f(100000, "Corpus tokens for the key covariance C.", ge=1)
    mom2_corpus: PathOrEmpty = _f("", "Corpus for C (path; empty: the testbed's own corpus).")
    mom2_max_length: Int = _f(128, "Max tokens per corpus document for C.", ge=1)
    mom2_ridge: Float = _f(0.0, "Ridge added to C as a fraction of its mean diagonal (0: none).", ge=0)

    @model_validator(mode="after")
    def _one_layer(self) -> "ROMEHParams":
        if len(self.layers) != 1:
            raise ValueError(f"field 'layers' = {self.layers}: ROME edits exactly one layer (give one, e.g. layers: [3])")
        return self


class MEMITHParams(ValueHParams):
    layers: Layers = _f([2, 3, 4], "Layers MEMIT spreads the update over (the residual goes to the last).")
    mom2_update_weight: Float = _f(15000.0, "λ in Δ = R Kᵀ (λC + K Kᵀ)⁻¹.", ge=0)
    mom2_n_tokens: Int = _f(100000, "Corpus tokens for the key covariance C.", ge=1)
    mom2_corpus: PathOrEmpty = _f("", "Corpus for C (path; empty: the testbed's own corpus).")
    mom2_max_length: Int = _f(128, "Max tokens per corpus document for C.", ge=1)
    mom2_ridge: Float = _f(0.0, "Ridge added to C as a fraction of its mean diagonal (0: none); needed where "
                                "C is singular (dead units), or the solve puts huge weights there.", ge=0)

    _check_layers = model_validator(mode="after")(_distinct_layers)


class FTHParams(HParams):
    layers: Layers = _f([3], "Layer(s) whose MLP down-projection is fine-tuned.")
    num_steps: Int = _f(25, "Optimisation steps.", ge=0)
    lr: Float = _f(5e-4, "Adam learning rate.", gt=0)
    weight_decay: Float = _f(0.0, "Adam weight decay.", ge=0)
    norm_constraint: Float = _f(5e-4, "L∞ bound on the change of each weight (the FT-L baseline); 0 disables.", ge=0)
    batch_size: Int = _f(64, "Requests per optimisation batch.", ge=1)
    early_stop_nll: Float = _f(0.01, "Stop when the mean target NLL falls below this.", ge=0)

    _check_layers = model_validator(mode="after")(_distinct_layers)


# ----- lifelong methods (superedit.lifelong) -----
class D4SHParams(MEMITHParams):
    """D4S (Huang et al. 2024): one MEMIT solve over every edit so far, kept as running sums.

    ``W_l = W₀,l + S_rk (λC + S_kk)⁻¹`` with λ = ``mom2_update_weight``. With ``project_nullspace``
    the keys are first projected on the null space of C (AlphaEdit) and λC is replaced by ``L2``·I:
    ``W_l = W₀,l + S_rk P (P S_kk P + L2·I)⁻¹ P``.
    """

    factor: FactorKind = _f("cholesky", "How A = λC + S_kk is kept between steps: cholesky (rank-k factor updates, "
                                        "backward stable) | inverse (Woodbury updates of A⁻¹, fastest).")
    refresh_every: Int = _f(0, "Re-solve from the running sums every N steps to cancel rounding drift (0: never).", ge=0)
    project_nullspace: Bool = _f(False, "Project keys on the null space of C (D4S sums + AlphaEdit projection).")
    nullspace_threshold: Float = _f(1e-2, "Eigenvalues of C below this span the null space (AlphaEdit).", ge=0)
    nullspace_relative: Bool = _f(False, "Read nullspace_threshold relative to C's largest eigenvalue.")
    L2: Float = _f(10.0, "α, the ridge replacing λC when project_nullspace is on (must then be > 0).", ge=0)

    @model_validator(mode="after")
    def _ridge_when_projecting(self) -> "D4SHParams":
        if self.project_nullspace and self.L2 <= 0:
            raise ValueError(f"field 'L2' = {self.L2}: must be > 0 when project_nullspace is on")
        return self


class AlphaEditHParams(MEMITHParams):
    """AlphaEdit (Fang et al. 2025): MEMIT-style updates projected on the null space of C.

    ``Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹`` (``mom2_update_weight`` is not used).
    """

    nullspace_threshold: Float = _f(1e-2, "Eigenvalues of C below this span the null space (paper: 1e-2).", ge=0)
    nullspace_relative: Bool = _f(False, "Read nullspace_threshold relative to C's largest eigenvalue.")
    L2: Float = _f(10.0, "α in (K_p K_pᵀ P + K₁ K₁ᵀ P + α I).", gt=0)


class KeelHParams(AlphaEditHParams):
    """keel (superedit): cumulative least squares in the preserved-knowledge null space.

    ``W_l = W₀,l + S_rk P (P S_kk P + α I)⁻¹ P`` over the running sums of every edit so far (residuals
    against W₀), P the null-space projector of C built as AlphaEdit's (same threshold options);
    ``mom2_update_weight`` is not used. See ``editing.methods.keel``.
    """

    L2: Float = _f(10.0, "α, the ridge in (P S_kk P + α I): how far the joint fit of all edits may move W in C's "
                         "null space (larger: smaller, less exact updates).", gt=0)


class GuardHParams(AlphaEditHParams):
    """guard (superedit): AlphaEdit whose update space also excludes the directions subject keys share.

    The null space of C is cut by the top ``guard_directions`` eigenvectors of the second moment of
    subject keys of ``guard_requests`` (facts that are never evaluated, e.g. a tuning split), read on
    the unedited model; see ``editing.methods.guard``.
    """

    guard_requests: Str = _f("", "Dataset file (JSON/JSONL, any format superedit reads) whose subjects' keys give the "
                                 "shared directions to protect; must be disjoint from what is evaluated (e.g. the "
                                 "tuning split of `superedit data known`). Required.")
    guard_directions: Int = _f(16, "How many top directions of the guard subjects' key second moment are removed "
                                   "from the update space (0: AlphaEdit).", ge=0)
    guard_max_requests: Int = _f(256, "At most this many guard requests are read (the first ones).", ge=1)


class GatedHParams(ROMEHParams):
    """gated (superedit): each edit is a key–value entry at one layer that acts only where the key matches.

    At every token of layer ``layers[0]`` the MLP output gets ``Σ_e 1[max_c cos_C(k, k_e,c) > tau] · δ_e``:
    k the token's key (input of the down-projection), k_e,c the edit's key in context c (its prompt
    with each context prefix and without one), δ_e = v*_e − v₀_e its value change (ROME's v* at that
    layer), cos_C the whitening cosine aᵀC⁻¹b/√(aᵀC⁻¹a · bᵀC⁻¹b). The weights are never changed; see
    ``editing.methods.gated``.
    """

    layers: Layers = _f([2], "The single layer whose MLP output the edits' entries add to (keys read at its "
                             "down-projection input).")
    tau: Float = _f(0.8, "Gate threshold on the whitening cosine between a token's key and an edit's key: the "
                         "edit acts where it is exceeded. Choose it on a tuning split "
                         "(benchmarks/real_model/gate_separation.py).", gt=-1, lt=1)
    mom2_ridge: Float = _f(1e-3, "Ridge added to C as a fraction of its mean diagonal before whitening (C is "
                                 "factorised, so it must be positive definite).", ge=0)
    gate_tokens: Int = _f(1, "How many of the subject's last tokens must match, each at cosine above tau against "
                             "the edit's key at the same offset (as many as the subject has): 1 tests the last "
                             "token only; more tell apart names that end alike (Boeing 737-100 / 737-600). "
                             "Choose it on a tuning split (benchmarks/real_model/gate_tokens.py).", ge=1, le=8)
    tau_before: Float | None = _f(None, "Threshold for the tokens before the subject's last (gate_tokens > 1); "
                                           "None: tau. Their keys vary more with the text before the subject.",
                                     gt=-1, lt=1)

    question_layer: Int | None = _f(None, "Question gate (off: null). An entry then also keeps the key at the "
                                          "LAST token of its prompt at this layer, fires at a token only where that "
                                          "key matches (cos_C > tau_question) and its subject gate (at 'layers') "
                                          "fired earlier in the same text, and adds its value THERE, at this "
                                          "layer's MLP output: an edit reaches the edited question and not the "
                                          "subject's other questions. Must be deeper than 'layers'. Choose it on a "
                                          "tuning split (benchmarks/real_model/relation_keys.py).", ge=0)
    tau_question: Float = _f(0.5, "Threshold of the question gate (question_layer): the whitening cosine between a "
                                  "token's key and the edit prompt's last-token key in any of its contexts.",
                             gt=-1, lt=1)
    boundary_requests: Str = _f("", "Name-boundary test (off: empty). A TUNING request file (any format superedit "
                                    "reads; disjoint from what is evaluated) whose prompts, with their subject "
                                    "spans, train a linear test on the key of the token after a firing token: an "
                                    "entry does not fire at a token whose next token in the same forward continues "
                                    "a name (the entry of 'Adobe Flash' stays out of 'Adobe Flash Player'). Learned "
                                    "on the first step and kept in the state: a resumed or reapplied ledger uses "
                                    "the saved test, whatever this field and boundary_l2 say later (only "
                                    "boundary_threshold is read again). editing.boundary; choose the fields below "
                                    "with benchmarks/real_model/name_boundary.py.")
    boundary_threshold: Float = _f(0.85, "Probability above which the name-boundary test takes the next token to "
                                         "continue the name.", gt=0, lt=1)
    boundary_l2: Float = _f(3e-4, "L2 weight of the name-boundary test's logistic regression.", gt=0)

    @model_validator(mode="after")
    def _one_layer(self) -> "GatedHParams":  # overrides ROME's check, with this method's name in the message
        if len(self.layers) != 1:
            raise ValueError(f"field 'layers' = {self.layers}: gated keeps its entries at exactly one layer "
                             "(give one, e.g. layers: [2])")
        if self.question_layer is not None:
            if self.question_layer <= self.layers[0]:
                raise ValueError(f"field 'question_layer' = {self.question_layer}: the question gate reads a layer "
                                 f"deeper than the subject gate's (layers: {self.layers}); give a larger one or null")
            for name in ("kl_factor", "preserve_factor"):
                if getattr(self, name) > 0:
                    raise ValueError(f"field '{name}' = {getattr(self, name)}: with a question gate the value is "
                                     "added at the question's last token, where those subject-token KL terms do "
                                     f"not apply; set {name}: 0 (the gate keeps the other questions instead)")
        return self

    @model_validator(mode="after")
    def _no_anchor(self) -> "GatedHParams":
        if self.norm_anchor > 0:
            raise ValueError(f"field 'norm_anchor' = {self.norm_anchor}: gated stores each edit's own value change "
                             "and never solves for weights, so a norm anchor does not apply (set it to 0)")
        return self


class UltraEditHParams(HParams):
    """UltraEdit (Gu et al. 2025): a training-free closed form with a lifelong normaliser, no key statistics.

    Per edited layer and step, with keys K (d_mlp, N) and loss gradients G (d_model, N) at the N target
    positions of the batch, standardised by running statistics over every edit so far (k̂, ĝ)::

        R = −lr · ĝ · diag(‖k̂_i‖²)          Δ = R (KᵀK + ridge·I)⁻¹ Kᵀ
    """

    layers: Layers = _f([0], "Layers whose MLP down-projection is edited (all from one forward/backward pass).")
    lr: Float = _f(1e-6, "Step size of the pseudo-values R = −lr · ‖k̂‖² · ĝ (the paper's lr).", gt=0)
    ridge: Float = _f(1.0, "λ in Δ = R (KᵀK + λI)⁻¹ Kᵀ (the paper's code: 1, the identity).", gt=0)
    positions: Literal["target", "all"] = _f("target", "Token positions read: target = those whose next token is a "
                                                       "target token (where the loss gradient lives); all = every "
                                                       "token of prompt + target (the code's 'mask' mode).")
    norm_eps: Float = _f(1.1920928955078125e-07, "ε in k̂ = (k − μ) / (σ + ε) (the code's: float32 machine epsilon).",
                         gt=0)

    _check_layers = model_validator(mode="after")(_distinct_layers)


def load_hparams(cls: type[HParams], method: str, profile: str | None = None, path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> HParams:
    """Defaults for ``(method, profile)`` from the packaged YAML, then ``path``, then ``overrides``.

    ``profile`` is a family (``gpt2``, ``llama`` …) or a testbed size (``testbed-small``). A missing
    packaged file falls back to the model's defaults. Errors name the file a bad value came from.
    """
    data: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if profile:
        packaged = resources.files("superedit") / "configs" / "hparams" / method / f"{profile}.yaml"
        if packaged.is_file():
            layer = _read_yaml(packaged.read_text(encoding="utf-8"), str(packaged))
            data.update(layer)
            origin.update(dict.fromkeys(layer, str(packaged)))
    if path:
        p = Path(path)
        if not p.is_file():
            raise HParamsError(f"--hparams {str(path)!r}: no such file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise HParamsError(f"--hparams {str(path)!r}: cannot read it as UTF-8 text ({exc})") from exc
        layer = _read_yaml(text, str(p))
        data.update(layer)
        origin.update(dict.fromkeys(layer, str(p)))
    data.update(overrides or {})
    origin.update(dict.fromkeys(overrides or {}, "command-line options"))
    sources = list(dict.fromkeys(origin.values())) or [f"{method}/{profile or 'defaults'}"]
    return cls.from_dict(data, source=" + ".join(sources), origin=origin)


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise HParamsError(f"{source}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HParamsError(f"{source}: expected a mapping of field: value, got {type(data).__name__}")
    return data
