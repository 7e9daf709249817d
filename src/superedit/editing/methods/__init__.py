"""Method registry: name → what the method needs and can do, and where its function lives.

Every method follows one protocol (:mod:`.protocol`)::

    fn(adapter, requests, hparams, stats, state=None) -> StepResult

Code elsewhere never branches on a method's name: it reads the entry's capabilities.

* ``needs_stats``: the method solves with C = E[k kᵀ] (a covariance source must be passed);
* ``state``: "module:factory" of the method's running state (``factory(adapter, hparams, stats, base)``),
  None for methods that edit the model as it is with nothing carried between calls;
* ``undo``: which edits a ledger can take out exactly — "any" (the state is a sum over edits and
  determines W − W₀: remove one edit's terms) or "last" (subtract the last applied increment);
* ``rank_one``: "per_request" (each request's increment is rank one at one layer with right factor
  C⁻¹k*, whatever the batch: ROME), "per_call" (so is a call with ONE request: MEMIT, since
  (λC + kkᵀ)⁻¹k ∝ C⁻¹k), or None;
* ``forward``: "module:function" that makes the model compute with the method's state
  (``install(adapter, state)``) — for a method whose edits live in its state, not in the weights
  (``gated``: key–value entries behind a gate). Its deltas are zero, so it runs only through a ledger
  (``superedit lifelong``, ``superedit edit --sequential``), which installs the state after every commit;
  commands that apply bare weight deltas refuse it (:meth:`MethodEntry.require_weight_edits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from ...errors import SupereditError
from ..hparams import (AlphaEditHParams, D4SHParams, FTHParams, GatedHParams, GuardHParams, HParams, KeelHParams,
                       MEMITHParams, ROMEHParams, UltraEditHParams)


def _load(path: str) -> Callable:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class MethodEntry:
    name: str
    hparams_cls: type[HParams]
    fn_path: str  #: "module:function", imported on use
    needs_stats: bool
    description: str
    state: str | None = None  #: "module:factory" of the running state, None: stateless
    undo: Literal["any", "last"] = "last"
    rank_one: Literal["per_request", "per_call"] | None = None
    forward: str | None = None  #: "module:function" installing the state on the model; None: edits are weights

    @property
    def fn(self) -> Callable:
        return _load(self.fn_path)

    @property
    def stateful(self) -> bool:
        return self.state is not None

    def make_state(self, adapter, hparams, stats=None, base=None):
        """A fresh state for a run whose base weights are ``base`` (layer → W₀; default: the adapter's);
        None for a stateless method."""
        if self.state is None:
            return None
        if self.needs_stats and stats is None and self.forward is None:  # a forward state keeps its own C factor
            raise SupereditError(f"method {self.name!r} keeps a state built from the key covariance: pass stats")
        return _load(self.state)(adapter, hparams, stats, base)

    def install(self, adapter, state) -> None:
        """Make ``adapter``'s model compute with ``state`` (methods with the ``forward`` capability)."""
        if self.forward is None:
            raise SupereditError(f"method {self.name!r} edits weights; it has no state to install")
        _load(self.forward)(adapter, state)

    def require_weight_edits(self, where: str) -> None:
        """Refuse (clearly) to run a method whose edits are not weight deltas where only deltas are applied."""
        if self.forward is not None:
            raise SupereditError(f"method {self.name!r} keeps its edits in a state that acts on the forward pass "
                                 f"(its weight delta is zero), so {where} cannot apply it; run it through a ledger: "
                                 "`superedit lifelong` or `superedit edit --sequential`")

    def rank_one_edits(self, hparams, batch_size: int) -> bool:
        """True when every request's increment is rank one at a single layer with right factor ∝ C⁻¹k*
        (what the interference identity of ``superedit.lifelong.interference`` needs)."""
        if len(list(getattr(hparams, "layers", []) or [])) != 1:
            return False
        return self.rank_one == "per_request" or (self.rank_one == "per_call" and batch_size == 1)


REGISTRY: dict[str, MethodEntry] = {}


def register(entry: MethodEntry) -> None:
    REGISTRY[entry.name] = entry


def get_method(name: str) -> MethodEntry:
    if name not in REGISTRY:
        raise SupereditError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


_M = "superedit.editing.methods"
register(MethodEntry("rome", ROMEHParams, f"{_M}.rome:rome_delta", True,
                     "Rank-one model editing at one layer (Meng et al. 2022).", rank_one="per_request"))
register(MethodEntry("memit", MEMITHParams, f"{_M}.memit:memit_delta", True,
                     "Mass-editing over several layers (Meng et al. 2023).", rank_one="per_call"))
register(MethodEntry("ft", FTHParams, f"{_M}.ft:ft_delta", False,
                     "Fine-tuning one layer's down-projection with an L∞ constraint (FT-L baseline)."))
register(MethodEntry("d4s", D4SHParams, f"{_M}.d4s:d4s_step", True,
                     "D4S lifelong editing: one MEMIT solve over all edits via running sums (Huang et al. 2024).",
                     state=f"{_M}.d4s:make_d4s_state", undo="any"))
register(MethodEntry("alphaedit", AlphaEditHParams, f"{_M}.alphaedit:alphaedit_step", True,
                     "AlphaEdit: null-space-projected MEMIT updates for sequential editing (Fang et al. 2025).",
                     state=f"{_M}.alphaedit:make_alphaedit_state"))
register(MethodEntry("ultraedit", UltraEditHParams, f"{_M}.ultraedit:ultraedit_step", False,
                     "UltraEdit: closed-form edits from hidden states and gradients under a lifelong normaliser, "
                     "no key statistics (Gu et al. 2025).", state=f"{_M}.ultraedit:make_ultraedit_state"))
register(MethodEntry("keel", KeelHParams, f"{_M}.keel:keel_step", True,
                     "keel (superedit): all edits so far as one least-squares solve against the original weights in "
                     "the null space of the preserved keys' covariance (AlphaEdit's fixed point; undo of any edit).",
                     state=f"{_M}.keel:make_keel_state", undo="any"))
register(MethodEntry("guard", GuardHParams, f"{_M}.guard:guard_step", True,
                     "guard (superedit): AlphaEdit whose update space also excludes the top directions shared by "
                     "subject keys (from guard_requests, never evaluated), where interference adds up over a stream.",
                     state=f"{_M}.guard:make_guard_state"))
register(MethodEntry("gated", GatedHParams, f"{_M}.gated:gated_step", True,
                     "gated (superedit): each edit a key–value entry at one layer that acts only where a token's key "
                     "matches the edit's subject key (whitening cosine above tau), and with question_layer only at the "
                     "token that asks the edited question; weights never change.",
                     state=f"{_M}.gated:make_gated_state", undo="any", forward=f"{_M}.gated:install_memory"))
