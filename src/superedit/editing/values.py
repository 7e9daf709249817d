"""Target values v*: what the edited site must output so the model says ``target_new``.

A delta δ (d_model,) is added to ``site`` at ``layer`` at the subject's last token of every
context-prefixed prompt and optimised with Adam on (ROME eq. 4 / MEMIT eq. 16):

    L(δ) = mean_p NLL(target | p + prompt, site += δ)
           + kl_factor · KL(P_orig(· | "{} is a") ‖ P_δ(· | "{} is a"))     at the subject's last token
           + v_weight_decay · ‖δ‖ / ‖v₀‖²           (exactly as ROME's compute_v and MEMIT's compute_z)

with ‖δ‖ clamped to ``clamp_norm_factor · ‖v₀‖`` after each step. v₀ is the site's output at the
subject's last token of the unprefixed prompt and v* = v₀ + δ.
ROME optimises the MLP output ("value"); MEMIT the residual stream after its last layer ("resid").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..models import ModelAdapter, Trace, encode_prompt_target, encode_prompts
from ..models.hooks import add_at_positions
from ..models.positions import fill_template
from .hparams import ValueHParams

KL_TEMPLATES = ["{} is a"]


@dataclass
class ValueResult:
    target: torch.Tensor  #: v* = v0 + delta, (d_model,)
    init: torch.Tensor  #: v0
    delta: torch.Tensor
    nll_history: list[float] = field(default_factory=list)
    steps: int = 0

    @property
    def final_nll(self) -> float:
        return self.nll_history[-1] if self.nll_history else float("nan")

    def summary(self) -> dict:
        return {"v_init_norm": float(self.init.norm()), "v_delta_norm": float(self.delta.norm()),
                "v_target_norm": float(self.target.norm()), "v_steps": self.steps,
                "v_nll_start": self.nll_history[0] if self.nll_history else None, "v_nll_end": self.final_nll}


def _logits_at_layer(adapter: ModelAdapter, inputs: dict, edits: dict, loss_layer: int) -> torch.Tensor:
    """Logits, read through the final norm and LM head from ``loss_layer``'s residual (ROME's v_loss_layer)."""
    last = adapter.n_layers - 1
    layer = last if loss_layer in (-1, last) else loss_layer
    if layer == last:
        with Trace(adapter, edits=edits):
            return adapter.model(**inputs).logits
    with Trace(adapter, reads=[("resid", layer)], edits=edits, stop_after=True, detach=False) as tr:
        adapter.model(**inputs)
    return adapter.lm_head()(adapter.final_norm()(tr["resid", layer]))


def optimize_value(adapter: ModelAdapter, prompt: str, subject: str, target: str, layer: int, site: str,
                   hp: ValueHParams, prefixes: list[str]) -> ValueResult:
    """Optimise v* for one request (template ``prompt`` with ``{}``) at ``(site, layer)``."""
    if site not in ("value", "resid"):
        raise ValueError(f"value site must be 'value' (ROME) or 'resid' (MEMIT), got {site!r}")
    device = adapter.device
    tok = adapter.tokenizer
    filled = [fill_template(pre + prompt, subject) for pre in prefixes]  # (prompt, start, end): exact subject span
    rw = encode_prompt_target(tok, [f[0] for f in filled], [target] * len(filled),
                              subject_spans=[(f[1], f[2]) for f in filled], device=device)
    mask, labels = rw.loss_mask()
    kl = encode_prompts(tok, KL_TEMPLATES, [subject] * len(KL_TEMPLATES), padding_side="right", device=device)
    kl_rows = torch.arange(len(KL_TEMPLATES), device=device)
    kl_idx = torch.tensor(kl.subject_last, device=device)

    with torch.no_grad():
        with Trace(adapter, reads=[(site, layer)]) as tr:
            adapter.model(**rw.model_inputs())
        v0 = tr[site, layer][0, rw.subject_last[0]].detach().clone()
        kl_ref = F.log_softmax(_logits_at_layer(adapter, kl.model_inputs(), {}, -1)[kl_rows, kl_idx], dim=-1)

    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    max_norm = hp.clamp_norm_factor * v0.norm()
    history: list[float] = []
    steps = 0
    for step in range(hp.v_num_grad_steps):
        steps = step + 1
        opt.zero_grad()
        edits = {(site, layer): add_at_positions(rw.subject_last, delta)}
        logits = _logits_at_layer(adapter, rw.model_inputs(), edits, hp.v_loss_layer)
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        nll = (-(logp * mask).sum(1) / mask.sum(1)).mean()
        loss = nll + hp.v_weight_decay * delta.norm() / v0.norm() ** 2
        if hp.kl_factor > 0:
            kl_edits = {(site, layer): add_at_positions(kl.subject_last, delta)}
            cur = F.log_softmax(_logits_at_layer(adapter, kl.model_inputs(), kl_edits, -1)[kl_rows, kl_idx], dim=-1)
            loss = loss + hp.kl_factor * F.kl_div(cur, kl_ref, log_target=True, reduction="batchmean")
        history.append(float(nll.detach()))
        if history[-1] < hp.v_early_stop_nll:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            n = delta.norm()
            if n > max_norm:
                delta.mul_(max_norm / n)
    delta = delta.detach()
    return ValueResult(target=v0 + delta, init=v0, delta=delta, nll_history=history, steps=steps)
