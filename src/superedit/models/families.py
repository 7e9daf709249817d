"""The model-family table: the one place that knows where things live inside an HF model.

Every architecture difference superedit cares about is a row of ``FAMILY_TABLE``, keyed by the
HF ``config.model_type``. Paths are dotted attribute paths; block-relative paths are resolved
inside ``blocks[layer]``.

Sites (per block ``l``):
  * ``key``   — input of the MLP down-projection (d_mlp), what ROME/MEMIT call k;
  * ``value`` — output of the MLP down-projection (d_model), the MLP's write to the residual;
  * ``attn``  — output of the attention module (first element if it returns a tuple);
  * ``resid`` — output of the whole block (the residual stream after block ``l``).

Down-projection orientation: ``"out_in"`` for ``nn.Linear`` (weight is (d_model, d_mlp)),
``"in_out"`` for GPT-2's ``Conv1D`` (weight is (d_mlp, d_model)). Code outside ``superedit.models``
only ever sees W as (d_model, d_mlp) with value = W @ key (see ``ModelAdapter.down_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ..errors import UnsupportedFamilyError

Orientation = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class FamilySpec:
    """Module paths and conventions of one model family."""

    embed: str  #: token embedding, from the model root
    blocks: str  #: the ModuleList of transformer blocks, from the model root
    mlp_down: str  #: MLP down-projection, relative to a block (its input is the key)
    attn: str  #: attention module, relative to a block
    final_norm: str  #: final layer norm, from the model root
    lm_head: str  #: unembedding, from the model root
    down_orientation: Orientation  #: how the down-projection weight is stored
    n_layers_attr: str  #: config attribute with the number of blocks
    d_model_attr: str  #: config attribute with the residual width
    #: norm that reads the down-projection's output before it joins the residual, relative to a block
    #: (None: the output is added to the residual as it is). Residual-space targets (MEMIT's spread) are
    #: mapped through its inverse (:mod:`superedit.editing.out_norm`).
    mlp_out_norm: str | None = None


_LLAMA_LIKE = FamilySpec(
    embed="model.embed_tokens",
    blocks="model.layers",
    mlp_down="mlp.down_proj",
    attn="self_attn",
    final_norm="model.norm",
    lm_head="lm_head",
    down_orientation="out_in",
    n_layers_attr="num_hidden_layers",
    d_model_attr="hidden_size",
)

FAMILY_TABLE: dict[str, FamilySpec] = {
    "gpt2": FamilySpec(
        embed="transformer.wte",
        blocks="transformer.h",
        mlp_down="mlp.c_proj",
        attn="attn",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        down_orientation="in_out",
        n_layers_attr="n_layer",
        d_model_attr="n_embd",
    ),
    "gptj": FamilySpec(
        embed="transformer.wte",
        blocks="transformer.h",
        mlp_down="mlp.fc_out",
        attn="attn",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        down_orientation="out_in",
        n_layers_attr="n_layer",
        d_model_attr="n_embd",
    ),
    "gpt_neox": FamilySpec(
        embed="gpt_neox.embed_in",
        blocks="gpt_neox.layers",
        mlp_down="mlp.dense_4h_to_h",
        attn="attention",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",  # "embed_out" before transformers 5
        down_orientation="out_in",
        n_layers_attr="num_hidden_layers",
        d_model_attr="hidden_size",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    # Gemma 3 (text): Llama's module paths. Its block normalises the MLP output
    # (post_feedforward_layernorm) before adding it to the residual, so the "value" site, the
    # down-projection's output, is the MLP's write *before* that norm; embeddings are scaled by
    # √d_model inside ``embed_tokens``.
    "gemma3_text": replace(_LLAMA_LIKE, mlp_out_norm="post_feedforward_layernorm"),
}


def family_of(config) -> tuple[str, FamilySpec]:
    """Return ``(model_type, spec)`` for an HF config, or raise naming the table."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILY_TABLE:
        raise UnsupportedFamilyError(
            f"model family {model_type!r} (config class {type(config).__name__}) is not in "
            f"superedit.models.families.FAMILY_TABLE; supported families: {', '.join(sorted(FAMILY_TABLE))}. "
            "Add a FamilySpec row for it (module paths of embedding, blocks, MLP down-projection, "
            "attention, final norm, LM head and the down-projection weight orientation)."
        )
    return model_type, FAMILY_TABLE[model_type]
