"""ModelAdapter: a model + tokenizer seen through its FamilySpec.

Code outside ``superedit.models`` uses the adapter instead of touching module paths, so adding a
model family is one row in ``FAMILY_TABLE``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .families import FamilySpec, family_of

SITES = ("resid", "attn", "key", "value")


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


@dataclass
class ModelAdapter:
    """A causal LM, its tokenizer and its family spec.

    Attributes:
        model: the HF ``*ForCausalLM`` module.
        tokenizer: its fast tokenizer (``pad_token`` is always set).
        source: where it was loaded from (path, hub id or ``builtin:SIZE``).
        revision: hub revision or local content hash, part of every statistics cache key.
    """

    model: Any
    tokenizer: Any
    source: str = "<in-memory>"
    revision: str | None = None
    family: str = field(init=False)
    spec: FamilySpec = field(init=False)
    #: values derived once from this model and reused for its lifetime, keyed by what they depend
    #: on (e.g. ROME's context prefixes, :func:`superedit.editing.contexts.context_prefixes`)
    memo: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.family, self.spec = family_of(self.model.config)
        if self.tokenizer is not None and self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # ----- sizes -------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(getattr(self.config, self.spec.n_layers_attr))

    @property
    def d_model(self) -> int:
        return int(getattr(self.config, self.spec.d_model_attr))

    @property
    def d_mlp(self) -> int:
        """Size of the key: the input width of the MLP down-projection."""
        return self.down_weight(0).shape[1]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's device (with a ``--device-map`` the model's parts may sit
        on several devices; a tensor that meets layer l's weights goes to :meth:`layer_device` instead)."""
        w = getattr(self.embedding(), "weight", None)
        return w.device if isinstance(w, torch.Tensor) else next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def layer_device(self, layer: int) -> torch.device:
        """The device of layer ``layer``'s down-projection weight: keys, values, covariances and solves of
        that layer gather here. Raises UsageError when the weight is offloaded (meta/disk): superedit
        edits weights in place, so every edited layer must be resident on a device."""
        dev = self.down_weight_param(layer).device
        if dev.type == "meta":
            from ..errors import UsageError

            raise UsageError(f"layer {layer}'s down-projection is offloaded (its weight is on the meta device): "
                             "superedit edits weights in place; give --device-map devices with room for it "
                             "(no 'disk' or CPU offload of edited layers) or edit other --layers")
        return dev

    def layer_dtype(self, layer: int) -> torch.dtype:
        """The dtype of layer ``layer``'s down-projection weight (float64 solves are cast back to it)."""
        return self.down_weight_param(layer).dtype

    def on_layer(self, layer: int, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` moved to :meth:`layer_device` (and ``dtype`` if given); no copy when already there."""
        return t.to(device=self.layer_device(layer), dtype=dtype or t.dtype)

    @property
    def max_positions(self) -> int:
        """The longest input in tokens: the config's position limit (2048 when it names none)."""
        for name in ("n_positions", "max_position_embeddings", "n_ctx"):
            v = getattr(self.config, name, None)
            if isinstance(v, int) and v > 0:
                return v
        return 2048

    # ----- modules -----------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        return get_submodule(self.model, self.spec.blocks)

    def block(self, layer: int) -> nn.Module:
        self.check_layer(layer)
        return self.blocks()[layer]

    def down_proj(self, layer: int) -> nn.Module:
        return get_submodule(self.block(layer), self.spec.mlp_down)

    def mlp_out_norm(self, layer: int) -> nn.Module | None:
        """The norm that reads the down-projection's output before the residual (the family table's
        ``mlp_out_norm``), or None where the output is added to the residual as it is."""
        if self.spec.mlp_out_norm is None:
            return None
        return get_submodule(self.block(layer), self.spec.mlp_out_norm)

    def attn(self, layer: int) -> nn.Module:
        return get_submodule(self.block(layer), self.spec.attn)

    def embedding(self) -> nn.Module:
        return get_submodule(self.model, self.spec.embed)

    def final_norm(self) -> nn.Module:
        return get_submodule(self.model, self.spec.final_norm)

    def lm_head(self) -> nn.Module:
        return get_submodule(self.model, self.spec.lm_head)

    def site_module(self, site: str, layer: int) -> nn.Module:
        """The module whose output (or, for ``key``, input) is ``site`` at ``layer``."""
        if site == "resid":
            return self.block(layer)
        if site == "attn":
            return self.attn(layer)
        if site in ("key", "value"):
            return self.down_proj(layer)
        raise ValueError(f"unknown site {site!r}; expected one of {SITES}")

    def site_paths(self) -> dict[str, str]:
        """Dotted module paths, with ``{l}`` for the layer index (for ``superedit info``)."""
        b = self.spec.blocks
        return {
            "embedding": self.spec.embed,
            "blocks": b,
            "resid": f"{b}.{{l}}",
            "attn": f"{b}.{{l}}.{self.spec.attn}",
            "key": f"{b}.{{l}}.{self.spec.mlp_down} (input)",
            "value": f"{b}.{{l}}.{self.spec.mlp_down} (output)",
            "final_norm": self.spec.final_norm,
            "lm_head": self.spec.lm_head,
            "down_orientation": self.spec.down_orientation,
            **({"mlp_out_norm": f"{b}.{{l}}.{self.spec.mlp_out_norm}"} if self.spec.mlp_out_norm else {}),
        }

    def check_layer(self, layer: int) -> None:
        n = len(get_submodule(self.model, self.spec.blocks))
        if not isinstance(layer, int) or not 0 <= layer < n:
            from ..errors import LayerRangeError

            raise LayerRangeError(f"layer {layer!r} is out of range: this model has layers 0..{n - 1}")

    # ----- the edited weight ---------------------------------------------------------------
    def down_weight_param(self, layer: int) -> nn.Parameter:
        return self.down_proj(layer).weight

    def down_weight(self, layer: int) -> torch.Tensor:
        """W of shape (d_model, d_mlp) with value = W @ key (a view, no copy)."""
        w = self.down_weight_param(layer)
        return w.T if self.spec.down_orientation == "in_out" else w

    def down_bias(self, layer: int) -> torch.Tensor | None:
        """b (d_model,) of the down-projection (value = W @ key + b), or None when it has no bias."""
        return getattr(self.down_proj(layer), "bias", None)

    @torch.no_grad()
    def add_to_down_weight(self, layer: int, delta: torch.Tensor) -> None:
        """W += delta, with delta in (d_model, d_mlp) orientation."""
        w = self.down_weight(layer)
        if tuple(delta.shape) != tuple(w.shape):
            raise ValueError(f"delta shape {tuple(delta.shape)} != W shape {tuple(w.shape)} at layer {layer}")
        w.add_(delta.to(device=w.device, dtype=w.dtype))

    @torch.no_grad()
    def set_down_weight(self, layer: int, new: torch.Tensor) -> None:
        w = self.down_weight(layer)
        w.copy_(new.to(device=w.device, dtype=w.dtype))

    # ----- identity ----------------------------------------------------------------------
    def identity(self) -> dict[str, str]:
        """What identifies this model's weights for cache keys: source, revision, config hash."""
        cfg = self.config.to_dict()
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
            cfg.pop(k, None)
        cfg_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"source": str(self.source), "revision": str(self.revision), "config_hash": cfg_hash,
                "family": self.family}
