"""The fast v* path (blocks below the edited layer run once, finished requests leave the batch, the
head only at read positions) computes what the plain path computed, on every family.

``reference_optimize_values`` is the implementation before the fast path (git 0a8afd3), copied
verbatim as the specification: every step forwards every row from the embeddings.
"""

import pytest
import torch
import torch.nn.functional as F

from superedit.data import EditRequest
from superedit.editing.contexts import context_prefixes
from superedit.editing.hparams import MEMITHParams
from superedit.editing.values import KL_TEMPLATES, kl_rows_divergence, optimize_values
from superedit.models import ModelAdapter, Trace, encode_prompt_target, encode_prompts
from superedit.models.hooks import StartAt, add_at_positions
from superedit.models.positions import fill_template

REQS = [
    EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris"),
    EditRequest(prompt="{} is located in", subject="Eiffel Tower", target_new="Oslo"),
]
ITEMS = [(r.prompt, r.subject, r.target_new) for r in REQS]


# ----- the specification: the pre-fast-path implementation, verbatim -------------------------------
def _reference_logits_at_layer(adapter, inputs, edits, loss_layer, positions=None):
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


def reference_optimize_values(adapter: ModelAdapter, items, layer, site, hp, prefixes):
    device = adapter.device
    tok = adapter.tokenizer
    n, n_pre = len(items), len(prefixes)
    filled = [fill_template(pre + prompt, subject) for prompt, subject, _ in items for pre in prefixes]
    targets = [target for _, _, target in items for _ in prefixes]
    rw = encode_prompt_target(tok, [f[0] for f in filled], targets,
                              subject_spans=[(f[1], f[2]) for f in filled], device=device)
    mask, labels = rw.loss_mask()
    tgt_rows, tgt_cols = torch.nonzero(mask, as_tuple=True)
    tgt_labels = labels[tgt_rows, tgt_cols]
    owner = torch.arange(n, device=device).repeat_interleave(n_pre)
    row_len = mask.sum(1)
    kl = encode_prompts(tok, KL_TEMPLATES * n, [subject for _, subject, _ in items for _ in KL_TEMPLATES],
                        padding_side="right", device=device)
    kl_owner = torch.arange(n, device=device).repeat_interleave(len(KL_TEMPLATES))
    kl_rows = torch.arange(len(kl_owner), device=device)
    kl_idx = torch.tensor(kl.subject_last, device=device)
    with torch.no_grad():
        with Trace(adapter, reads=[(site, layer)]) as tr:
            adapter.model(**rw.model_inputs())
        first = torch.arange(n, device=device) * n_pre
        v0 = tr[site, layer][first, torch.tensor(rw.subject_last, device=device)[first]].detach().clone()
        kl_ref = F.log_softmax(_reference_logits_at_layer(adapter, kl.model_inputs(), {}, -1)[kl_rows, kl_idx], dim=-1)
    delta = torch.zeros_like(v0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    v0_norm = v0.norm(dim=1)
    max_norm = hp.clamp_norm_factor * v0_norm
    histories = [[] for _ in range(n)]
    steps = [0] * n
    active = torch.ones(n, dtype=torch.bool, device=device)
    for step in range(hp.v_num_grad_steps):
        opt.zero_grad()
        edits = {(site, layer): add_at_positions(rw.subject_last, delta[owner])}
        logits = _reference_logits_at_layer(adapter, rw.model_inputs(), edits, hp.v_loss_layer, (tgt_rows, tgt_cols))
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tgt_labels.unsqueeze(-1)).squeeze(-1)
        row_nll = torch.zeros(len(row_len), device=device, dtype=logp.dtype).index_add(0, tgt_rows, -logp) / row_len
        nll = torch.zeros(n, device=device, dtype=row_nll.dtype).index_add(0, owner, row_nll) / n_pre
        loss = nll + hp.v_weight_decay * delta.norm(dim=1) / v0_norm ** 2
        if hp.kl_factor > 0:
            kl_edits = {(site, layer): add_at_positions(kl.subject_last, delta[kl_owner])}
            cur = F.log_softmax(_reference_logits_at_layer(adapter, kl.model_inputs(), kl_edits, -1)[kl_rows, kl_idx],
                                dim=-1)
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
            delta[~active] = frozen
            norms = delta.norm(dim=1)
            over = norms > max_norm
            delta[over] *= (max_norm[over] / norms[over]).unsqueeze(1)
    delta = delta.detach()
    return [dict(target=v0[i] + delta[i], history=histories[i], steps=steps[i]) for i in range(n)]


# ----- helpers ------------------------------------------------------------------------------------
def staggered_threshold(adapter, layer, site, hp, prefixes) -> float | None:
    """An early-stop NLL at which the two requests stop at different steps (so one leaves the batch
    while the other keeps optimising), read off the reference's histories without early stop."""
    free = reference_optimize_values(adapter, ITEMS, layer, site, hp.model_copy(update={"v_early_stop_nll": 0.0}),
                                     prefixes)
    h0, h1 = free[0]["history"], free[1]["history"]

    def stop(h, t):
        return next((k for k, x in enumerate(h) if x < t), None)

    values = sorted(set(h0 + h1))
    best, best_gap = None, 0.0
    for lo, hi in zip(values, values[1:]):
        t = (lo + hi) / 2  # midway between two recorded NLLs, clear of float noise
        s0, s1 = stop(h0, t), stop(h1, t)
        later = max((s for s in (s0, s1) if s is not None), default=None) if None not in (s0, s1) else None
        if s0 != s1 and (later is None or later >= 2) and hi - lo > best_gap:
            best, best_gap = t, hi - lo
    return best


def assert_same(got, want, tol):
    assert got.steps == want["steps"]
    assert got.nll_history == pytest.approx(want["history"], rel=tol, abs=tol)
    rel = float((got.target - want["target"]).norm() / want["target"].norm())
    assert rel < 10 * tol, rel  # Adam divides by √v: a rounding-size gradient difference moves δ more


# ----- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol,context", [(torch.float64, 1e-10, 3), (torch.float32, 1e-5, 3),
                                               (torch.float64, 1e-10, 14)])
@pytest.mark.parametrize("site,layer", [("value", 2), ("resid", 1), ("value", 0)])
def test_fast_values_equal_reference(adapter, site, layer, dtype, tol, context):
    """Same steps, same NLL history, same v* as the plain path, with the KL term on and one request
    leaving the batch before the other: to 1e-10 in float64 (so any difference is rounding), to
    ~1e-5 in float32; 14-token prefixes put rows past Gemma 3's 16-token sliding window (test config)."""
    adapter.model.to(dtype)
    hp = MEMITHParams(layers=[layer], kl_factor=0.0625, v_num_grad_steps=6, n_prefixes=2, context_lengths=[context])
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    t = staggered_threshold(adapter, layer, site, hp, prefixes)
    assert t is not None, "no threshold staggers the two requests' stops"
    hp = hp.model_copy(update={"v_early_stop_nll": t})
    want = reference_optimize_values(adapter, ITEMS, layer, site, hp, prefixes)
    assert want[0]["steps"] != want[1]["steps"]  # the pruning path is exercised
    got = optimize_values(adapter, ITEMS, layer, site, hp, prefixes)
    for g, w in zip(got, want):
        assert_same(g, w, tol)


def test_fast_values_leave_the_model_as_it_was(adapter):
    """No stand-in block, hook or gradient is left behind."""
    hp = MEMITHParams(layers=[2], v_num_grad_steps=3, n_prefixes=2, context_lengths=[3])
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    enc = adapter.tokenizer(["Anna Berg was born in"], return_tensors="pt")
    with torch.no_grad():
        before = adapter.model(**enc).logits
    optimize_values(adapter, ITEMS, 2, "value", hp, prefixes)
    for block in adapter.blocks():
        assert "forward" not in vars(block)
        assert not block._forward_hooks and not block._forward_pre_hooks
    assert all(p.grad is None for p in adapter.model.parameters())
    with torch.no_grad():
        assert torch.equal(adapter.model(**enc).logits, before)


@pytest.mark.parametrize("layer", [1, 3])
def test_start_at_equals_full_forward(adapter, layer):
    """A forward started at block ``layer`` from the cached input of that block gives the full
    forward's logits (rotary/absolute positions and the padding mask are still the model's own)."""
    enc = adapter.tokenizer(["Anna Berg was born in Oslo", "The Eiffel Tower"], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = adapter.model(**enc).logits
        with Trace(adapter, reads=[("resid", layer - 1)], stop_after=True) as tr:
            adapter.model(**enc)
        with StartAt(adapter, layer, tr["resid", layer - 1], tr.arity["resid", layer - 1]):
            resumed = adapter.model(**enc).logits
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(resumed[mask], full[mask], rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(b) for b in adapter.blocks())


def test_start_at_refuses_a_mismatched_batch(adapter):
    enc = adapter.tokenizer(["Anna Berg was born in Oslo"], return_tensors="pt")
    with torch.no_grad():
        with Trace(adapter, reads=[("resid", 0)], stop_after=True) as tr:
            adapter.model(**enc)
        with pytest.raises(ValueError, match="cached"):
            with StartAt(adapter, 1, tr["resid", 0][:, :-1], tr.arity["resid", 0]):
                adapter.model(**enc)
    assert all("forward" not in vars(b) for b in adapter.blocks())


def test_fast_values_skip_what_cannot_change(adapter, monkeypatch):
    """Blocks below the edited layer run only in no-grad passes; the steps' passes skip the positions
    before δ, and a request that stopped early no longer sends its rows through the model."""
    from superedit.editing import values

    layer = 2
    hp = MEMITHParams(layers=[layer], kl_factor=0.0625, v_num_grad_steps=6, n_prefixes=2, context_lengths=[3])
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    n_pre = len(prefixes)  # "" and the generated ones
    hp = hp.model_copy(update={"v_early_stop_nll": staggered_threshold(adapter, layer, "value", hp, prefixes)})
    below_grad, steps_seen = [], []
    real = values._Rows.forward_reads

    def spy(self, *args, **kwargs):
        if torch.is_grad_enabled() and len(self.owner) > len(ITEMS):  # a step's prompt rows (not the KL rows)
            rows = torch.cat([g.rows for g in self.groups])  # the rows this step forwards
            steps_seen.append((len(rows), sum(g.computed_tokens for g in self.groups),
                               int(self.attention_mask[rows].sum())))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(values._Rows, "forward_reads", spy)
    handle = adapter.attn(0).register_forward_hook(lambda m, a, o: below_grad.append(torch.is_grad_enabled()))
    try:
        got = optimize_values(adapter, ITEMS, layer, "value", hp, prefixes)
    finally:
        handle.remove()
    assert below_grad and not any(below_grad)
    rows = [r for r, _, _ in steps_seen]
    assert rows[0] == 2 * n_pre and n_pre in rows and max(g.steps for g in got) >= 2
    assert all(computed < tokens for _, computed, tokens in steps_seen)  # fewer than the rows' real tokens


def test_a_plan_that_does_not_reproduce_the_forward_is_not_used(monkeypatch, caplog):
    """If resuming the forward gave different activations (simulated: a corrupted cached block
    input), the check refuses the fast plan once per model, warns, and v* is still the plain path's."""
    from superedit.editing import values

    class Corrupted(StartAt):
        def __init__(self, adapter, layer, hidden, arity=None):
            super().__init__(adapter, layer, 2 * hidden, arity)

    monkeypatch.setattr(values, "StartAt", Corrupted)
    adapter = __import__("helpers").tiny_adapter("llama")
    hp = MEMITHParams(layers=[2], kl_factor=0.0625, v_num_grad_steps=3, n_prefixes=2, context_lengths=[3])
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    with caplog.at_level("WARNING", logger="superedit.editing.values"):
        got = optimize_values(adapter, ITEMS, 2, "value", hp, prefixes)
    assert "does not reproduce the full forward" in caplog.text
    assert adapter.memo[("values.fast_plan_ok", 2, "value", adapter.n_layers - 1, "torch.float32", "cpu")] is False
    want = reference_optimize_values(adapter, ITEMS, 2, "value", hp, prefixes)
    for g, w in zip(got, want):
        assert_same(g, w, 1e-5)


def test_a_fast_plan_whose_loss_is_not_finite_falls_back_to_the_plain_path(adapter, monkeypatch, caplog):
    """If the fast plan's loss turns NaN (an attention backend that returns NaN for a fully padded
    cached row), the request is not taken for finished: v* is redone on the plain path, with a warning."""
    from superedit.editing import values

    layer, site = 2, "value"
    hp = MEMITHParams(layers=[layer], kl_factor=0.0625, v_num_grad_steps=4, n_prefixes=2, context_lengths=[3])
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    want = reference_optimize_values(adapter, ITEMS, layer, site, hp, prefixes)
    real = values._Rows.forward_reads

    def nan_when_fast(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        fast = any(g.cache is not None or g.hidden is not None for g in self.groups)
        return out * float("nan") if fast and torch.is_grad_enabled() else out

    monkeypatch.setattr(values._Rows, "forward_reads", nan_when_fast)
    adapter.memo[values._fast_plan_key(adapter, layer, site, adapter.n_layers - 1)] = True  # checked earlier
    got = optimize_values(adapter, ITEMS, layer, site, hp, prefixes)
    assert "not finite on the fast plan" in caplog.text
    assert adapter.memo[values._fast_plan_key(adapter, layer, site, adapter.n_layers - 1)] is False
    for g, w in zip(got, want):
        assert_same(g, w, 1e-5)


def test_fast_values_with_a_one_token_subject_equal_reference():
    """A one-token subject at the start of the unprefixed prompt has nothing before δ while the other
    rows of its group do: its cached prefix row is all padding (offset 0 in a group with S > 0)."""
    adapter = __import__("helpers").tiny_adapter("gpt2")
    items = [("{} was born in", "Anna", "Paris"), ("{} is located in", "Eiffel Tower", "Oslo")]
    assert len(adapter.tokenizer("Anna")["input_ids"]) == 1
    hp = MEMITHParams(layers=[1], kl_factor=0.0625, v_num_grad_steps=5, n_prefixes=2, context_lengths=[3],
                      v_early_stop_nll=0.0)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    adapter.model.to(torch.float64)
    want = reference_optimize_values(adapter, items, 1, "value", hp, prefixes)
    got = optimize_values(adapter, items, 1, "value", hp, prefixes)
    for g, w in zip(got, want):
        assert_same(g, w, 1e-10)
