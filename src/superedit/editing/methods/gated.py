"""gated (superedit): lifelong edits as key–value entries that act only on their own subject's key.

Why (measured on SmolLM2-135M, ``docs/results/lifelong.md``): a closed-form edit W' = W + Λ(C⁻¹k*)ᵀ
moves the value of every other key k_j by p(k*, k_j)·δ with p = k*ᵀC⁻¹k_j / k*ᵀC⁻¹k*. Between a real
stream's edits and untouched subjects mean |p| is 0.028–0.031 at layers 1–4 — the level of random
directions in a 1,536-wide layer (1/√d ≈ 0.026) — and no linear update space does better (AlphaEdit's
null space: 0.030–0.034; guard: the shared part only). Over N edits the drift of an untouched value
grows like √N · |p| · ‖δ‖ (‖δ‖ ≈ 75 against ‖v₀‖ ≈ 100), so after 1,000 AlphaEdit edits 69% of
the facts the model knew are lost. A linear edit cannot be local below that floor; a gate can.

The method: edit e is stored as an entry (K_e, δ_e) at one layer l, and the MLP output there becomes

    out(k) = W k  +  Σ_e 1[max_c cos_C(k, k_e,c) > τ] · δ_e,      cos_C(a, b) = aᵀC⁻¹b / √(aᵀC⁻¹a · bᵀC⁻¹b)

at every token: K_e holds the keys k_e,c of the edit's prompt in each context v* is optimised on (the
down-projection input at the subject's last token, with each context prefix and without one), δ_e =
v*_e − v₀_e ROME's value change at that layer, computed with every earlier
entry in place (so edits build on each other as in any sequential method), and C = E[kkᵀ] the key
covariance that whitens the comparison (the cosine in C⁻¹'s metric, where keys of unrelated text are
spread evenly). Where no entry's cosine exceeds τ the layer computes exactly what the unedited model
does; the weights are never changed. τ is chosen on a tuning split from the separation of paraphrase
keys and other text's keys (``benchmarks/real_model/gate_separation.py``). One key per context rather
than ROME's average k*: on SmolLM2's tuning side the prompt without a prefix is below cosine 0.7 from
the average for 11 of 120 edits, and 10 of the 11 edits that failed right away were those.

With ``gate_tokens`` m > 1 an entry also keeps the keys of the subject's m − 1 tokens before its last
(as many as the subject has), and fires at a token only where, in one of its contexts, the last
key AND each earlier one match the tokens just before at cosine above τ. A layer-1 key at a name's
last token says little about the tokens before it: on the 1,000-edit SmolLM2 stream the one-token
gate fired on 28.5% of unedited neighbourhood prompts, at names that share their last tokens with
an edited one (Boeing 737-100 / 737-600 on "0", iPhone 8 / 7 Plus). Where the tokens before a
position are not visible — a forward that resumes from a KV cache — the gate uses the previous
call's keys when that call filled the same cache (``generate``) and otherwise counts the hidden
predecessors as matching (the one-token rule); v* therefore recomputes the m − 1 tokens before
the subject's last in the rows where some entry's last key matches near it
(:func:`rows_lookback`), so the gate sees there what a full forward sees.

With ``question_layer`` q (the question gate, :class:`_QuestionGate`) an entry also keeps the key
at layer q at the LAST token of its prompt, in each context, and its value is optimised and added at
layer q's MLP output at that token instead: the entry fires at token t where its subject gate fired at
some token s ≤ t of the same text AND the key at t matches one of those last-token keys (cos_C above
``tau_question``). An edit then reaches the question it edits and not its subject's other questions
(measured on the testbed, where the last-token key tells a paraphrase from the same subject's other
questions with AUC 0.999 at layer 2; on SmolLM2 it does so with AUC 0.68–0.77, too weakly:
``docs/results/lifelong.md``). v* runs every row from its start (``exact``): a cached prefix would
hide the subject from the gate.

With ``boundary_requests`` (the name-boundary test, :mod:`..boundary`) an entry does not fire at a
token whose next token in the same forward continues a name: a logistic test on the next token's
whitened key at the gate's layer, learned once from a tuning file's subject spans and kept in the
state. A causal model cannot tell "Adobe Flash" from the start of "Adobe Flash Player" at "Flash";
on SmolLM2's 1,000-edit stream 11 of the 15 probe prompts where some entry fired were such longer
names (``docs/results/lifelong.md``, "A name-boundary test").

What a token costs (:func:`_make_gate`): entries whose keys are bit-identical — a fact edited again
computes exactly its first edit's keys — fire together and are held as one entry with the sum of
their values (:func:`merge_identical_entries`), so re-edits do not grow the per-token work; the
subject test compares each token with every distinct key once (one subject's keys in one context are
shared by its relations when the subject opens the prompt); the question test compares a row's
tokens only with the entries whose subject that row has named; and a one-token gate on a fresh
forward answers an input equal, bit for bit, to a recent one from memory (v* forwards the same rows
at every step, and keys below the value's layer do not depend on δ). Merged sums and the smaller
matrix products agree with the plain computation up to float rounding; on the testbed's re-edit
stream at 1,000 entries a batch of 100 edits went from 204 s to 59 s (one thread, alone) and gave the
same values bit for bit.

Requests of one batch that share a subject are edited in rounds (each subject at most once per
round), so a second edit of a subject is optimised with the first one's entry in place, as in a
stream; both entries then fire together on that subject.

The state (:class:`GatedMemory`) holds, per layer: the entries' keys (n, contexts, d_mlp) and values
(n, d_model), their ids, and the whitening factor L⁻¹ of C (d_mlp, d_mlp) (with a question gate also
the question keys (n, contexts, d_mlp) and that layer's factor; with a name-boundary test its weight
(d_mlp,) and bias), so a ledger restores the
edited model without the corpus. A step's journal holds its own entries, so any edit can be taken out
exactly (``undo="any"``). The registry entry's ``forward`` capability installs a snapshot of the memory
on the model (:func:`install_memory`); ``Ledger.apply_to`` does that after every commit.
"""

from __future__ import annotations

import time
import weakref
from contextlib import contextmanager

import torch

from ...errors import SupereditError
from ...models import ModelAdapter
from ..boundary import NameBoundary, learn_boundary
from ..contexts import context_prefixes
from ..covariance import CovarianceSource
from ..delta import WeightDelta
from ..hparams import GatedHParams
from ..keys import context_keys, context_tail_keys
from ..values import optimize_values
from .protocol import StepResult

F64 = torch.float64
_HANDLE = "_superedit_gated_memory"  # attribute of the down-projection module holding the installed hook


def whitening_factor(C: torch.Tensor, ridge: float, layer: int) -> torch.Tensor:
    """L⁻¹ (d, d) float64 with C_λ = L Lᵀ, so ‖L⁻¹a‖ · ‖L⁻¹b‖ · cos = aᵀC_λ⁻¹b (see ``stats.whitening``)."""
    from ...stats.whitening import Whitener

    W = Whitener(C, ridge, layer=layer)
    eye = torch.eye(W.dim, dtype=F64, device=W.L.device)
    return torch.linalg.solve_triangular(W.L, eye, upper=False)


def subject_rounds(subjects: list[str]) -> list[list[int]]:
    """Indices split into rounds in which no subject appears twice (order kept within each subject)."""
    rounds: list[list[int]] = []
    seen: dict[str, int] = {}
    for i, s in enumerate(subjects):
        r = seen.get(s, -1) + 1
        seen[s] = r
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(i)
    return rounds


class GatedMemory:
    """The entries of every edit so far, per layer (see the module docstring).

    Tensors (CPU in the state dict): ``layer.<l>.keys`` (n, c, m, d_mlp) — each edit's key in each of
    its c contexts at its subject's last m tokens (last first) —, ``layer.<l>.valid`` (n, c, m) bool —
    False where the subject has fewer tokens —, ``layer.<l>.values`` (n, d_model),
    ``layer.<l>.uid`` (n,) int64, ``layer.<l>.whiten`` (d_mlp, d_mlp) float64 — L⁻¹ of C with the
    profile's ridge, taken from ``stats`` on the first step (and kept, so later steps and a resumed
    run compare keys in the same metric). With ``boundary_requests``, ``layer.<l>.boundary.weight``
    (d_mlp,) float32 and ``layer.<l>.boundary.bias`` (1,) float64: the name-boundary test, learned on the
    first step. States written before ``gate_tokens`` existed hold keys (n, c, d_mlp) and no ``valid``:
    they load as m = 1.
    """

    def __init__(self, layer: int, d_mlp: int, d_model: int, hparams: GatedHParams, stats: CovarianceSource | None):
        self.layer, self.hparams, self.stats = layer, hparams, stats
        self.question_layer: int | None = hparams.question_layer
        self.qkeys = torch.zeros(0, 1, d_mlp)  # (n, c, d_mlp) keys at the question layer (question gate only)
        self.whiten_q: torch.Tensor | None = None
        self.keys = torch.zeros(0, 1, 1, d_mlp)
        self.valid = torch.zeros(0, 1, 1, dtype=torch.bool)
        self.values = torch.zeros(0, d_model)
        self.uid = torch.zeros(0, dtype=torch.long)
        self.whiten: torch.Tensor | None = None
        self.boundary: NameBoundary | None = None  # the name-boundary test (``boundary_requests``), once learned

    def __len__(self) -> int:
        return int(self.uid.numel())

    def ensure_whitening(self, stats: CovarianceSource | None) -> torch.Tensor:
        if self.whiten is None:
            stats = stats if stats is not None else self.stats
            if stats is None:
                raise SupereditError(f"method gated: layer {self.layer} needs the key covariance C (stats) for its "
                                     "first step; its whitening factor is kept in the state after that")
            self.whiten = whitening_factor(stats.mom2(self.layer), self.hparams.mom2_ridge, self.layer).cpu()
        if self.question_layer is not None and self.whiten_q is None:
            stats = stats if stats is not None else self.stats
            if stats is None:
                raise SupereditError(f"method gated: the question layer {self.question_layer} needs the key "
                                     "covariance C (stats) for its first step")
            self.whiten_q = whitening_factor(stats.mom2(self.question_layer), self.hparams.mom2_ridge,
                                             self.question_layer).cpu()
        return self.whiten

    def ensure_boundary(self, adapter: ModelAdapter) -> NameBoundary | None:
        """The name-boundary test of ``boundary_requests`` (None when the field is empty): learned on the first
        call with this memory's whitening, then kept (and saved in the state)."""
        hp = self.hparams
        if not hp.boundary_requests:
            return None
        if self.boundary is None:
            self.boundary = learn_boundary(adapter, hp.boundary_requests, self.layer, self.ensure_whitening(None),
                                           hp.boundary_l2, hp.boundary_threshold)
        self.boundary.threshold = hp.boundary_threshold
        return self.boundary

    def next_uid(self) -> int:
        return int(self.uid.max()) + 1 if len(self) else 0

    # ----- MethodState ------------------------------------------------------------------------
    def add(self, journal: dict[str, torch.Tensor]) -> None:
        l = self.layer
        if f"layer.{l}.uid" not in journal:
            return
        uid = journal[f"layer.{l}.uid"].long()
        if bool(torch.isin(uid, self.uid).any()):
            raise SupereditError(f"gated: entries {sorted(set(uid.tolist()) & set(self.uid.tolist()))[:5]} are in "
                                 "the memory already")
        new, ok = _four_d(journal[f"layer.{l}.keys"].float(), journal.get(f"layer.{l}.valid"))
        if len(self) and new.shape[1:] != self.keys.shape[1:]:
            raise SupereditError(f"gated: new entries have {new.shape[1]} context keys at {new.shape[2]} subject "
                                 f"tokens, the memory {self.keys.shape[1]} at {self.keys.shape[2]} (context_lengths, "
                                 "n_prefixes or gate_tokens changed within one run?)")
        keys = torch.cat([self.keys if len(self) else self.keys.new_zeros(0, *new.shape[1:]), new])
        valid = torch.cat([self.valid if len(self) else self.valid.new_zeros(0, *ok.shape[1:]), ok])
        values = torch.cat([self.values, journal[f"layer.{l}.values"].float()])
        uids = torch.cat([self.uid, uid])
        order = torch.argsort(uids)
        if self.question_layer is not None:
            q = f"question.{self.question_layer}.keys"
            if q not in journal:
                raise SupereditError(f"gated: the memory has a question gate at layer {self.question_layer} but "
                                     f"the new entries carry no '{q}' (question_layer changed within one run?)")
            new_q = journal[q].float()
            qkeys = torch.cat([self.qkeys if len(self) else self.qkeys.new_zeros(0, *new_q.shape[1:]), new_q])
            self.qkeys = qkeys[order]
        self.keys, self.valid, self.values, self.uid = keys[order], valid[order], values[order], uids[order]

    def remove(self, journal: dict[str, torch.Tensor]) -> None:
        l = self.layer
        if f"layer.{l}.uid" not in journal:
            return
        keep = ~torch.isin(self.uid, journal[f"layer.{l}.uid"].long())
        if self.question_layer is not None:
            self.qkeys = self.qkeys[keep]
        self.keys, self.valid, self.values, self.uid = self.keys[keep], self.valid[keep], self.values[keep], \
            self.uid[keep]

    def state_dict(self) -> dict[str, torch.Tensor]:
        l = self.layer
        out = {f"layer.{l}.keys": self.keys.clone(), f"layer.{l}.valid": self.valid.clone(),
               f"layer.{l}.values": self.values.clone(), f"layer.{l}.uid": self.uid.clone()}
        if self.whiten is not None:
            out[f"layer.{l}.whiten"] = self.whiten.clone()
        if self.boundary is not None:
            out[f"layer.{l}.boundary.weight"] = self.boundary.weight.clone()
            out[f"layer.{l}.boundary.bias"] = torch.tensor([self.boundary.bias], dtype=F64)
        if self.question_layer is not None:
            out[f"question.{self.question_layer}.keys"] = self.qkeys.clone()
            if self.whiten_q is not None:
                out[f"question.{self.question_layer}.whiten"] = self.whiten_q.clone()
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> "GatedMemory":
        l = self.layer
        if f"layer.{l}.uid" in sd:
            keys, valid = _four_d(sd[f"layer.{l}.keys"].float(), sd.get(f"layer.{l}.valid"))
            values, uid = sd[f"layer.{l}.values"].float(), sd[f"layer.{l}.uid"].long()
            if (keys.shape[0], keys.shape[3]) != (uid.numel(), self.keys.shape[3]) or \
                    values.shape != (uid.numel(), self.values.shape[1]):
                raise ValueError(f"gated state at layer {l}: keys {tuple(keys.shape)} / values {tuple(values.shape)} "
                                 f"do not match {uid.numel()} entries of widths {self.keys.shape[3]} / "
                                 f"{self.values.shape[1]}")
            self.keys, self.valid, self.values, self.uid = keys.clone(), valid.clone(), values.clone(), uid.clone()
        if f"layer.{l}.whiten" in sd:
            self.whiten = sd[f"layer.{l}.whiten"].to(F64).clone()
        if f"layer.{l}.boundary.weight" in sd or f"layer.{l}.boundary.bias" in sd:
            w, b = sd.get(f"layer.{l}.boundary.weight"), sd.get(f"layer.{l}.boundary.bias")
            if w is None or b is None or b.numel() != 1:
                raise ValueError(f"gated state: 'layer.{l}.boundary.weight' and 'layer.{l}.boundary.bias' (one "
                                 "number) come together; the state file is damaged")
            if w.shape != (self.keys.shape[3],):
                raise ValueError(f"gated state: 'layer.{l}.boundary.weight' (the name-boundary weight) has shape "
                                 f"{tuple(w.shape)}, expected ({self.keys.shape[3]},)")
            self.boundary = NameBoundary(w.float().clone(), float(b.reshape(-1)[0]), self.hparams.boundary_threshold)
        if self.question_layer is not None:
            q = f"question.{self.question_layer}"
            if f"{q}.keys" in sd:
                qkeys = sd[f"{q}.keys"].float()
                if qkeys.shape[0] != len(self) or qkeys.shape[2] != self.qkeys.shape[2]:
                    raise ValueError(f"gated state: question keys {tuple(qkeys.shape)} do not match {len(self)} "
                                     f"entries of width {self.qkeys.shape[2]}")
                self.qkeys = qkeys.clone()
            elif len(self):
                raise ValueError(f"gated state has {len(self)} entries but no '{q}.keys' for the profile's "
                                 f"question gate at layer {self.question_layer}")
            if f"{q}.whiten" in sd:
                self.whiten_q = sd[f"{q}.whiten"].to(F64).clone()
        return self

    def total_delta(self, layer: int) -> torch.Tensor | None:
        return None  # the weights are never changed (W − W₀ = 0; the ledger keeps its zero total)


def make_gated_state(adapter: ModelAdapter, hparams: GatedHParams, stats: CovarianceSource | None = None,
                     base: dict[int, torch.Tensor] | None = None) -> GatedMemory:
    """An empty memory at ``hparams.layers[0]`` (C is read from ``stats`` on the first step)."""
    layer = hparams.layers[0]
    adapter.check_layer(layer)
    if hparams.question_layer is not None:
        adapter.check_layer(hparams.question_layer)
    return GatedMemory(layer, adapter.d_mlp, adapter.d_model, hparams, stats)


def _four_d(keys: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys as (n, contexts, tokens, d) and their validity (n, contexts, tokens): a (n, d) tensor is one
    context and one token per entry, a (n, c, d) one token per context (states before ``gate_tokens``)."""
    if keys.dim() == 2:
        keys = keys[:, None, None]
    elif keys.dim() == 3:
        keys = keys[:, :, None]
    if keys.dim() != 4:
        raise ValueError(f"gated keys must be (n, d), (n, c, d) or (n, c, m, d), got {tuple(keys.shape)}")
    if valid is None:
        valid = torch.ones(keys.shape[:3], dtype=torch.bool)
    valid = valid.to(torch.bool).reshape(keys.shape[:3])
    return keys, valid


def _first_occurrence_groups(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows (n, D): a group id per row (n,) int64, equal exactly for bit-identical rows and numbered
    in order of first occurrence (so rows without duplicates keep their order: group i is row i); and
    each group's first row (groups,) int64, ascending."""
    n = rows.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=rows.device)
        return empty, empty.clone()
    _, inv = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inv.max()) + 1,), n, dtype=torch.long, device=rows.device)
    first.scatter_reduce_(0, inv, torch.arange(n, device=rows.device), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(first)
    rank[order] = torch.arange(first.numel(), device=rows.device)
    return rank[inv], first[order]


def merge_identical_entries(keys: torch.Tensor, valid: torch.Tensor | None, values: torch.Tensor,
                            qkeys: torch.Tensor | None = None):
    """Entries whose keys are bit-identical (subject keys, their validity and, with a question gate, the
    question keys) fire at exactly the same tokens, so a gate may hold them as one entry with the sum of
    their values: the same output up to float rounding of the sum. A stream that edits a fact again (a
    re-edit computes the same keys, bit for bit, as the fact's first edit) then costs the gate nothing.

    Returns (keys, valid, values, qkeys) of the merged entries, in order of first occurrence, and
    ``group`` (n,) int64: each original entry's merged index (the identity when nothing merges)."""
    keys, valid = _four_d(keys, valid)
    n = keys.shape[0]
    if n == 0:
        return keys, valid, values, qkeys, torch.zeros(0, dtype=torch.long)
    parts = [keys.reshape(n, -1).float(), valid.reshape(n, -1).float()]
    if qkeys is not None:
        parts.append(qkeys.reshape(n, -1).float())
    group, first = _first_occurrence_groups(torch.cat(parts, dim=1))
    if first.numel() == n:  # nothing to merge: group is the identity (first-occurrence order)
        return keys, valid, values, qkeys, group
    merged_values = values.new_zeros(first.numel(), values.shape[1]).index_add_(0, group.to(values.device), values)
    first = first.cpu()
    return (keys[first.to(keys.device)], valid[first.to(valid.device)], merged_values,
            None if qkeys is None else qkeys[first.to(qkeys.device)], group)


def _per_stored_entry(fire: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, merged entries) → (batch, seq, entries as stored) for diagnostics."""
    return fire if group is None else fire[..., group.to(fire.device)]


def _cache_length(cache) -> int:
    """Positions already in a KV cache (a transformers ``Cache`` or a legacy tuple); 0 for None."""
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2]) if len(cache) and cache[0] is not None else 0
    return int(cache.get_seq_length())


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal bit for bit (both None counts as equal)."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


class _Recent:
    """The last few (input, answer) pairs of a gate, newest first. v* forwards the same few groups of
    rows in turn at every step, so one remembered input would always be the other group's. Holds at
    most ``size`` pairs and ``max_bytes`` of remembered inputs (the oldest go first)."""

    def __init__(self, size: int = 16, max_bytes: int = 256 * 2**20):
        self.size, self.max_bytes, self.items = size, max_bytes, []

    def find(self, *inputs):
        for i, item in enumerate(self.items):
            if all(_same(a, b) for a, b in zip(item[0], inputs)):
                if i:
                    self.items.insert(0, self.items.pop(i))
                return item
        return None

    def put(self, inputs: tuple, answer) -> tuple:
        item = (tuple(None if t is None else t.detach().clone() for t in inputs), answer)
        self.items.insert(0, item)
        del self.items[self.size:]
        total = 0
        for i, it in enumerate(self.items):
            total += sum(t.numel() * t.element_size() for t in it[0] if t is not None)
            if total > self.max_bytes and i > 0:
                del self.items[i:]
                break
        return item


class _Gate:
    """The forward hook: adds the firing entries' values to the down-projection's output.

    Entry e fires at token t where, for some context c, cos_C(k_t, k_e,c,0) > τ and, for each earlier
    subject token j the entry has (valid), cos_C(k_{t−j}, k_e,c,j) > τ_before (default τ). The one-token test runs on all
    (token, entry, context) pairs; the earlier tokens are checked only for the pairs that pass it.
    A companion pre-hook on the whole model (:meth:`on_model_call`) tells a fresh forward from one
    that resumes a KV cache (see the module docstring for what the gate does then).

    With a name-boundary test (``boundary``, :mod:`..boundary`) no entry fires at a token whose NEXT token
    in the same forward (not padding) continues a name: the entry of "Adobe Flash" stays out of "Adobe
    Flash Player". A forward's last token has no next token in it and is decided without the test, so a
    text split across KV-cache calls right after a subject's last token can fire where the whole text
    would not; ``generate`` splits after the prompt, which rarely ends in a name."""

    def __init__(self, whiten: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tau: float, device,
                 valid: torch.Tensor | None = None, record: bool = False, tau_before: float | None = None,
                 group: torch.Tensor | None = None, boundary: NameBoundary | None = None):
        self.whiten_t = whiten.to(device=device, dtype=torch.float32).T.contiguous()  # k @ L⁻ᵀ = (L⁻¹k)ᵀ
        keys, valid = _four_d(keys, valid)
        n, self.contexts, self.tokens, d = keys.shape
        z = keys.reshape(-1, d).to(device=device, dtype=torch.float32) @ self.whiten_t
        unit = (z / z.norm(dim=1, keepdim=True).clamp_min(1e-30)).reshape(n, self.contexts, self.tokens, d)
        # the last-token test runs against each DISTINCT key once: one subject's keys in one context are
        # bit-identical across its relations whenever the subject comes first in the prompt (on the
        # testbed 1,650 distinct columns of 12,100), and across re-edits of a fact
        last = unit[:, :, 0].reshape(-1, d)
        col, first = _first_occurrence_groups(last)
        self.unique_last_t = last[first].T.contiguous()  # (d_mlp, distinct columns)
        self.column_of = col  # (n · c,) each (entry, context)'s column
        self.group = group  # (entries as stored,) → entry here, when the caller merged identical entries
        self.unit_before = unit[:, :, 1:]  # (n, c, m − 1, d_mlp)
        self.valid_before = valid[:, :, 1:].to(device)
        self.values = values.to(device=device, dtype=torch.float32)
        self.boundary = boundary
        self._mask: torch.Tensor | None = None  # the forward's attention mask (batch, past + seq), if given
        self.tau = float(tau)
        self.tau_before = self.tau if tau_before is None else float(tau_before)
        self.record = record
        self.fired = 0  # tokens at which some entry fired (diagnostics)
        self.last_fire: torch.Tensor | None = None  # (batch, seq) bool of the last call (diagnostics)
        self.last_fire_entries: torch.Tensor | None = None  # (batch, seq, n) bool, kept with ``record``
        self.last_candidates: torch.Tensor | None = None  # (batch, seq) bool: some entry's last key matched
        self._cache, self._past = None, 0  # the KV cache of the forward under way, and its length before it
        self._positions: torch.Tensor | None = None  # its explicit position ids, if any
        self._history: torch.Tensor | None = None  # (batch, m − 1, d_mlp) whitened unit keys of the last call
        self._history_of = None  # weak reference to the cache that call filled
        self._recent = _Recent()  # ((input,), (fire, candidates)) of recent fresh calls
        self.memo_hit = False  # whether the last call reused one
        self.memo_item: tuple | None = None  # the remembered call the last one was or became

    def on_model_call(self, module, args, kwargs):
        """Forward pre-hook of the whole model: note the KV cache the forward resumes (if any)."""
        cache = kwargs.get("past_key_values")
        cache = kwargs.get("cache") if cache is None else cache
        self._cache, self._past = cache, _cache_length(cache)
        self._positions = kwargs.get("position_ids")  # (batch or 1, seq): each token's place in its own text
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _name_goes_on(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, seq) bool: the next token of this forward continues a name (the boundary test at t + 1)."""
        goes_on = self.boundary.continues(z)  # (batch, seq): this token continues a name
        mask = self._mask
        if mask is not None and mask.shape[0] == z.shape[0] and mask.shape[1] >= z.shape[1]:
            goes_on = goes_on & mask[:, -z.shape[1]:].to(device=z.device, dtype=torch.bool)  # padding continues nothing
        stop = torch.zeros_like(goes_on)
        stop[:, :-1] = goes_on[:, 1:]
        return stop

    def _tokens_before(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The whitened unit keys the earlier-token test reads: this call's, preceded by the previous
        call's last m − 1 where that call filled the cache this one resumes; and how many were prepended."""
        hist = self._history
        same = self._history_of is not None and self._cache is not None and self._history_of() is self._cache
        if self._past > 0 and same and hist is not None and hist.shape[0] == z.shape[0]:
            return torch.cat([hist, z], dim=1), hist.shape[1]
        return z, 0

    def _keep_history(self, z_ext: torch.Tensor) -> None:
        self._history, self._history_of = None, None
        if self._cache is not None:
            try:
                self._history_of = weakref.ref(self._cache)
            except TypeError:  # a cache type without weak references: no history (the fallback rule applies)
                return
            self._history = z_ext[:, -(self.tokens - 1):].detach()

    def __call__(self, module, args, out):
        fire = self.match(args[0])
        if fire is None or not bool(self.last_fire.any()):
            return None
        self.fired += int(self.last_fire.sum())
        return out + (fire.to(torch.float32) @ self.values).to(out.dtype)

    def match(self, x: torch.Tensor) -> torch.Tensor | None:
        """Which entries' keys match at each token of ``x`` (batch, seq, d_mlp), the down-projection's
        input: (batch, seq, n) bool, None without entries; sets the diagnostics (``last_fire`` …)."""
        n = self.values.shape[0]
        self.memo_hit, self.memo_item = False, None
        if n == 0:
            self.last_fire = self.last_fire_entries = self.last_candidates = None
            return None
        # A one-token gate on a forward that resumes no cache is a function of x alone: v* forwards the
        # same rows every step (keys below the value's layer do not depend on δ), so an input equal, bit
        # for bit, to a recent one gets that call's answer without the comparison against every entry.
        fresh = self.tokens == 1 and self._past == 0
        memo_key = (x,) if self.boundary is None else (x, self._mask)  # the boundary test also reads the padding
        item = self._recent.find(*memo_key) if fresh else None
        if item is not None:
            fire, self.last_candidates = item[1]
            self.memo_hit, self.memo_item = True, item
            return self._finish(fire)
        z = x.to(torch.float32) @ self.whiten_t
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # (batch, seq, d_mlp)
        hit = ((z @ self.unique_last_t) > self.tau)[..., self.column_of]  # (batch, seq, n · c)
        hit = hit.unflatten(-1, (n, self.contexts))  # (batch, seq, n, c)
        self.last_candidates = hit.flatten(2).any(-1)
        if self.tokens > 1:
            z_ext, shift = self._tokens_before(z)
            self._keep_history(z_ext)
            if bool(hit.any()):
                b, t, e, c = torch.nonzero(hit, as_tuple=True)
                ok = torch.ones_like(b, dtype=torch.bool)
                for j in range(1, self.tokens):
                    pos = t + shift - j
                    seen = pos >= 0
                    cos = (z_ext[b, pos.clamp_min(0)] * self.unit_before[e, c, j - 1]).sum(-1)
                    needed = self.valid_before[e, c, j - 1]
                    # an unseen token: before the text's start there is none (no match); one hidden in the
                    # KV cache counts as matching. Where a text starts: its position ids when the forward
                    # has them (left-padded cached rows: v*), else z_ext's first column is position past − shift
                    if self._positions is not None and self._positions.shape[-1] == z.shape[1]:
                        where = self._positions.to(t.device).expand(z.shape[0], -1)[b, t]
                        exists = where - j >= 0
                    else:
                        exists = pos + (self._past - shift) >= 0
                    ok &= ~needed | torch.where(seen, cos > self.tau_before, exists)
                hit = torch.zeros_like(hit)
                hit[b[ok], t[ok], e[ok], c[ok]] = True
        fire = hit.any(-1)  # (batch, seq, n)
        if self.boundary is not None and bool(fire.any()):
            fire = fire & ~self._name_goes_on(z)[..., None]
        if fresh:
            self.memo_item = self._recent.put(memo_key, (fire, self.last_candidates))
        return self._finish(fire)

    def _finish(self, fire: torch.Tensor) -> torch.Tensor:
        self.last_fire = fire.any(-1)
        self.last_fire_entries = _per_stored_entry(fire, self.group) if self.record else None
        return fire


class _QuestionGate:
    """The question gate (``question_layer``): entry e adds δ_e to the question layer's MLP output at
    token t where

    * its subject gate (a :class:`_Gate` at the subject layer, whose values are not used) fired at some
      token s ≤ t of the same text — the subject was named —, and
    * cos_C(k_t, q_e,c) > τ_q for some context c, q_e,c the question layer's key at the last token of
      the edit prompt in context c — the edited question is being asked.

    Two forward hooks (:meth:`on_subject` at the subject layer, this object at the question layer)
    share one forward: the subject layer runs first and leaves ``seen`` (batch, seq, n) for it. A
    forward that resumes a KV cache filled by the previous call (``generate``) carries that call's
    ``seen`` at its last token forward."""

    def __init__(self, subject: _Gate, whiten_q: torch.Tensor, qkeys: torch.Tensor, values: torch.Tensor,
                 tau_q: float, device, record: bool = False, group: torch.Tensor | None = None):
        self.subject = subject
        self.whiten_t = whiten_q.to(device=device, dtype=torch.float32).T.contiguous()
        n, c, d = qkeys.shape
        z = qkeys.reshape(-1, d).to(device=device, dtype=torch.float32) @ self.whiten_t
        unit = z / z.norm(dim=1, keepdim=True).clamp_min(1e-30)
        self.unit = unit.reshape(n, c, d)  # (n, c, d_mlp_q) whitened unit question keys
        self.unit_t = unit.T.contiguous()  # (d_mlp_q, n · c)
        self.contexts = c
        self.group = group  # (entries as stored,) → entry here, when the caller merged identical entries
        # recent fresh calls: (subject call, mask) → seen, and per such entry (question-layer input) → change
        self._recent_seen = _Recent()
        self._recent_asked: _Recent | None = None  # the question-layer answers of the call under way's ``seen``
        self._seen_reused = False
        self.values = values.to(device=device, dtype=torch.float32)
        self.tau = float(tau_q)
        self.record = record
        self.fired = 0
        self.seen: torch.Tensor | None = None  # (batch, seq, n held entries) of the forward under way
        self.last_fire: torch.Tensor | None = None
        self.last_fire_entries: torch.Tensor | None = None
        self._carry: torch.Tensor | None = None  # (batch, n) ``seen`` at the last token of the previous call
        self._carry_of = None  # weak reference to the cache that call filled

    def on_model_call(self, module, args, kwargs):
        self.seen = None
        return self.subject.on_model_call(module, args, kwargs)  # keeps the forward's mask (``subject._mask``)

    def on_subject(self, module, args, out):
        """Forward hook at the subject layer: where each entry's subject has been named so far."""
        fire = self.subject.match(args[0])
        self._seen_reused, self._recent_asked = False, None
        if fire is None:
            self.seen = None
            return None
        mask = self.subject._mask
        item = None
        if self.subject.memo_item is not None:  # a fresh forward: its subject call is remembered (found or new)
            for it in self._recent_seen.items:
                if it[1][0] is self.subject.memo_item and _same(it[0][0], mask):
                    item = it
                    break
        if item is not None:  # the same subject-layer input and padding as a recent call
            seen, self._recent_asked, self._seen_reused = item[1][1], item[1][2], True
        else:
            if mask is not None and mask.shape[0] == fire.shape[0] and mask.shape[1] >= fire.shape[1]:
                # a padding token names no subject (its key is computed all the same, and could match)
                fire = fire & mask[:, -fire.shape[1]:].to(device=fire.device, dtype=torch.bool)[..., None]
            seen = fire.cumsum(dim=1) > 0  # (batch, seq, n): named at this token or before
            if self.subject.memo_item is not None:
                live = {id(it) for it in self.subject._recent.items}  # a subject call forgotten there cannot recur
                self._recent_seen.items = [it for it in self._recent_seen.items if id(it[1][0]) in live]
                self._recent_asked = _Recent(4)
                self._recent_seen.put((mask,), (self.subject.memo_item, seen, self._recent_asked))
        cache = self.subject._cache
        same = self._carry_of is not None and cache is not None and self._carry_of() is cache
        if self.subject._past > 0 and same and self._carry is not None and self._carry.shape[0] == seen.shape[0]:
            seen = seen | self._carry[:, None]
        self._carry, self._carry_of = None, None
        if cache is not None:
            try:
                self._carry_of = weakref.ref(cache)
                self._carry = seen[:, -1].detach()
            except TypeError:  # a cache type without weak references: nothing carried to the next call
                pass
        self.seen = seen
        return None

    def __call__(self, module, args, out):
        n = self.values.shape[0]
        if n == 0:
            return None
        x = args[0]
        if self.seen is None or self.seen.shape[:2] != x.shape[:2]:
            raise RuntimeError("gated: the question gate needs its subject layer to run in the same forward "
                               f"(it saw {None if self.seen is None else tuple(self.seen.shape[:2])} tokens, the "
                               f"question layer {tuple(x.shape[:2])}); a forward that starts above the subject "
                               "layer cannot use it")
        item = self._recent_asked.find(x) if self._recent_asked is not None else None
        if item is not None:
            fire, add = item[1]  # the same subject decisions and question-layer input as a recent call
        else:
            z = x.to(torch.float32) @ self.whiten_t
            z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            fire = self._asked(z) & self.seen  # (batch, seq, n)
            add = (fire.to(torch.float32) @ self.values) if bool(fire.any()) else None
            if self._recent_asked is not None:
                self._recent_asked.put((x,), (fire, add))
        self.last_fire = fire.any(-1)
        self.last_fire_entries = _per_stored_entry(fire, self.group) if self.record else None
        if add is None:
            return None
        self.fired += int(self.last_fire.sum())
        return out + add.to(out.dtype)

    def _asked(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, seq, n) bool: cos_C(k_t, q_e,c) > τ_q for some c, computed only for the entries whose
        subject each row has named (elsewhere False: such an entry cannot fire there). A row names
        few subjects, so this compares each token with a handful of entries instead of all of them;
        where rows name many, every entry is compared (the same answer at the named entries)."""
        seen = self.seen
        b, s, n = seen.shape
        named = seen.any(1)  # (batch, n)
        m = int(named.sum(1).max()) if b else 0
        if m == 0:
            return torch.zeros_like(seen)
        c, d = self.contexts, z.shape[-1]
        if 4 * m > n or b * m * c * d > 2**26:  # rows name many entries, or the per-row keys would be large
            return ((z @ self.unit_t).unflatten(-1, (n, c)) > self.tau).any(-1)
        order = torch.argsort(named.to(torch.int8), dim=1, descending=True, stable=True)[:, :m]  # (batch, m)
        keys = self.unit[order].reshape(b, m * c, d)  # each row's named entries (and fillers), (batch, m·c, d)
        asked = (torch.bmm(z, keys.transpose(1, 2)).unflatten(-1, (m, c)) > self.tau).any(-1)  # (batch, seq, m)
        asked &= torch.gather(named, 1, order)[:, None, :]  # fillers never ask
        return torch.zeros_like(seen).scatter_(2, order[:, None, :].expand(b, s, m), asked)


def _register(adapter: ModelAdapter, layer: int, gate: "_Gate | _QuestionGate",
              question_layer: int | None = None) -> tuple:
    """Hook ``gate`` on ``layer``'s down-projection and its companion pre-hook on the model: the handles.
    A question gate hooks its subject part on ``layer`` and itself on ``question_layer``."""
    mod = adapter.site_module("key", layer)
    if isinstance(gate, _QuestionGate):
        return (mod.register_forward_hook(gate.on_subject),
                adapter.site_module("key", question_layer).register_forward_hook(gate),
                adapter.model.register_forward_pre_hook(gate.on_model_call, with_kwargs=True))
    return (mod.register_forward_hook(gate),
            adapter.model.register_forward_pre_hook(gate.on_model_call, with_kwargs=True))


def _make_gate(adapter: ModelAdapter, layer: int, whiten: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               tau: float, valid: torch.Tensor | None, tau_before: float | None, record: bool = False,
               question: "tuple[int, torch.Tensor, torch.Tensor, float] | None" = None,
               boundary: NameBoundary | None = None):
    """A subject gate, or with ``question`` = (layer, whitening factor, keys (n, c, d), τ) a question gate;
    ``boundary`` adds the name-boundary test to the subject gate. Entries with bit-identical keys are held
    as one (:func:`merge_identical_entries`)."""
    qkeys = None if question is None else question[2]
    keys, valid, values, qkeys, group = merge_identical_entries(keys, valid, values, qkeys)
    group = None if group.numel() == keys.shape[0] else group  # nothing merged: entries as stored
    if question is None:
        return _Gate(whiten, keys, values, tau, adapter.layer_device(layer), valid, record, tau_before, group,
                     boundary)
    q_layer, whiten_q, _, tau_q = question
    subject = _Gate(whiten, keys, values, tau, adapter.layer_device(layer), valid, False, tau_before,
                    boundary=boundary)
    return _QuestionGate(subject, whiten_q, qkeys, values, tau_q, adapter.layer_device(q_layer), record, group)


@contextmanager
def entries_active(adapter: ModelAdapter, layer: int, whiten: torch.Tensor, keys: torch.Tensor,
                   values: torch.Tensor, tau: float, valid: torch.Tensor | None = None,
                   tau_before: float | None = None,
                   question: "tuple[int, torch.Tensor, torch.Tensor, float] | None" = None,
                   boundary: NameBoundary | None = None):
    """Entries (keys (n, c, m, d), (n, c, d) or (n, d); values (n, d_model)) acting at ``layer`` for the
    duration of a ``with`` (hooks removed on exit); yields the gate. ``question`` = (question layer,
    its whitening factor, question keys (n, c, d), τ_q) makes it a question gate (values added there);
    ``boundary`` adds the name-boundary test."""
    gate = _make_gate(adapter, layer, whiten, keys, values, tau, valid, tau_before, question=question,
                      boundary=boundary)
    handles = _register(adapter, layer, gate, None if question is None else question[0])
    try:
        yield gate
    finally:
        for h in handles:
            h.remove()


def install_memory(adapter: ModelAdapter, state: GatedMemory, record: bool = False) -> None:
    """Make the model compute with a snapshot of ``state``'s entries (replacing any installed before).

    The hooks stay until :func:`remove_memory` or the next install; an empty memory installs nothing.
    ``record`` keeps which entry fired where on the last call (``installed_gate(...).last_fire_entries``)."""
    remove_memory(adapter, state.layer)
    if len(state) == 0:
        return
    whiten = state.ensure_whitening(None)
    question = None if state.question_layer is None else (state.question_layer, state.whiten_q, state.qkeys,
                                                           state.hparams.tau_question)
    gate = _make_gate(adapter, state.layer, whiten, state.keys, state.values, state.hparams.tau, state.valid,
                      state.hparams.tau_before, record, question, state.ensure_boundary(adapter))
    setattr(adapter.site_module("key", state.layer), _HANDLE,
            (_register(adapter, state.layer, gate, state.question_layer), gate))


def remove_memory(adapter: ModelAdapter, layer: int) -> None:
    mod = adapter.site_module("key", layer)
    installed = getattr(mod, _HANDLE, None)
    if installed is not None:
        for h in installed[0]:
            h.remove()
        delattr(mod, _HANDLE)


def installed_gate(adapter: ModelAdapter, layer: int) -> "_Gate | None":
    """The gate installed at ``layer`` (its ``fired`` counter), or None."""
    installed = getattr(adapter.site_module("key", layer), _HANDLE, None)
    return installed[1] if installed is not None else None


def rows_lookback(gates: list, tokens: int):
    """For v*'s fast plan (``optimize_values(lookback=…)``): per row, how many positions before δ's the
    gates must see. A gate reads the m − 1 tokens before a token only where some entry's last key
    matched there (its candidates); the first positions a cached row recomputes, δ's and the m − 2 after
    it, have those tokens in the cache. So a row needs m − 1 where the gates' last forward (the plain
    forward of these rows, δ = 0; keys at the gate's layer do not depend on δ, which enters at its
    output) had a candidate in that window, and 0 elsewhere.

    A gate with a name-boundary test decides a token by the token after it, which the cached prefix's
    last token does not have in its own forward: where that token is a candidate ("Wii" before " U",
    when "Wii U" is edited after "Wii") the row is recomputed from its start. Not covered: v*'s rows end
    at the target's last read (``value_rows`` drops the token after it), so a target whose last token
    would continue an edited subject ending at the token before (target "Windows Phone" after an edit
    of "Windows") is optimised with that entry firing; the SmolLM2 stream has no such target."""
    def lookback(subject_last: torch.Tensor) -> torch.Tensor:
        need = torch.zeros(subject_last.shape[0], dtype=torch.bool)
        last = subject_last.cpu()
        rows = torch.arange(need.shape[0])
        cols = last[:, None] + torch.arange(max(tokens - 1, 1))[None]  # (rows, window)
        for g in gates:
            cand = g.last_candidates
            if cand is None:
                continue
            cand = cand.cpu()
            if cand.shape[0] != need.shape[0]:
                raise RuntimeError(f"gated: the gate's last forward had {cand.shape[0]} rows, v* has {need.shape[0]}")
            inside = cols < cand.shape[1]
            need |= (cand[rows[:, None], cols.clamp_max(cand.shape[1] - 1)] & inside).any(1)
        back = need.long() * (tokens - 1)
        for g in gates:
            if getattr(g, "boundary", None) is None or g.last_candidates is None:
                continue
            cand = g.last_candidates.cpu()
            end = last - back - 1  # the cached prefix's last token
            decided_blind = (end >= 0) & cand[rows, end.clamp(0, cand.shape[1] - 1)]
            back = torch.where(decided_blind, last, back)
        return back.to(subject_last.device)
    return lookback


def gated_step(adapter: ModelAdapter, requests: list, hparams: GatedHParams, stats: CovarianceSource | None,
               state: GatedMemory | None = None) -> StepResult:
    """One batch on the model as it is (with the earlier entries installed): new entries in the journal.

    Per round of distinct subjects: the keys in every context and v* (ROME's, batched: ``optimize_values`` at site "value"),
    with the entries of earlier rounds acting through a temporary hook. ``state`` gets the new entries
    only when everything succeeded."""
    state = make_gated_state(adapter, hparams, stats) if state is None else state
    layer, q_layer = state.layer, state.question_layer
    whiten = state.ensure_whitening(stats)
    boundary = state.ensure_boundary(adapter)
    prefixes = context_prefixes(adapter, hparams.context_lengths, hparams.n_prefixes, hparams.seed)
    timings = {"keys": 0.0, "values": 0.0}
    n, m = len(requests), hparams.gate_tokens
    keys = torch.zeros(n, len(prefixes), m, adapter.d_mlp)
    valid = torch.zeros(n, len(prefixes), m, dtype=torch.bool)
    values = torch.zeros(n, adapter.d_model)
    qkeys = torch.zeros(n, len(prefixes), adapter.d_mlp) if q_layer is not None else None
    per_request: list[dict] = [{} for _ in range(n)]
    done: list[int] = []
    for idx in subject_rounds([r.subject for r in requests]):
        question = None if q_layer is None else (q_layer, state.whiten_q, qkeys[done], hparams.tau_question)
        with entries_active(adapter, layer, whiten, keys[done], values[done], hparams.tau, valid[done],
                            hparams.tau_before, question, boundary) as temporary:
            t0 = time.perf_counter()
            reqs = [requests[i] for i in idx]
            prompts, subjects = [r.prompt for r in reqs], [r.subject for r in reqs]
            k, ok = context_tail_keys(adapter, prompts, subjects, layer, prefixes, m)  # (round, contexts, m, d_mlp)
            if q_layer is not None:  # (round, contexts, d_mlp) at each prompt's last token
                q = context_keys(adapter, prompts, subjects, [q_layer], prefixes, "last")[q_layer]
            t1 = time.perf_counter()
            items = [(r.prompt, r.subject, r.target_new) for r in reqs]
            if q_layer is None:
                vals = optimize_values(adapter, items, layer, "value", hparams, prefixes,
                                       lookback=rows_lookback([g for g in (installed_gate(adapter, layer), temporary)
                                                               if g is not None], m)
                                       if m > 1 or boundary is not None else 0,
                                       relations=[r.relation_id for r in reqs])
            else:  # the value goes in at the question's last token; the gates must see every row from its start
                vals = optimize_values(adapter, items, q_layer, "value", hparams, prefixes,
                                       relations=[r.relation_id for r in reqs], delta_at="last", exact=True)
            timings["keys"] += t1 - t0
            timings["values"] += time.perf_counter() - t1
        for j, i in enumerate(idx):
            if q_layer is not None:
                qkeys[i] = q[j].detach().float().cpu()
            keys[i], valid[i] = k[j].detach().float().cpu(), ok[j].cpu()
            values[i] = vals[j].delta.detach().float().cpu()
            per_request[i] = {"case_id": requests[i].case_id, "layer": layer,
                              "key_norm": float(k[j][:, 0].mean(0).norm()), **vals[j].summary()}
        done += idx
    uid = torch.arange(state.next_uid(), state.next_uid() + n, dtype=torch.long)
    journal = {f"layer.{layer}.keys": keys, f"layer.{layer}.valid": valid, f"layer.{layer}.values": values,
               f"layer.{layer}.uid": uid}
    if q_layer is not None:
        journal[f"question.{q_layer}.keys"] = qkeys
    state.add(journal)
    meta = {"model": adapter.identity(), "hparams": hparams.to_dict(), "requests": per_request,
            "timings": timings, "memory_entries": len(state)}
    return StepResult(WeightDelta({}, "gated", meta), journal)
