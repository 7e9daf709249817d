"""Hyperparameters as validated dataclasses, loaded from YAML.

Defaults live in ``superedit/configs/hparams/<method>/<family-or-testbed-size>.yaml``; a
``--hparams FILE`` overrides them field by field. Every field carries help text in its metadata.
Names follow the literature (ROME/MEMIT code): layers, v_num_grad_steps, v_lr, v_loss_layer,
v_weight_decay, clamp_norm_factor, kl_factor, mom2_update_weight, mom2_n_tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import SupereditError


class HParamsError(SupereditError):
    pass


KL_DIRECTIONS = ("edited_orig", "orig_edited")


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class HParams:
    """Base: YAML loading, validation, help text."""

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "HParams":
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise HParamsError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; valid fields: {sorted(names)}")
        kwargs = {}
        for key, value in data.items():
            default = names[key].default if names[key].default is not dataclasses.MISSING else names[key].default_factory()
            kwargs[key] = _coerce(value, default, key, source)
        obj = cls(**kwargs)
        obj.validate(source)
        return obj

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "HParams":
        obj = dataclasses.replace(self, **changes)
        obj.validate("<replace>")
        return obj

    def validate(self, source: str = "<hparams>") -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(("_steps", "_n_tokens", "num_steps", "batch_size", "n_prefixes")) and isinstance(v, int) and v < 0:
                raise HParamsError(f"{source}: {f.name} must be ≥ 0 (got {v})")
            if f.name in ("v_lr", "lr", "clamp_norm_factor") and v <= 0:
                raise HParamsError(f"{source}: {f.name} must be > 0 (got {v})")
        layers = getattr(self, "layers", None)
        if layers is not None and (not layers or any(not isinstance(l, int) or l < 0 for l in layers)):
            raise HParamsError(f"{source}: layers must be a non-empty list of layer indices ≥ 0 (got {layers})")


def _coerce(value, default, key, source):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise HParamsError(f"{source}: field {key!r} must be true/false (got {value!r})")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise HParamsError(f"{source}: field {key!r} must be a number (got {value!r})")
        return type(default)(value) if isinstance(default, float) else (int(value) if float(value).is_integer() else value)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise HParamsError(f"{source}: field {key!r} must be a list (got {value!r})")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise HParamsError(f"{source}: field {key!r} must be a string (got {value!r})")
    return value


@dataclass
class ContextHParams(HParams):
    """How keys and values are averaged over context prefixes (ROME's context templates)."""

    context_lengths: list = _f([5, 10], "Token lengths of generated context prefixes (one group per length).")
    n_prefixes: int = _f(5, "Prefixes generated per length (plus the empty prefix).")
    fact_token: str = _f("subject_last", "Where the key is read: subject_last | subject_first | last.")
    seed: int = _f(0, "Seed for generated prefixes.")


@dataclass
class ValueHParams(ContextHParams):
    """Optimisation of the target value v* (ROME's compute_v / MEMIT's compute_z)."""

    v_num_grad_steps: int = _f(20, "Gradient steps for the value delta.")
    v_lr: float = _f(0.5, "Adam learning rate of the value delta.")
    v_loss_layer: int = _f(-1, "Layer whose output feeds the loss (-1: the model's last layer; kept for the field's naming).")
    v_weight_decay: float = _f(0.5, "Weight of ||delta|| / ||v0||² in the loss (ROME/MEMIT's form).")
    clamp_norm_factor: float = _f(4.0, "Clamp ||delta|| to this multiple of the original value's norm.")
    kl_factor: float = _f(0.0625, "Weight of the KL term on '{} is a' that keeps the subject's essence.")
    v_early_stop_nll: float = _f(0.05, "Stop when the target NLL falls below this.")
    kl_direction: str = _f("edited_orig", "Direction of the KL term: edited_orig = KL(P_edited ‖ P_orig) as in ROME "
                                          "eq. 4 and its code (default); orig_edited = KL(P_orig ‖ P_edited), "
                                          "what superedit used before 0.2.")

    def validate(self, source="<hparams>"):
        super().validate(source)
        if self.kl_direction not in KL_DIRECTIONS:
            raise HParamsError(f"{source}: kl_direction must be one of {KL_DIRECTIONS} (got {self.kl_direction!r})")


@dataclass
class ROMEHParams(ValueHParams):
    layers: list = _f([3], "The single layer ROME edits.")
    mom2_n_tokens: int = _f(100000, "Corpus tokens for the key covariance C.")
    mom2_corpus: str = _f("", "Corpus for C (path; empty: the testbed's own corpus).")
    mom2_max_length: int = _f(128, "Max tokens per corpus document for C.")
    mom2_ridge: float = _f(0.0, "Ridge added to C as a fraction of its mean diagonal (0: none).")

    def validate(self, source="<hparams>"):
        super().validate(source)
        if len(self.layers) != 1:
            raise HParamsError(f"{source}: ROME edits exactly one layer; got layers={self.layers}")


@dataclass
class MEMITHParams(ValueHParams):
    layers: list = _f([2, 3, 4], "Layers MEMIT spreads the update over (the residual goes to the last).")
    mom2_update_weight: float = _f(15000.0, "λ in Δ = R Kᵀ (λC + K Kᵀ)⁻¹.")
    mom2_n_tokens: int = _f(100000, "Corpus tokens for the key covariance C.")
    mom2_corpus: str = _f("", "Corpus for C (path; empty: the testbed's own corpus).")
    mom2_max_length: int = _f(128, "Max tokens per corpus document for C.")
    mom2_ridge: float = _f(0.0, "Ridge added to C as a fraction of its mean diagonal (0: none); needed where "
                           "C is singular (dead units), or the solve puts huge weights there.")


@dataclass
class FTHParams(HParams):
    layers: list = _f([3], "Layer(s) whose MLP down-projection is fine-tuned.")
    num_steps: int = _f(25, "Optimisation steps.")
    lr: float = _f(5e-4, "Adam learning rate.")
    weight_decay: float = _f(0.0, "Adam weight decay.")
    norm_constraint: float = _f(5e-4, "L∞ bound on the change of each weight (the FT-L baseline); 0 disables.")
    batch_size: int = _f(64, "Requests per optimisation batch.")
    early_stop_nll: float = _f(0.01, "Stop when the mean target NLL falls below this.")


# ----- lifelong methods (superedit.lifelong) -----
FACTOR_KINDS = ("cholesky", "inverse")


@dataclass
class D4SHParams(MEMITHParams):
    """D4S (Huang et al. 2024): one MEMIT solve over every edit so far, kept as running sums.

    ``W_l = W₀,l + S_rk (λC + S_kk)⁻¹`` with λ = ``mom2_update_weight``. With ``project_nullspace``
    the keys are first projected on the null space of C (AlphaEdit) and λC is replaced by ``L2``·I:
    ``W_l = W₀,l + S_rk P (P S_kk P + L2·I)⁻¹ P``.
    """

    factor: str = _f("cholesky", "How A = λC + S_kk is kept between steps: cholesky (rank-k factor updates, "
                                 "backward stable) | inverse (Woodbury updates of A⁻¹, fastest).")
    refresh_every: int = _f(0, "Re-solve from the running sums every N steps to cancel rounding drift (0: never).")
    project_nullspace: bool = _f(False, "Project keys on the null space of C (D4S sums + AlphaEdit projection).")
    nullspace_threshold: float = _f(1e-2, "Eigenvalues of C below this span the null space (AlphaEdit).")
    nullspace_relative: bool = _f(False, "Read nullspace_threshold relative to C's largest eigenvalue.")
    L2: float = _f(10.0, "α, the ridge replacing λC when project_nullspace is on.")

    def validate(self, source="<hparams>"):
        super().validate(source)
        if self.factor not in FACTOR_KINDS:
            raise HParamsError(f"{source}: factor must be one of {FACTOR_KINDS} (got {self.factor!r})")
        if self.refresh_every < 0:
            raise HParamsError(f"{source}: refresh_every must be ≥ 0 (got {self.refresh_every})")
        if self.project_nullspace and self.L2 <= 0:
            raise HParamsError(f"{source}: L2 must be > 0 when project_nullspace is on (got {self.L2})")


@dataclass
class AlphaEditHParams(MEMITHParams):
    """AlphaEdit (Fang et al. 2025): MEMIT-style updates projected on the null space of C.

    ``Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹`` (``mom2_update_weight`` is not used).
    """

    nullspace_threshold: float = _f(1e-2, "Eigenvalues of C below this span the null space (paper: 1e-2).")
    nullspace_relative: bool = _f(False, "Read nullspace_threshold relative to C's largest eigenvalue.")
    L2: float = _f(10.0, "α in (K_p K_pᵀ P + K₁ K₁ᵀ P + α I).")

    def validate(self, source="<hparams>"):
        super().validate(source)
        if self.L2 <= 0:
            raise HParamsError(f"{source}: L2 must be > 0 (got {self.L2})")
        if self.nullspace_threshold < 0:
            raise HParamsError(f"{source}: nullspace_threshold must be ≥ 0 (got {self.nullspace_threshold})")


def load_hparams(cls: type[HParams], method: str, profile: str | None = None, path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> HParams:
    """Defaults for ``(method, profile)`` from the packaged YAML, then ``path``, then ``overrides``.

    ``profile`` is a family (``gpt2``, ``llama`` …) or a testbed size (``testbed-small``). A missing
    packaged file falls back to the dataclass defaults.
    """
    data: dict[str, Any] = {}
    if profile:
        packaged = resources.files("superedit") / "configs" / "hparams" / method / f"{profile}.yaml"
        if packaged.is_file():
            data.update(_read_yaml(packaged.read_text(), str(packaged)))
    if path:
        p = Path(path)
        if not p.is_file():
            raise HParamsError(f"--hparams {str(path)!r}: no such file")
        data.update(_read_yaml(p.read_text(), str(p)))
    data.update(overrides or {})
    return cls.from_dict(data, source=str(path or f"{method}/{profile}"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise HParamsError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise HParamsError(f"{source}: expected a mapping of field: value, got {type(data).__name__}")
    return data
