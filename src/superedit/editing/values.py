"""Target values v*: what the edited site must output so the model says ``target_new``.

A delta δ (d_model,) is added to ``site`` at ``layer`` at the subject's last token of every
context-prefixed prompt and optimised with Adam on (ROME eq. 4 / MEMIT eq. 16):

    L(δ) = mean_p NLL(target | p + prompt, site += δ)
           + kl_factor · KL(P_δ(· | "{} is a") ‖ P_orig(· | "{} is a"))     at the subject's last token
           + v_weight_decay · ‖δ‖ / ‖v₀‖²           (exactly as ROME's compute_v and MEMIT's compute_z)

(``kl_direction: orig_edited`` swaps the KL's arguments) with ‖δ‖ clamped to ``clamp_norm_factor · ‖v₀‖`` after each step. v₀ is the site's output at the
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


def _logits_at_layer(adapter: ModelAdapter, inputs: dict, edits: dict, loss_layer: int,
                     positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits read through the final norm and LM head from ``loss_layer``'s residual (ROME's v_loss_layer).

    With ``positions`` = (rows, cols) only those positions go through the head: (len(rows), vocab)
    instead of (batch, seq, vocab) — the head is a large share of a small model's compute."""
    last = adapter.n_layers - 1
    layer = last if loss_layer in (-1, last) else loss_layer
    if layer == last and positions is None:
        with Trace(adapter, edits=edits):
            return adapter.model(**inputs).logits
    with Trace(adapter, reads=[("resid", layer)], edits=edits, stop_after=True, detach=False) as tr:
        adapter.model(**inputs)
    h = tr["resid", layer]
    if positions is not None:
        h = h[positions[0], positions[1]]
    return adapter.lm_head()(adapter.final_norm()(h))


def kl_rows_divergence(edited: torch.Tensor, orig: torch.Tensor, direction: str = "edited_orig") -> torch.Tensor:
    """Row-wise KL between log-distributions (rows, vocab) → (rows,).

    ``edited_orig``: KL(P_edited ‖ P_orig) = Σ P_edited (log P_edited − log P_orig), ROME eq. 4 and
    ROME's compute_v (``kl_div(init, current, log_target=True)``); ``orig_edited``: KL(P_orig ‖ P_edited)."""
    if direction == "edited_orig":
        return F.kl_div(orig, edited, log_target=True, reduction="none").sum(-1)
    if direction == "orig_edited":
        return F.kl_div(edited, orig, log_target=True, reduction="none").sum(-1)
    raise ValueError(f"kl_direction must be 'edited_orig' or 'orig_edited', got {direction!r}")


def optimize_value(adapter: ModelAdapter, prompt: str, subject: str, target: str, layer: int, site: str,
                   hp: ValueHParams, prefixes: list[str]) -> ValueResult:
    """Optimise v* for one request (template ``prompt`` with ``{}``) at ``(site, layer)``."""
    return optimize_values(adapter, [(prompt, subject, target)], layer, site, hp, prefixes)[0]


def requests_per_pass(n_prefixes: int, chunk_rows: int = 512) -> int:
    """How many requests :func:`optimize_values` optimises in one pass of at most ``chunk_rows`` prompt rows."""
    return max(1, chunk_rows // max(1, n_prefixes))


def optimize_values(adapter: ModelAdapter, items: list[tuple[str, str, str]], layer: int, site: str,
                    hp: ValueHParams, prefixes: list[str], chunk_rows: int = 512) -> list[ValueResult]:
    """Optimise v* for several requests ``(template, subject, target)`` at once.

    The requests' deltas form one (n, d_model) parameter and every forward pass carries all
    requests' prefixed prompts (n · len(prefixes) rows, in chunks of at most ``chunk_rows``).
    The loss is the SUM of the per-request losses, so each delta gets exactly its own request's
    gradient, and Adam, the norm clamp and the early stop act row by row: the result equals
    optimising each request alone (up to float rounding), at a fraction of the per-step overhead.
    """
    if site not in ("value", "resid"):
        raise ValueError(f"value site must be 'value' (ROME) or 'resid' (MEMIT), got {site!r}")
    if not items:
        return []
    per = requests_per_pass(len(prefixes), chunk_rows)
    if len(items) > per:
        return [r for i in range(0, len(items), per)
                for r in optimize_values(adapter, items[i:i + per], layer, site, hp, prefixes, chunk_rows)]
    device = adapter.device
    tok = adapter.tokenizer
    n, n_pre = len(items), len(prefixes)
    filled = [fill_template(pre + prompt, subject) for prompt, subject, _ in items for pre in prefixes]
    targets = [target for _, _, target in items for _ in prefixes]
    rw = encode_prompt_target(tok, [f[0] for f in filled], targets,
                              subject_spans=[(f[1], f[2]) for f in filled], device=device)
    mask, labels = rw.loss_mask()
    tgt_rows, tgt_cols = torch.nonzero(mask, as_tuple=True)  # every position that predicts a target token
    tgt_labels = labels[tgt_rows, tgt_cols]
    owner = torch.arange(n, device=device).repeat_interleave(n_pre)  # request of each row
    row_len = mask.sum(1)
    kl = encode_prompts(tok, KL_TEMPLATES * n, [subject for _, subject, _ in items for _ in KL_TEMPLATES],
                        padding_side="right", device=device)
    kl_owner = torch.arange(n, device=device).repeat_interleave(len(KL_TEMPLATES))
    kl_rows = torch.arange(len(kl_owner), device=device)
    kl_idx = torch.tensor(kl.subject_last, device=device)

    with torch.no_grad():
        with Trace(adapter, reads=[(site, layer)]) as tr:
            adapter.model(**rw.model_inputs())
        first = torch.arange(n, device=device) * n_pre  # each request's unprefixed row ("" comes first)
        v0 = tr[site, layer][first, torch.tensor(rw.subject_last, device=device)[first]].detach().clone()
        kl_ref = F.log_softmax(_logits_at_layer(adapter, kl.model_inputs(), {}, -1)[kl_rows, kl_idx], dim=-1)

    delta = torch.zeros_like(v0, requires_grad=True)  # (n, d_model)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    v0_norm = v0.norm(dim=1)
    max_norm = hp.clamp_norm_factor * v0_norm
    histories: list[list[float]] = [[] for _ in range(n)]
    steps = [0] * n
    active = torch.ones(n, dtype=torch.bool, device=device)
    for step in range(hp.v_num_grad_steps):
        opt.zero_grad()
        edits = {(site, layer): add_at_positions(rw.subject_last, delta[owner])}
        logits = _logits_at_layer(adapter, rw.model_inputs(), edits, hp.v_loss_layer, (tgt_rows, tgt_cols))
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tgt_labels.unsqueeze(-1)).squeeze(-1)
        row_nll = torch.zeros(len(row_len), device=device, dtype=logp.dtype).index_add(0, tgt_rows, -logp) / row_len
        nll = torch.zeros(n, device=device, dtype=row_nll.dtype).index_add(0, owner, row_nll) / n_pre
        loss = nll + hp.v_weight_decay * delta.norm(dim=1) / v0_norm ** 2
        if hp.kl_factor > 0:
            kl_edits = {(site, layer): add_at_positions(kl.subject_last, delta[kl_owner])}
            cur = F.log_softmax(_logits_at_layer(adapter, kl.model_inputs(), kl_edits, -1)[kl_rows, kl_idx], dim=-1)
            kl_rowwise = kl_rows_divergence(cur, kl_ref, hp.kl_direction)
            kl_req = torch.zeros(n, device=device, dtype=kl_rowwise.dtype).index_add(0, kl_owner, kl_rowwise)
            loss = loss + hp.kl_factor * kl_req / len(KL_TEMPLATES)
        nll_now = nll.detach()
        for i in torch.nonzero(active).flatten().tolist():
            histories[i].append(float(nll_now[i]))
            steps[i] = step + 1
        active &= nll_now >= hp.v_early_stop_nll
        if not bool(active.any()):
            break
        (loss * active).sum().backward()
        frozen = delta.detach()[~active].clone()
        opt.step()
        with torch.no_grad():
            delta[~active] = frozen  # finished requests keep the delta they stopped at
            norms = delta.norm(dim=1)
            over = norms > max_norm
            delta[over] *= (max_norm[over] / norms[over]).unsqueeze(1)
    delta = delta.detach()
    return [ValueResult(target=v0[i] + delta[i], init=v0[i], delta=delta[i].clone(), nll_history=histories[i],
                        steps=steps[i]) for i in range(n)]
