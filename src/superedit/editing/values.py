"""Target values v*: what the edited site must output so the model says ``target_new``.

A delta δ (d_model,) is added to ``site`` at ``layer`` at the subject's last token of every
context-prefixed prompt and optimised with Adam on (ROME eq. 4 / MEMIT eq. 16):

    L(δ) = mean_p NLL(target | p + prompt, site += δ)
           + kl_factor · KL(P_δ(· | "{} is a") ‖ P_orig(· | "{} is a"))     at the subject's last token
           + v_weight_decay · ‖δ‖ / ‖v₀‖²           (exactly as ROME's compute_v and MEMIT's compute_z)
           [+ preserve_factor · mean_a KL(P_δ(· | a) ‖ P_orig(· | a))   a: prompts about the subject's OTHER
                                                    attributes, at their last token; superedit's option, off by default]

(``kl_direction: orig_edited`` swaps the KL's arguments) with ‖δ‖ clamped to ``clamp_norm_factor · ‖v₀‖`` after each step. v₀ is the site's output at the
subject's last token of the unprefixed prompt and v* = v₀ + δ.
ROME optimises the MLP output ("value"); MEMIT the residual stream after its last layer ("resid").

What a step computes (:func:`optimize_values`): only what depends on δ. Nothing below the edited
layer does, so the input of block ``layer`` is read once per row (no autograd) and every step
resumes the forward there (:class:`~superedit.models.hooks.StartAt`); with causal attention no
position before the one δ is added at does either, so rows are grouped by that position
(:func:`plan_groups`), each group's earlier positions run once into the model's KV cache, and a step
forwards only the rest; the final norm and LM head run only at the positions the loss reads (target
positions, the KL token); a request whose NLL fell below ``v_early_stop_nll`` (the documented early
stop) keeps the δ it stopped at and its rows leave the batch. The result equals the plain
computation (every row through the whole model every step) to float rounding: checked once per
model and layer at run time (a plan that differs is not used), and on every family by
tests/test_values_speed.py, which keeps the plain computation as the specification.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import random
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

from ..models import ModelAdapter, Trace, encode_prompt_target, encode_prompts
from ..models.hooks import StartAt, add_at_positions
from ..models.positions import fill_template, pad_id
from ..utils.logs import get_logger
from .attribute_templates import ATTRIBUTE_TEMPLATES, templates_for
from .hparams import ValueHParams

KL_TEMPLATES = ["{} is a"]

log = get_logger(__name__)


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
                   hp: ValueHParams, prefixes: list[str], relation: str | None = None) -> ValueResult:
    """Optimise v* for one request (template ``prompt`` with ``{}``) at ``(site, layer)``."""
    return optimize_values(adapter, [(prompt, subject, target)], layer, site, hp, prefixes,
                           relations=[relation])[0]


def requests_per_pass(n_prefixes: int, chunk_rows: int = 512) -> int:
    """How many requests :func:`optimize_values` optimises in one pass of at most ``chunk_rows`` prompt rows."""
    return max(1, chunk_rows // max(1, n_prefixes))


#: cost of one extra forward+backward pass, in row-tokens, when rows are grouped by how many positions a
#: step recomputes (:func:`plan_groups`); a rough guess, not tuned: it only decides how many groups a plan
#: makes. Measured on SmolLM2 (85 requests × 6 prompt rows): 3 groups instead of one pass per row length
PASS_COST_TOKENS = 64


def plan_groups(sizes: list[int], pass_cost: int = PASS_COST_TOKENS) -> list[list[int]]:
    """Partition rows into groups forwarded together, each padded to its longest member.

    Row ``r`` needs ``sizes[r]`` positions recomputed each step (from where δ enters to its last read,
    aligned at column 0 by :meth:`_Rows.plan`). A group of ``g`` rows costs ``g · max size`` row-tokens
    plus ``pass_cost`` for the pass itself. Rows sorted by size; contiguous groups; the partition
    minimising the total (dynamic programming, O(rows²)). Returns lists of row indices."""
    order = sorted(range(len(sizes)), key=lambda r: sizes[r])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sizes[order[j - 1]]  # sorted: the group's last row is its longest
        for i in range(j, 0, -1):  # group = sorted rows i-1 .. j-1
            cost = best[i - 1] + (j - i + 1) * longest + pass_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    groups, j = [], n
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


@dataclass
class _Group:
    """Rows forwarded together; each row's recomputed positions start at column 0 (aligned).

    Row ``i`` of the group (``rows[i]`` of the row set, offset ``o_i``) recomputes its positions
    ``o_i .. o_i + L - 1`` as columns ``0 .. L-1`` of ``ids``/``pos``/``hidden`` (g, L[, d_model]); its
    positions before ``o_i`` sit in ``cache`` (the model's KV cache, left-padded to the group's
    largest offset S), and ``mask`` (g, S + L) covers both. δ is added at ``delta_col`` (g,); ``reads``
    (r,) index the row set's reads, found at ``(read_row, read_col)`` of the group's output."""

    rows: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    pos: torch.Tensor | None
    hidden: torch.Tensor | None
    delta_col: torch.Tensor
    cache: object | None
    reads: torch.Tensor
    read_row: torch.Tensor
    read_col: torch.Tensor

    def subset(self, keep: torch.Tensor) -> "_Group | None":
        """The group restricted to its rows with ``keep`` (g,) True (None if none is): the KV cache's rows
        selected (a copy), trailing columns no kept row uses cut."""
        if not bool(keep.any()):
            return None
        if bool(keep.all()):
            return self
        idx = torch.nonzero(keep).flatten()
        S = self.mask.shape[1] - self.ids.shape[1]
        L = int(self.mask[idx, S:].sum(1).max())
        local = torch.cumsum(keep, 0) - 1
        read_keep = keep[self.read_row]
        cache = None if self.cache is None else _select_cache_rows(self.cache, idx)
        return _Group(self.rows[idx], self.ids[idx, :L], self.mask[idx, :S + L],
                      None if self.pos is None else self.pos[idx, :L],
                      None if self.hidden is None else self.hidden[idx, :L], self.delta_col[idx], cache,
                      self.reads[read_keep], local[self.read_row[read_keep]], self.read_col[read_keep])

    @property
    def computed_tokens(self) -> int:
        """Row-tokens one step forwards for this group (padding included)."""
        return int(self.ids.numel())


def _select_cache_rows(cache, idx: torch.Tensor):
    """A copy of a KV cache holding only batch rows ``idx``: a transformers ``Cache`` (row-selected
    through its own ``batch_select_indices``) or a legacy tuple of per-layer (key, value) tuples. The
    index goes to the CPU, which indexes a tensor on any device (layers may sit on several)."""
    idx = idx.cpu()
    if isinstance(cache, tuple):
        return tuple(tuple(t[idx.to(t.device)] for t in layer) for layer in cache)
    out = copy.deepcopy(cache)
    out.batch_select_indices(idx)
    return out


def _shifted(t: torch.Tensor, offset: torch.Tensor, width: int, valid: torch.Tensor, fill=0) -> torch.Tensor:
    """``out[i, j] = t[i, offset[i] + j]`` where ``valid[i, j]``, else ``fill``; (g, width[, ...])."""
    cols = (offset[:, None] + torch.arange(width, device=t.device)[None]).clamp(0, t.shape[1] - 1)
    out = t[torch.arange(t.shape[0], device=t.device)[:, None], cols]
    keep = valid.view(*valid.shape, *([1] * (t.dim() - 2)))
    return torch.where(keep, out, torch.as_tensor(fill, dtype=t.dtype, device=t.device))


@dataclass
class _Rows:
    """Prompt rows forwarded together, and the positions whose logits the loss reads.

    Shapes: ``input_ids``/``attention_mask`` (rows, seq), right-padded; ``subject_last``, ``owner``
    (rows,) — where δ is added and which request's δ; ``read_row``, ``read_col``, ``label`` (reads,);
    ``hidden`` (rows, seq, d_model), the cached input of the edited block (None: forward from the
    embeddings); ``groups``: how the rows are forwarded (None: all together from position 0)."""

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
    groups: list[_Group] | None = None

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}

    def keep_requests(self, keep: torch.Tensor) -> "_Rows":
        """The planned groups cut to the rows of the requests with ``keep[request]`` True (each group's
        KV cache is row-selected, not recomputed); the row set and its indices stay as they are, so
        :meth:`planned_reads` says which reads :meth:`forward_reads` then returns."""
        return self.keep_rows(keep[self.owner])

    def keep_rows(self, keep: torch.Tensor) -> "_Rows":
        """The planned groups cut to the rows with ``keep[row]`` True (rows,), as :meth:`keep_requests`."""
        groups = [g.subset(keep[g.rows]) for g in self.groups or []]
        return replace(self, groups=[g for g in groups if g is not None])

    def planned_reads(self) -> torch.Tensor:
        """Indices of the reads the planned groups compute, in the order :meth:`forward_reads` returns them."""
        return torch.sort(torch.cat([g.reads for g in self.groups or []])).values

    def plan(self, adapter: ModelAdapter, by_split: bool, lookback: "int | torch.Tensor" = 0) -> "_Rows":
        """Set ``groups``. With ``by_split`` each row recomputes only its positions from where δ enters
        on (causal attention: nothing before depends on δ), aligned at column 0, its earlier positions
        run once, no grad, into the model's KV cache (left-padded, with explicit position ids); rows
        are grouped by how many positions they recompute (:func:`plan_groups`). Without, one group of
        whole rows from position 0. ``lookback`` (an int, or one per row) positions before δ's are
        recomputed too."""
        dev = self.input_ids.device
        lengths = self.attention_mask.sum(1)
        offsets = (self.subject_last - lookback).clamp_min(0) if by_split else torch.zeros_like(lengths)
        sizes = (lengths - offsets).tolist()
        groups = plan_groups(sizes) if by_split else [list(range(len(sizes)))]
        pad = pad_id(adapter.tokenizer)
        planned = []
        for members in groups:
            rows = torch.tensor(members, device=dev)
            o, n_new = offsets[rows], lengths[rows] - offsets[rows]
            S, L = int(o.max()), int(n_new.max())
            ids, mask = self.input_ids[rows], self.attention_mask[rows]
            valid = torch.arange(L, device=dev)[None] < n_new[:, None]  # (g, L)
            new_ids = _shifted(ids, o, L, valid, pad)
            pos = (o[:, None] + torch.arange(L, device=dev)[None]) if S > 0 else None
            hidden = None if self.hidden is None else _shifted(self.hidden[rows], o, L, valid)
            cache, full_mask = None, valid.to(mask.dtype)
            if S > 0:  # positions before each row's offset, left-padded to S
                pre_valid = torch.arange(S, device=dev)[None] >= (S - o)[:, None]  # (g, S)
                pre_ids = _shifted(ids, o - S, S, pre_valid, pad)
                pre_pos = (torch.arange(S, device=dev)[None] - (S - o)[:, None]).clamp_min(0)
                name = _cache_kwarg(adapter.model)
                extra = {"logits_to_keep": 1} if _accepts(adapter.model, "logits_to_keep") else {}
                with torch.no_grad():
                    out = adapter.model(input_ids=pre_ids, attention_mask=pre_valid.to(mask.dtype),
                                        position_ids=pre_pos, use_cache=True, **extra)
                cache = out.get(name)
                if cache is None:
                    raise RuntimeError(f"the model returned no KV cache under {name!r}")
                full_mask = torch.cat([pre_valid.to(mask.dtype), full_mask], dim=1)
            in_group = torch.zeros(len(sizes), dtype=torch.bool, device=dev)
            in_group[rows] = True
            local = torch.full((len(sizes),), -1, dtype=torch.long, device=dev)
            local[rows] = torch.arange(len(members), device=dev)
            reads = torch.nonzero(in_group[self.read_row]).flatten()
            read_row = local[self.read_row[reads]]
            planned.append(_Group(rows, new_ids, full_mask, pos, hidden, self.subject_last[rows] - o, cache, reads,
                                  read_row, self.read_col[reads] - o[read_row]))
        return replace(self, groups=planned)

    def forward_reads(self, adapter: ModelAdapter, site: str, layer: int, delta_rows: torch.Tensor | None,
                      read_layer: int) -> torch.Tensor:
        """The residual after block ``read_layer`` at the reads (reads, d_model), with ``delta_rows``
        (rows, d_model) added at ``(site, layer)``; each group resumes after its cached positions (KV
        cache) and at block ``layer`` (cached input) and stops after ``read_layer``. Keeps autograd."""
        parts, order = [], []
        for g in self.groups or []:
            kwargs = {"attention_mask": g.mask}
            if g.pos is not None:
                kwargs["position_ids"] = g.pos
            if g.cache is not None:  # a fresh copy: the forward appends to the cache it is given
                kwargs.update({_cache_kwarg(adapter.model): copy.deepcopy(g.cache), "use_cache": True})
            else:
                kwargs["use_cache"] = False
            edits = {} if delta_rows is None else {(site, layer): add_at_positions(g.delta_col, delta_rows[g.rows])}
            start = StartAt(adapter, layer, g.hidden, self.arity) if g.hidden is not None else nullcontext()
            with start, Trace(adapter, reads=[("resid", read_layer)], edits=edits, stop_after=True,
                              detach=False) as tr:
                adapter.model(input_ids=g.ids, **kwargs)
            parts.append(_take(tr["resid", read_layer], g.read_row, g.read_col, self.input_ids.device))
            order.append(g.reads)
        out = torch.cat(parts)
        return out[torch.argsort(torch.cat(order))]


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_kwarg(model) -> str:
    """The name a causal LM's forward takes its KV cache under (and returns it as): ``cache`` from
    transformers 5.2x on, ``past_key_values`` before."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _head(adapter: ModelAdapter, h: torch.Tensor) -> torch.Tensor:
    """Logits (reads, vocab) of residual vectors (reads, d_model): final norm, then the LM head; on ``h``'s
    device (with a ``--device-map`` the head may run elsewhere)."""
    return adapter.lm_head()(adapter.final_norm()(h)).to(h.device)


def _take(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, device) -> torch.Tensor:
    """``t[rows, cols]`` read where ``t`` is (a layer's device under a ``--device-map``), returned on ``device``
    (the inputs' device, where the loss is formed); keeps autograd."""
    return t[rows.to(t.device), cols.to(t.device)].to(device)


def _fast_plan_key(adapter: ModelAdapter, layer: int, site: str, read_layer: int) -> tuple:
    """Where ``adapter.memo`` keeps the verdict on the fast plan for these settings (:func:`_prepare_rows`)."""
    return ("values.fast_plan_ok", layer, site, read_layer, str(adapter.dtype), str(adapter.device))


Lookback = Union[int, Callable[[torch.Tensor], torch.Tensor]]


def _prepare_rows(adapter: ModelAdapter, rows: _Rows, layer: int, site: str, read_layer: int,
                  keep_reads: bool = False, lookback: Lookback = 0, exact: bool = False) -> tuple[_Rows, Trace]:
    """One plain no-grad forward of ``rows`` (v₀ at ``(site, layer)``, the input of block ``layer``; the
    residual after ``read_layer`` too with ``keep_reads``), then the fast plan: cached block input,
    rows grouped by where δ enters with their earlier positions in the KV cache.

    The first time per model, layer, site, dtype and device, the fast plan is checked against the
    plain residual at the reads (δ = 0) and the verdict kept in ``adapter.memo``; a plan that does not
    reproduce it is never used for that model: every step then forwards every row from the embeddings
    (exact, slower) and a warning names the family. ``exact`` asks for that plain plan (hooks below
    the edited layer or before δ's position must run every step). Returns the rows and the plain Trace."""
    memo_key = _fast_plan_key(adapter, layer, site, read_layer)
    verdict = adapter.memo.get(memo_key)
    below = [("resid", layer - 1)] if layer > 0 else []
    reads = [(site, layer)] + below + ([("resid", read_layer)] if keep_reads or verdict is None else [])
    with torch.no_grad(), Trace(adapter, reads=reads, stop_after=True) as plain:
        adapter.model(**rows.inputs())
    if verdict is False or exact:
        return rows.plan(adapter, by_split=False), plain
    fast = rows if layer == 0 else replace(rows, hidden=plain["resid", layer - 1].to(rows.input_ids.device),
                                           arity=plain.arity["resid", layer - 1])
    why = ""
    try:
        back = lookback(rows.subject_last) if callable(lookback) else lookback  # right after the plain forward
        fast = fast.plan(adapter, by_split=True, lookback=back)
        if verdict is None:
            want = _take(plain["resid", read_layer], rows.read_row, rows.read_col, rows.input_ids.device).float()
            with torch.no_grad():
                got = fast.forward_reads(adapter, site, layer, None, read_layer).float()
            # a plan that misplaces positions or masks is off by O(1); rounding by ~eps · depth
            tol = 1e-3 if torch.finfo(adapter.dtype).eps < 1e-4 else 5e-2
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            if not err < tol:
                why = f"does not reproduce the full forward (relative difference {err:.2e} at the reads)"
    except (TypeError, RuntimeError) as exc:  # a model whose forward takes or returns no KV cache
        why = f"fails ({exc})"
    adapter.memo[memo_key] = not why
    if why:
        log.warning("%s: resuming the forward at block %d and after the cached positions %s; v* runs the whole "
                    "model every step (exact, slower)", adapter.family, layer, why)
        return rows.plan(adapter, by_split=False), plain
    return fast, plain


#: kinds of KL rows (:func:`value_rows`): the essence prompt, the request's own prompt (no target; read
#: only to tell which preservation prompts ask the edited question), a preservation prompt
KL_ESSENCE, KL_OWN, KL_PRESERVE = 0, 1, 2


def value_rows(adapter: ModelAdapter, items: list[tuple[str, str, str]], prefixes: list[str],
               essence: bool = True, preserve: list[str] | tuple[str, ...] = (),
               preserve_n: int = 0, relations: Sequence[str | None] | None = None, delta_at: str = "subject"
               ) -> tuple[_Rows, "_Rows | None", torch.Tensor]:
    """The rows the v* loss reads: every request's prefixed prompts + target (reads: the positions that
    predict a target token; requests in order, ``prefixes`` within each, "" first) and its KL rows, per
    request: the essence prompts (``essence``; read at the subject's last token), then, if ``preserve``
    is given, its own prompt and each ``preserve`` template (``preserve_n`` of them, a seeded draw per
    request, if ``preserve_n`` > 0, after leaving out the templates of the request's own answer kind
    where ``relations`` gives one relation id per request; read at the prompt's last token). Returns
    the NLL rows, the KL rows (None if there are none) and each KL row's kind (KL_ESSENCE / KL_OWN /
    KL_PRESERVE). ``delta_at``: where δ enters a prompt row, "subject" (its subject's last token, ROME) or
    "last" (the prompt's last token, the one that predicts the target's first: ``gated``'s question gate)."""
    if delta_at not in ("subject", "last"):
        raise ValueError(f"delta_at must be 'subject' or 'last', got {delta_at!r}")
    device = adapter.device
    tok = adapter.tokenizer
    n, n_pre = len(items), len(prefixes)
    filled = [fill_template(pre + prompt, subject) for prompt, subject, _ in items for pre in prefixes]
    targets = [target for _, _, target in items for _ in prefixes]
    rw = encode_prompt_target(tok, [f[0] for f in filled], targets,
                              subject_spans=[(f[1], f[2]) for f in filled], device=device)
    mask, labels = rw.loss_mask()
    tgt_rows, tgt_cols = torch.nonzero(mask, as_tuple=True)  # every position that predicts a target token
    # a row's last token (the target's last) predicts nothing the loss reads, and with causal attention
    # no read depends on it: drop it (one position in five on SmolLM2's rows)
    keep = torch.zeros_like(rw.attention_mask)
    keep[tgt_rows, tgt_cols] = 1
    keep = keep.flip(1).cummax(1).values.flip(1) * rw.attention_mask  # every position up to the last read
    width = int(torch.nonzero(keep.any(0)).max()) + 1
    pad = pad_id(tok)
    ids = torch.where(keep.bool(), rw.input_ids, torch.full_like(rw.input_ids, pad))[:, :width]
    at = torch.tensor(rw.subject_last, device=device)
    if delta_at == "last":  # each row's first read: the prompt's last token (reads are row-major)
        at = torch.full_like(at, ids.shape[1]).scatter_reduce(0, tgt_rows, tgt_cols, "amin")
    nll = _Rows(ids, keep[:, :width], at,
                torch.arange(n, device=device).repeat_interleave(n_pre), tgt_rows, tgt_cols,
                labels[tgt_rows, tgt_cols], mask.sum(1))
    per_request = []  # (template or None for the own prompt, kind) per KL row, request by request
    if relations is not None and len(relations) != n:
        raise ValueError(f"{len(relations)} relations for {n} requests")
    for i, (prompt, subject, _) in enumerate(items):
        pool = templates_for(preserve, relations[i]) if relations is not None and preserve else preserve
        chosen = _preserve_draw(pool, preserve_n, subject, prompt) if pool else []
        per_request.append([(t, KL_ESSENCE) for t in (KL_TEMPLATES if essence else [])]
                           + ([(None, KL_OWN)] + [(t, KL_PRESERVE) for t in chosen] if preserve else []))
    kinds = torch.tensor([k for per in per_request for _, k in per], dtype=torch.long, device=device)
    if not len(kinds):  # no KL term at all (kl_factor 0, no preservation)
        return nll, None, kinds
    kl = encode_prompts(tok, [item[0] if t is None else t for item, per in zip(items, per_request) for t, _ in per],
                        [item[1] for item, per in zip(items, per_request) for _ in per], padding_side="right",
                        device=device)
    kl_last = torch.tensor(kl.subject_last, device=device)
    read_col = torch.where(kinds == KL_ESSENCE, kl_last, torch.tensor(kl.last_token, device=device))
    owner = torch.tensor([i for i, per in enumerate(per_request) for _ in per], dtype=torch.long, device=device)
    rows = len(owner)
    return nll, _Rows(kl.input_ids, kl.attention_mask, kl_last, owner, torch.arange(rows, device=device),
                      read_col, torch.zeros_like(kl_last), torch.ones(rows, device=device)), kinds


def _preserve_draw(templates: list[str] | tuple[str, ...], k: int, subject: str, prompt: str) -> list[str]:
    """``k`` of ``templates`` (all if ``k`` is 0 or not smaller), drawn with a seed from the request's
    subject and prompt: the same request always reads the same ones, whatever batch it is in."""
    if not k or k >= len(templates):
        return list(templates)
    seed = int.from_bytes(hashlib.sha256(f"{subject}\x00{prompt}".encode()).digest()[:8], "little")
    return random.Random(seed).sample(list(templates), k)


def kl_row_weights(kinds: torch.Tensor, owner: torch.Tensor, ref_top: torch.Tensor, target_first: torch.Tensor,
                   kl_factor: float, preserve_factor: float, n: int) -> torch.Tensor:
    """Each KL row's weight in the loss (rows,): essence rows ``kl_factor`` / their count per request;
    the request's own prompt 0; a preservation prompt ``preserve_factor`` / the request's kept ones,
    where kept means its unedited top token (``ref_top``, (rows,)) is neither the own prompt's nor the
    new target's first token (``target_first``, (n,)): such a prompt asks the edited question, and
    keeping its answer would fight the edit."""
    w = torch.zeros(len(kinds), dtype=torch.float32, device=kinds.device)
    ess = kinds == KL_ESSENCE
    n_ess = torch.zeros(n, device=kinds.device).index_add(0, owner, ess.float())
    w[ess] = kl_factor / n_ess[owner[ess]]
    own = torch.full((n,), -1, dtype=torch.long, device=kinds.device)
    own[owner[kinds == KL_OWN]] = ref_top[kinds == KL_OWN]
    kept = (kinds == KL_PRESERVE) & (ref_top != own[owner]) & (ref_top != target_first[owner])
    n_kept = torch.zeros(n, device=kinds.device).index_add(0, owner, kept.float()).clamp_min(1)
    w[kept] = preserve_factor / n_kept[owner[kept]]
    return w


def optimize_values(adapter: ModelAdapter, items: list[tuple[str, str, str]], layer: int, site: str,
                    hp: ValueHParams, prefixes: list[str], chunk_rows: int = 512,
                    lookback: Lookback = 0, relations: Sequence[str | None] | None = None,
                    delta_at: str = "subject", exact: bool = False) -> list[ValueResult]:
    """Optimise v* for several requests ``(template, subject, target)`` at once.

    The requests' deltas form one (n, d_model) parameter and every step carries all active requests'
    prefixed prompts (n · len(prefixes) rows, in chunks of at most ``chunk_rows``) plus their KL
    prompts. The loss is the SUM of the per-request losses, so each delta gets exactly its own
    request's gradient, and Adam, the norm clamp and the early stop act row by row: the result equals
    optimising each request alone (up to float rounding), at a fraction of the per-step overhead.

    Per step only what depends on δ is computed: blocks from ``layer`` on (their input is cached),
    positions from each row's δ position on (earlier ones sit in the model's KV cache, rows grouped
    by :func:`plan_groups`), the final norm and head only at the positions the loss reads; requests
    that stopped early leave the batch. ``relations`` (one relation id per request, optional) lets
    ``hp.preserve_other_kinds`` leave out the preservation prompts of each request's own answer kind.
    ``lookback`` more positions before δ's are recomputed rather
    than cached, for hooks that read the tokens just before (``gated``'s ``gate_tokens``): an int, or
    a function of the rows' δ positions (rows,) returning one count per row, called right after the
    plain forward of those rows (so a hook can say which rows need it from what it saw there).
    ``delta_at`` "last" adds δ at each prompt's last token instead of the subject's (:func:`value_rows`);
    ``exact`` forwards every row from the embeddings every step, for hooks that must see the whole text
    (``gated``'s question gate reads what its subject gate saw at a shallower layer).
    """
    if site not in ("value", "resid"):
        raise ValueError(f"value site must be 'value' (ROME) or 'resid' (MEMIT), got {site!r}")
    if relations is not None and len(relations) != len(items):
        raise ValueError(f"{len(relations)} relations for {len(items)} requests")
    if not items:
        return []
    preserve = list(hp.preserve_templates or ATTRIBUTE_TEMPLATES) if hp.preserve_factor > 0 else []
    n_keep = min(hp.preserve_n or len(preserve), len(preserve))
    per = requests_per_pass(len(prefixes) + (1 + n_keep if preserve else 0), chunk_rows)
    if len(items) > per:
        return [r for i in range(0, len(items), per)
                for r in optimize_values(adapter, items[i:i + per], layer, site, hp, prefixes, chunk_rows, lookback,
                                         None if relations is None else relations[i:i + per], delta_at, exact)]
    device = adapter.device
    n, n_pre = len(items), len(prefixes)
    last = adapter.n_layers - 1
    loss_layer = last if hp.v_loss_layer in (-1, last) else hp.v_loss_layer
    all_nll, all_kl, kl_kinds = value_rows(adapter, items, prefixes, essence=hp.kl_factor > 0, preserve=preserve,
                                           preserve_n=hp.preserve_n,
                                           relations=relations if hp.preserve_other_kinds else None,
                                           delta_at=delta_at)
    use_kl = hp.kl_factor > 0 or bool(preserve)

    all_nll, plain = _prepare_rows(adapter, all_nll, layer, site, loss_layer, lookback=lookback, exact=exact)
    first = torch.arange(n, device=device) * n_pre  # each request's unprefixed row ("" comes first)
    v0 = _take(plain[site, layer], first, all_nll.subject_last[first], device).clone()
    del plain
    if use_kl:
        all_kl, plain_kl = _prepare_rows(adapter, all_kl, layer, site, last, keep_reads=True, lookback=lookback,
                                         exact=exact)
        with torch.no_grad():
            kl_ref = F.log_softmax(_head(adapter, _take(plain_kl["resid", last], all_kl.read_row, all_kl.read_col,
                                                        device)), dim=-1)
        # the new target's first token: each request's first read on its unprefixed row (reads are row-major)
        target_first = all_nll.label[torch.searchsorted(all_nll.read_row, first)]
        kl_weight = kl_row_weights(kl_kinds, all_kl.owner, kl_ref.argmax(-1), target_first, hp.kl_factor,
                                   hp.preserve_factor, n)
        kl_rows = all_kl.keep_rows(kl_weight > 0)  # rows read only for the weights leave the loop
        del plain_kl
    fast = all_nll.hidden is not None or any(g.cache is not None for g in all_nll.groups)

    delta = torch.zeros_like(v0, requires_grad=True)  # (n, d_model)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    v0_norm = v0.norm(dim=1)
    max_norm = hp.clamp_norm_factor * v0_norm
    histories: list[list[float]] = [[] for _ in range(n)]
    steps = [0] * n
    active = torch.ones(n, dtype=torch.bool, device=device)
    nll_rows = all_nll
    for step in range(hp.v_num_grad_steps):
        opt.zero_grad()
        reads = nll_rows.planned_reads()  # the active requests' reads
        logits = _head(adapter, nll_rows.forward_reads(adapter, site, layer, delta[nll_rows.owner], loss_layer))
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, nll_rows.label[reads].unsqueeze(-1)).squeeze(-1)
        row_nll = torch.zeros(len(nll_rows.owner), device=device, dtype=logp.dtype).index_add(
            0, nll_rows.read_row[reads], -logp) / nll_rows.row_len
        nll = torch.zeros(n, device=device, dtype=row_nll.dtype).index_add(0, nll_rows.owner, row_nll) / n_pre
        loss = nll + hp.v_weight_decay * delta.norm(dim=1) / v0_norm ** 2
        if use_kl and kl_rows.groups:  # (none left: every active request's KL rows weigh 0)
            kl_reads = kl_rows.planned_reads()
            cur = F.log_softmax(_head(adapter, kl_rows.forward_reads(adapter, site, layer, delta[kl_rows.owner], last)),
                                dim=-1)
            kl_rowwise = kl_rows_divergence(cur, kl_ref[kl_reads], hp.kl_direction) * kl_weight[kl_reads]
            kl_req = torch.zeros(n, device=device, dtype=kl_rowwise.dtype).index_add(
                0, kl_rows.owner[kl_rows.read_row[kl_reads]], kl_rowwise)
            loss = loss + kl_req
        nll_now = nll.detach()
        if not bool(torch.isfinite(loss.detach()[active]).all()):
            if fast:  # e.g. an attention backend that returns NaN for a fully padded cached row
                log.warning("%s: v* loss not finite on the fast plan (layer %d); v* runs the whole model every "
                            "step from now on (exact, slower)", adapter.family, layer)
                for read in {loss_layer, last}:
                    adapter.memo[_fast_plan_key(adapter, layer, site, read)] = False
                return optimize_values(adapter, items, layer, site, hp, prefixes, chunk_rows, relations=relations,
                                       delta_at=delta_at, exact=exact)
            raise FloatingPointError(f"v* loss is not finite at step {step} (layer {layer}, site {site}) for "
                                     f"requests {torch.nonzero(~torch.isfinite(loss.detach()) & active).flatten().tolist()}")
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
        if not torch.equal(active, was_active) and step + 1 < hp.v_num_grad_steps:  # finished requests leave
            nll_rows = nll_rows.keep_requests(active)
            if use_kl:
                kl_rows = kl_rows.keep_requests(active)
    delta = delta.detach()
    return [ValueResult(target=v0[i] + delta[i], init=v0[i], delta=delta[i].clone(), nll_history=histories[i],
                        steps=steps[i]) for i in range(n)]
