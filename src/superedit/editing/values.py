"""Target values v*: what the edited site must output so the model says ``target_new``.

A delta δ (d_model,) is added to ``site`` at ``layer`` at the subject's last token of every
context-prefixed prompt and optimised with Adam on (ROME eq. 4 / MEMIT eq. 16):

    L(δ) = mean_p NLL(target | p + prompt, site += δ)
           + kl_factor · KL(P_δ(· | "{} is a") ‖ P_orig(· | "{} is a"))     at the subject's last token
           + v_weight_decay · ‖δ‖ / ‖v₀‖²           (exactly as ROME's compute_v and MEMIT's compute_z)

(``kl_direction: orig_edited`` swaps the KL's arguments) with ‖δ‖ clamped to ``clamp_norm_factor · ‖v₀‖`` after each step. v₀ is the site's output at the
subject's last token of the unprefixed prompt and v* = v₀ + δ.
ROME optimises the MLP output ("value"); MEMIT the residual stream after its last layer ("resid").

What a step computes (:func:`optimize_values`): nothing below the edited layer depends on δ, so
the input of block ``layer`` is read once per row (no autograd) and every step resumes the forward
there (:class:`~superedit.models.hooks.StartAt`); the final norm and LM head run only at the
positions the loss reads (target positions, the KL token); a request whose NLL fell below
``v_early_stop_nll`` keeps the δ it stopped at and its rows leave the batch. The result equals the
plain computation (every row through the whole model every step) to float rounding
(tests/test_values_speed.py keeps that computation as the specification).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..models import ModelAdapter, Trace, encode_prompt_target, encode_prompts
from ..models.hooks import StartAt, add_at_positions
from ..models.positions import fill_template
from .hparams import ValueHParams

KL_TEMPLATES = ["{} is a"]

log = logging.getLogger(__name__)


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


def requests_per_pass(n_prefixes: int, chunk_rows: int = 512) -> int:
    """How many requests :func:`optimize_values` optimises in one pass of at most ``chunk_rows`` prompt rows."""
    return max(1, chunk_rows // max(1, n_prefixes))


@dataclass
class _Rows:
    """Prompt rows forwarded together, and the positions whose logits the loss reads.

    Shapes: ``input_ids``/``attention_mask`` (rows, seq); ``subject_last``, ``owner`` (rows,) — where δ
    is added and which request's δ; ``hidden`` (rows, seq, d_model), the cached input of the edited
    block (None: forward from the embeddings); ``read_row``, ``read_col``, ``label`` (reads,)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_last: torch.Tensor
    owner: torch.Tensor
    read_row: torch.Tensor
    read_col: torch.Tensor
    label: torch.Tensor
    row_len: torch.Tensor  #: (rows,) how many reads each row has (the NLL's per-row mean)
    hidden: torch.Tensor | None = None
    arity: int | None = None

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}

    def select(self, keep: torch.Tensor) -> "_Rows":
        """The rows of the requests with ``keep[request]`` True, trailing all-padding columns cut."""
        row_keep = keep[self.owner]
        new_index = torch.cumsum(row_keep, 0) - 1
        read_keep = row_keep[self.read_row]
        mask = self.attention_mask[row_keep]
        width = int(torch.nonzero(mask.any(0)).max()) + 1
        return replace(self, input_ids=self.input_ids[row_keep, :width], attention_mask=mask[:, :width],
                       subject_last=self.subject_last[row_keep], owner=self.owner[row_keep],
                       read_row=new_index[self.read_row[read_keep]], read_col=self.read_col[read_keep],
                       label=self.label[read_keep], row_len=self.row_len[row_keep],
                       hidden=None if self.hidden is None else self.hidden[row_keep, :width])

    def forward(self, adapter: ModelAdapter, site: str, layer: int, delta_rows: torch.Tensor | None,
                read_layers: list[int], extra_reads: tuple = ()) -> Trace:
        """Forward with ``delta_rows`` (rows, d_model) added at ``(site, layer)``, from the cached block
        input when there is one, stopping after the last read; returns the Trace (tensors keep autograd)."""
        edits = {} if delta_rows is None else {(site, layer): add_at_positions(self.subject_last, delta_rows)}
        reads = [("resid", l) for l in read_layers] + list(extra_reads)
        start = StartAt(adapter, layer, self.hidden, self.arity) if self.hidden is not None else nullcontext()
        with start, Trace(adapter, reads=reads, edits=edits, stop_after=True, detach=False) as tr:
            adapter.model(**self.inputs())
        return tr


def _head(adapter: ModelAdapter, h: torch.Tensor) -> torch.Tensor:
    """Logits (reads, vocab) of residual vectors (reads, d_model): final norm, then the LM head."""
    return adapter.lm_head()(adapter.final_norm()(h))


def _cache_block_input(adapter: ModelAdapter, rows: _Rows, layer: int, site: str,
                       extra_layers: list[int]) -> tuple[_Rows, Trace]:
    """One plain no-grad forward of ``rows`` (up to the last of ``(site, layer)`` and ``extra_layers``)
    that also caches the input of block ``layer``; checks that resuming there reproduces ``(site, layer)``.

    Returns the rows with ``hidden`` set (unchanged at layer 0, or when the check fails: then every
    step forwards from the embeddings, which is slower but exact) and the plain pass's Trace."""
    below = [("resid", layer - 1)] if layer > 0 else []
    reads = [(site, layer)] + [("resid", l) for l in extra_layers] + below
    with torch.no_grad(), Trace(adapter, reads=reads, stop_after=True) as plain:
        adapter.model(**rows.inputs())
    if layer == 0:
        return rows, plain
    cached = replace(rows, hidden=plain["resid", layer - 1], arity=plain.arity["resid", layer - 1])
    with torch.no_grad(), StartAt(adapter, layer, cached.hidden, cached.arity), \
            Trace(adapter, reads=[(site, layer)], stop_after=True) as resumed:
        adapter.model(**rows.inputs())
    real = rows.attention_mask.bool()
    want, got = plain[site, layer][real].float(), resumed[site, layer][real].float()
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max().clamp_min(1.0))):
        log.warning("%s: the forward resumed at block %d does not reproduce the full forward; v* runs the whole "
                    "model every step (exact, slower)", adapter.family, layer)
        return rows, plain
    return cached, plain


def optimize_values(adapter: ModelAdapter, items: list[tuple[str, str, str]], layer: int, site: str,
                    hp: ValueHParams, prefixes: list[str], chunk_rows: int = 512) -> list[ValueResult]:
    """Optimise v* for several requests ``(template, subject, target)`` at once.

    The requests' deltas form one (n, d_model) parameter and every forward pass carries all
    active requests' prefixed prompts (n · len(prefixes) rows, in chunks of at most ``chunk_rows``)
    plus their KL prompts in a second, short pass. The loss is the SUM of the per-request losses, so
    each delta gets exactly its own request's gradient, and Adam, the norm clamp and the early stop act
    row by row: the result equals optimising each request alone (up to float rounding), at a
    fraction of the per-step overhead. Per step only blocks ``layer ..`` run (their input is cached),
    the head only at the read positions, and finished requests' rows are no longer forwarded.
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
    n, n_pre, n_kl = len(items), len(prefixes), len(KL_TEMPLATES)
    last = adapter.n_layers - 1
    loss_layer = last if hp.v_loss_layer in (-1, last) else hp.v_loss_layer
    filled = [fill_template(pre + prompt, subject) for prompt, subject, _ in items for pre in prefixes]
    targets = [target for _, _, target in items for _ in prefixes]
    rw = encode_prompt_target(tok, [f[0] for f in filled], targets,
                              subject_spans=[(f[1], f[2]) for f in filled], device=device)
    mask, labels = rw.loss_mask()
    tgt_rows, tgt_cols = torch.nonzero(mask, as_tuple=True)  # every position that predicts a target token
    all_nll = _Rows(rw.input_ids, rw.attention_mask, torch.tensor(rw.subject_last, device=device),
                    torch.arange(n, device=device).repeat_interleave(n_pre), tgt_rows, tgt_cols,
                    labels[tgt_rows, tgt_cols], mask.sum(1))
    kl = encode_prompts(tok, KL_TEMPLATES * n, [subject for _, subject, _ in items for _ in KL_TEMPLATES],
                        padding_side="right", device=device)
    kl_last = torch.tensor(kl.subject_last, device=device)
    all_kl = _Rows(kl.input_ids, kl.attention_mask, kl_last, torch.arange(n, device=device).repeat_interleave(n_kl),
                   torch.arange(n * n_kl, device=device), kl_last, torch.zeros_like(kl_last),
                   torch.ones(n * n_kl, device=device))
    use_kl = hp.kl_factor > 0

    all_nll, plain = _cache_block_input(adapter, all_nll, layer, site, [])
    first = torch.arange(n, device=device) * n_pre  # each request's unprefixed row ("" comes first)
    v0 = plain[site, layer][first, all_nll.subject_last[first]].clone()
    if use_kl:
        all_kl, plain_kl = _cache_block_input(adapter, all_kl, layer, site, [last])
        with torch.no_grad():
            kl_ref = F.log_softmax(_head(adapter, plain_kl["resid", last][all_kl.read_row, all_kl.read_col]), dim=-1)
        kl_ref_rows = kl_ref
    del plain

    delta = torch.zeros_like(v0, requires_grad=True)  # (n, d_model)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    v0_norm = v0.norm(dim=1)
    max_norm = hp.clamp_norm_factor * v0_norm
    histories: list[list[float]] = [[] for _ in range(n)]
    steps = [0] * n
    active = torch.ones(n, dtype=torch.bool, device=device)
    nll_rows, kl_rows = all_nll, all_kl
    for step in range(hp.v_num_grad_steps):
        opt.zero_grad()
        h = nll_rows.forward(adapter, site, layer, delta[nll_rows.owner], [loss_layer])["resid", loss_layer]
        logits = _head(adapter, h[nll_rows.read_row, nll_rows.read_col])
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, nll_rows.label.unsqueeze(-1)).squeeze(-1)
        row_nll = torch.zeros(len(nll_rows.owner), device=device, dtype=logp.dtype).index_add(
            0, nll_rows.read_row, -logp) / nll_rows.row_len
        nll = torch.zeros(n, device=device, dtype=row_nll.dtype).index_add(0, nll_rows.owner, row_nll) / n_pre
        loss = nll + hp.v_weight_decay * delta.norm(dim=1) / v0_norm ** 2
        if use_kl:
            h_kl = kl_rows.forward(adapter, site, layer, delta[kl_rows.owner], [last])["resid", last]
            cur = F.log_softmax(_head(adapter, h_kl[kl_rows.read_row, kl_rows.read_col]), dim=-1)
            kl_rowwise = kl_rows_divergence(cur, kl_ref_rows, hp.kl_direction)
            kl_req = torch.zeros(n, device=device, dtype=kl_rowwise.dtype).index_add(0, kl_rows.owner, kl_rowwise)
            loss = loss + hp.kl_factor * kl_req / n_kl
        nll_now = nll.detach()
        for i in torch.nonzero(active).flatten().tolist():
            histories[i].append(float(nll_now[i]))
            steps[i] = step + 1
        was_active = active.clone()
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
        if not torch.equal(active, was_active):  # finished requests leave the batch
            nll_rows = all_nll.select(active)
            if use_kl:
                kl_rows, kl_ref_rows = all_kl.select(active), kl_ref[active[all_kl.owner]]
    delta = delta.detach()
    return [ValueResult(target=v0[i] + delta[i], init=v0[i], delta=delta[i].clone(), nll_history=histories[i],
                        steps=steps[i]) for i in range(n)]
