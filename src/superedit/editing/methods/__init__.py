"""Method registry: name → (hparams class, function).

Every method is ``fn(adapter, requests, hparams, stats) -> WeightDelta`` and leaves the model's
weights exactly as it found them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...errors import SupereditError
from ..hparams import FTHParams, HParams, MEMITHParams, ROMEHParams


@dataclass(frozen=True)
class MethodEntry:
    name: str
    hparams_cls: type[HParams]
    fn_path: str  #: "module:function", imported on use
    needs_stats: bool
    description: str

    @property
    def fn(self) -> Callable:
        import importlib

        module, name = self.fn_path.split(":")
        return getattr(importlib.import_module(module), name)


REGISTRY: dict[str, MethodEntry] = {}


def register(entry: MethodEntry) -> None:
    REGISTRY[entry.name] = entry


register(MethodEntry("rome", ROMEHParams, "superedit.editing.methods.rome:rome_delta", True,
                     "Rank-one model editing at one layer (Meng et al. 2022)."))
register(MethodEntry("memit", MEMITHParams, "superedit.editing.methods.memit:memit_delta", True,
                     "Mass-editing over several layers (Meng et al. 2023)."))
register(MethodEntry("ft", FTHParams, "superedit.editing.methods.ft:ft_delta", False,
                     "Fine-tuning one layer's down-projection with an L∞ constraint (FT-L baseline)."))


def get_method(name: str) -> MethodEntry:
    if name not in REGISTRY:
        raise SupereditError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


# lifelong methods (superedit.lifelong); hparams module is torch-free
from ...lifelong.hparams import AlphaEditHParams, D4SHParams  # noqa: E402

register(MethodEntry("d4s", D4SHParams, "superedit.lifelong.d4s:d4s_step", True,
                     "D4S lifelong editing: one MEMIT solve over all edits via running sums (Huang et al. 2024)."))
register(MethodEntry("alphaedit", AlphaEditHParams, "superedit.lifelong.alphaedit:alphaedit_step", True,
                     "AlphaEdit: null-space-projected MEMIT updates for sequential editing (Fang et al. 2025)."))
