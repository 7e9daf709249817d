"""Math invariants of the editing engine on tiny random models of every family."""

import pytest
import torch

from helpers import corpus_cov
from superedit.data import EditRequest
from superedit.editing.contexts import context_prefixes
from superedit.editing.delta import DeltaError, LayerDelta, WeightDelta
from superedit.editing.hparams import FTHParams, HParamsError, MEMITHParams, ROMEHParams, load_hparams
from superedit.editing.keys import compute_keys
from superedit.editing.methods import get_method
from superedit.editing.solve import memit_solve, rome_solve
from superedit.editing.values import optimize_value, optimize_values

FAST = dict(v_num_grad_steps=4, n_prefixes=2, context_lengths=[3])
REQS = [
    EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris"),
    EditRequest(prompt="{} is located in", subject="Eiffel Tower", target_new="Oslo"),
]


def weights(adapter):
    return {l: adapter.down_weight_param(l).detach().clone() for l in range(adapter.n_layers)}


def assert_untouched(adapter, before):
    for l, w in before.items():
        assert torch.equal(adapter.down_weight_param(l), w), f"layer {l} changed"


def test_rome_inserts_v_star_exactly_rank_one(adapter):
    hp = ROMEHParams(layers=[1], **FAST)
    stats = corpus_cov(adapter, [1])
    before = weights(adapter)
    delta = get_method("rome").fn(adapter, REQS[:1], hp, stats).delta
    assert_untouched(adapter, before)  # pure function
    d = delta.layers[1]
    assert d.low_rank and d.rank_bound == 1
    assert int(torch.linalg.matrix_rank(d.dense(torch.float64))) == 1
    # k* and v* recomputed independently through the shared key/value functions (deterministic)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    k = compute_keys(adapter, [REQS[0].prompt], [REQS[0].subject], [1], prefixes)[1][0].double()
    v_star = optimize_value(adapter, REQS[0].prompt, REQS[0].subject, REQS[0].target_new, 1, "value", hp,
                            prefixes).target.double()
    with delta.applied(adapter):
        got = adapter.down_weight(1).double() @ k
    assert (got - v_star).norm() / v_star.norm() < 1e-5
    assert (adapter.down_weight(1).double() @ k - v_star).norm() / v_star.norm() > 1e-3  # the edit did something
    assert_untouched(adapter, before)  # revert is exact


def test_rome_solve_hits_target():
    torch.manual_seed(0)
    W, A = torch.randn(8, 16), torch.randn(16, 16)
    C, k, v = A @ A.T + torch.eye(16), torch.randn(16), torch.randn(8)
    left, right = rome_solve(W, C, k, v)
    W2 = W.double() + torch.outer(left, right)
    assert (W2 @ k.double() - v.double()).norm() / v.norm() < 1e-10
    torch.testing.assert_close(right, torch.linalg.solve(C.double(), k.double()))


def test_memit_solve_equals_normal_equations():
    torch.manual_seed(1)
    d_in, d_out, n, lam = 24, 10, 5, 3.0
    A = torch.randn(d_in, d_in)
    C, K, R = A @ A.T / d_in + 0.1 * torch.eye(d_in), torch.randn(d_in, n), torch.randn(d_out, n)
    left, right = memit_solve(R, K, C, lam)
    delta = left @ right.T
    # normal equations: Δ (λC + KKᵀ) = R Kᵀ
    lhs = delta @ (lam * C.double() + K.double() @ K.double().T)
    torch.testing.assert_close(lhs, R.double() @ K.double().T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(delta, R.double() @ K.double().T @ torch.linalg.inv(lam * C.double() + K.double() @ K.double().T))


def test_memit_delta_is_pure_and_low_rank(adapter):
    hp = MEMITHParams(layers=[1, 2], mom2_update_weight=10.0, **FAST)
    before = weights(adapter)
    delta = get_method("memit").fn(adapter, REQS, hp, corpus_cov(adapter, [1, 2])).delta
    assert_untouched(adapter, before)
    assert sorted(delta.layers) == [1, 2]
    for d in delta.layers.values():
        assert int(torch.linalg.matrix_rank(d.dense(torch.float64))) <= len(REQS)
    delta.apply(adapter)
    assert not torch.equal(adapter.down_weight_param(2), before[2])
    delta.revert(adapter)
    assert_untouched(adapter, before)


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_ft_respects_linf_bound(fam):
    from helpers import tiny_adapter

    adapter = tiny_adapter(fam)
    hp = FTHParams(layers=[1], num_steps=3, lr=1e-2, norm_constraint=1e-3)
    before = weights(adapter)
    delta = get_method("ft").fn(adapter, REQS, hp, None).delta
    assert_untouched(adapter, before)
    dense = delta.layers[1].dense()
    assert dense.abs().max() <= 1e-3 + 1e-6
    assert dense.abs().max() > 0


def test_delta_save_load_round_trip(tmp_path, adapter):
    torch.manual_seed(0)
    d_model, d_mlp = adapter.d_model, adapter.d_mlp
    delta = WeightDelta({0: LayerDelta(torch.randn(d_model, 2), torch.randn(d_mlp, 2)),
                         2: LayerDelta(dense_=torch.randn(d_model, d_mlp))}, "rome",
                        {"model": adapter.identity(), "note": "x"})
    delta.save(tmp_path / "d")
    loaded = WeightDelta.load(tmp_path / "d")
    assert loaded.method == "rome" and loaded.meta["note"] == "x"
    for l in (0, 2):
        assert torch.equal(loaded.layers[l].dense(), delta.layers[l].dense())
    before = weights(adapter)
    loaded.apply(adapter)
    with pytest.raises(DeltaError, match="already applied"):
        loaded.apply(adapter)
    loaded.revert(adapter)
    assert_untouched(adapter, before)
    with pytest.raises(DeltaError, match="not a saved delta"):
        WeightDelta.load(tmp_path)


def test_delta_refuses_other_model(adapter):
    from helpers import tiny_adapter

    other = tiny_adapter("gpt2" if adapter.family != "gpt2" else "llama")
    delta = WeightDelta({0: LayerDelta(dense_=torch.zeros(adapter.d_model, adapter.d_mlp))}, "ft",
                        {"model": adapter.identity()})
    before = weights(other)
    with pytest.raises(DeltaError, match="config hash"):
        delta.apply(other)
    assert_untouched(other, before)


def test_hparams_yaml_validation(tmp_path):
    p = tmp_path / "h.yaml"
    p.write_text("layers: [2]\nv_lr: 0.1\n")
    hp = load_hparams(ROMEHParams, "rome", None, p)
    assert hp.layers == [2] and hp.v_lr == 0.1
    p.write_text("layerz: [2]\n")
    with pytest.raises(HParamsError, match="layerz"):
        load_hparams(ROMEHParams, "rome", None, p)
    p.write_text("layers: [1, 2]\n")
    with pytest.raises(HParamsError, match="exactly one layer"):
        load_hparams(ROMEHParams, "rome", None, p)
    p.write_text("v_lr: fast\n")
    with pytest.raises(HParamsError, match="v_lr.*number"):
        load_hparams(ROMEHParams, "rome", None, p)
    with pytest.raises(HParamsError, match="no such file"):
        load_hparams(ROMEHParams, "rome", None, tmp_path / "missing.yaml")
    assert "clamp_norm_factor" in ROMEHParams.help()


@pytest.mark.parametrize("site,kl_factor", [("value", 0.0625), ("resid", 0.0)])
def test_batched_values_equal_one_request_at_a_time(adapter, site, kl_factor):
    """optimize_values over several requests = optimize_value per request (row-wise Adam, clamp, early stop)."""
    hp = MEMITHParams(layers=[1], kl_factor=kl_factor, **FAST)
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    items = [(r.prompt, r.subject, r.target_new) for r in REQS]
    together = optimize_values(adapter, items, 1, site, hp, prefixes)
    for item, got in zip(items, together):
        alone = optimize_value(adapter, *item, 1, site, hp, prefixes)
        assert got.steps == alone.steps
        torch.testing.assert_close(got.target, alone.target, rtol=1e-4, atol=1e-5)
        assert got.nll_history == pytest.approx(alone.nll_history, rel=1e-4, abs=1e-5)
        assert float(got.delta.norm()) > 0  # the optimisation moved


def test_batched_values_early_stop_freezes_finished_rows(adapter):
    hp = MEMITHParams(layers=[1], **{**FAST, "v_num_grad_steps": 6}, v_early_stop_nll=1e9)  # everyone stops at once
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    vals = optimize_values(adapter, [(r.prompt, r.subject, r.target_new) for r in REQS], 1, "value", hp, prefixes)
    for v in vals:
        assert v.steps == 1 and torch.equal(v.delta, torch.zeros_like(v.delta))


def test_kl_directions_match_their_formulas():
    """kl_direction 'edited_orig' is ROME eq. 4's KL(P_edited ‖ P_orig); 'orig_edited' the reverse."""
    from superedit.editing.values import kl_rows_divergence

    g = torch.Generator().manual_seed(0)
    edited = torch.log_softmax(torch.randn(3, 11, generator=g, dtype=torch.float64), -1)
    orig = torch.log_softmax(torch.randn(3, 11, generator=g, dtype=torch.float64), -1)
    want_eo = (edited.exp() * (edited - orig)).sum(-1)
    want_oe = (orig.exp() * (orig - edited)).sum(-1)
    assert torch.allclose(kl_rows_divergence(edited, orig, "edited_orig"), want_eo, atol=1e-12)
    assert torch.allclose(kl_rows_divergence(edited, orig, "orig_edited"), want_oe, atol=1e-12)
    assert not torch.allclose(want_eo, want_oe)
    with pytest.raises(ValueError):
        kl_rows_divergence(edited, orig, "sideways")


def randomize_biases(adapter, seed: int = 0, scale: float = 0.5) -> None:
    """Every bias of the model (down-projection included, where the family has one) set to random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.model.named_parameters():
            if name.endswith("bias"):
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def test_rome_module_output_at_k_star_is_v_star_with_biases(adapter):
    """ROME's v* is what the down-projection must OUTPUT: with a bias b the residual is v* − (W k* + b),
    so after the edit the module maps k* to v* (not v* + b)."""
    randomize_biases(adapter)
    b = adapter.down_bias(1)
    hp = ROMEHParams(layers=[1], **FAST)
    stats = corpus_cov(adapter, [1])
    prefixes = context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed)
    req = REQS[0]
    k = compute_keys(adapter, [req.prompt], [req.subject], [1], prefixes)[1][0]
    v_star = optimize_value(adapter, req.prompt, req.subject, req.target_new, 1, "value", hp, prefixes).target.double()
    delta = get_method("rome").fn(adapter, [req], hp, stats).delta
    with delta.applied(adapter):
        out = adapter.down_proj(1)(k[None].to(adapter.dtype))[0].double()
    assert float((out - v_star).norm() / v_star.norm()) < 1e-5
    if b is not None:  # the families with a bias: the test would see the slip (the edit landing at v* + b)
        assert float(b.norm()) > 0
        assert float((out - b.double() - v_star).norm() / v_star.norm()) > 1e-3


@pytest.mark.parametrize("method", ["memit", "d4s", "alphaedit", "keel"])
def test_memit_family_lands_on_z_with_biases(adapter, method):
    """MEMIT, D4S, AlphaEdit and keel measure their residual on the real output (resid = … + W k + b), so a
    down-projection bias cannot slip in: with one request, one layer and a vanishing ridge the edited
    model's residual at the subject's last token is z itself. For Gemma 3, whose residual adds N(W k)
    (a norm on the MLP output), the spread maps the residual target through N's inverse
    (editing/out_norm.py); without it the residual would miss z (checked below)."""
    from superedit.editing.hparams import AlphaEditHParams, D4SHParams, KeelHParams
    from superedit.editing.keys import keys_at
    from superedit.editing.methods.spread import memit_targets

    randomize_biases(adapter, seed=1)
    tiny = dict(layers=[1], v_num_grad_steps=4, n_prefixes=0, context_lengths=[], mom2_update_weight=1e-8)
    hp = {"memit": MEMITHParams(**tiny), "d4s": D4SHParams(**tiny),
          "alphaedit": AlphaEditHParams(**tiny, L2=1e-8, nullspace_threshold=2.0, nullspace_relative=True),
          "keel": KeelHParams(**tiny, L2=1e-8, nullspace_threshold=2.0, nullspace_relative=True)}[method]
    stats = corpus_cov(adapter, [1])
    req = REQS[0]
    z = memit_targets(adapter, [req], hp, context_prefixes(adapter, [], 0))[0][0].double()
    cur = keys_at(adapter, [req.prompt], [req.subject], [1], site="resid")[1][0].double()
    delta = get_method(method).fn(adapter, [req], hp, stats).delta
    with delta.applied(adapter):
        got = keys_at(adapter, [req.prompt], [req.subject], [1], site="resid")[1][0].double()
    assert float((got - z).norm() / (z - cur).norm()) < 1e-3
    assert float((z - cur).norm()) > 1e-3 * float(cur.norm())  # the edit had somewhere to go
    if adapter.spec.mlp_out_norm is not None:  # the same solve with the norm ignored misses z
        import dataclasses

        spec = adapter.spec
        adapter.spec = dataclasses.replace(spec, mlp_out_norm=None)
        try:
            naive = get_method(method).fn(adapter, [req], hp, stats).delta
        finally:
            adapter.spec = spec
        with naive.applied(adapter):
            got_naive = keys_at(adapter, [req.prompt], [req.subject], [1], site="resid")[1][0].double()
        assert float((got_naive - z).norm() / (z - cur).norm()) > 1e-2


def test_value_targets_through_norm_inverts_a_gained_rmsnorm():
    """editing/out_norm.py: for a reachable residual move r = N(m') − N(m) the solved Δm gives
    N(m + Δm) − N(m) = r; a move off the norm's output set is reported by its relative error, not hidden."""
    from superedit.editing.out_norm import value_targets_through_norm

    class GainRMSNorm(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(-0.5, 0.5, d, dtype=torch.float64))

        def forward(self, x):
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 + self.weight)

    g = torch.Generator().manual_seed(0)
    norm, d = GainRMSNorm(16), 16
    m = torch.randn(3, d, generator=g, dtype=torch.float64)
    m2 = m + 0.3 * torch.randn(3, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        r = norm(m2) - norm(m)
    dm, err = value_targets_through_norm(norm, m, r)
    with torch.no_grad():
        got = norm(m + dm) - norm(m)
    assert float((got - r).norm() / r.norm()) < 1e-6 and float(err.max()) < 1e-6
    far = 50 * torch.ones(1, d, dtype=torch.float64)  # no normalised output is that far away
    dm_far, err_far = value_targets_through_norm(norm, m[:1], far)
    assert float(err_far[0]) > 0.5
    # the output is scale-invariant: the answer is scaled back to the value's own norm, not left far out
    assert abs(float((m[0] + dm_far[0]).norm() / m[0].norm()) - 1) < 1e-9


def test_precomputed_targets_give_the_same_delta(adapter):
    """A sweep reuses z across solves (``targets=``): the delta equals the one that computes z itself, a
    shifted z gives another delta (the given targets are used), and targets for another number of
    requests are refused before anything is solved."""
    from superedit.editing.hparams import AlphaEditHParams
    from superedit.editing.methods.alphaedit import make_alphaedit_state, projected_step
    from superedit.editing.methods.memit import memit_delta
    from superedit.editing.methods.spread import memit_targets

    hp = AlphaEditHParams(layers=[1, 2], mom2_update_weight=10.0, nullspace_threshold=2.0, nullspace_relative=True,
                          **FAST)
    stats = corpus_cov(adapter, [1, 2])
    targets = memit_targets(adapter, REQS, hp, context_prefixes(adapter, hp.context_lengths, hp.n_prefixes, hp.seed))
    before = weights(adapter)
    for step in (lambda t: memit_delta(adapter, REQS, hp, stats, targets=t),
                 lambda t: projected_step(adapter, REQS, hp, make_alphaedit_state(adapter, hp, stats), "alphaedit", t)):
        own, reused = step(None).delta, step(targets).delta
        moved = step((targets[0] + 0.5, targets[1])).delta  # other targets: the given z is the one solved for
        for l in (1, 2):
            a, b = own.layers[l].dense(torch.float64), reused.layers[l].dense(torch.float64)
            assert float(a.norm()) > 0
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-9 * float(a.abs().max()))
        assert float((moved.layers[2].dense(torch.float64) - own.layers[2].dense(torch.float64)).norm()) > \
            1e-3 * float(own.layers[2].dense(torch.float64).norm())
        assert_untouched(adapter, before)
    with pytest.raises(ValueError, match="targets hold 2 z"):
        memit_delta(adapter, REQS[:1], hp, stats, targets=targets)


def test_saved_targets_load_only_for_their_requests_and_value_settings(tmp_path):
    """z saved once serves every solve-only setting (threshold, α, λ); other requests, another order or
    another value setting is refused, naming what differs."""
    from superedit.editing.hparams import AlphaEditHParams
    from superedit.editing.methods.spread import load_targets, save_targets

    hp = AlphaEditHParams(layers=[1, 2], **FAST)
    z = torch.randn(2, 8, dtype=torch.float64)
    save_targets(tmp_path / "targets.pt", (z, [{"a": 1}, {"a": 2}]), REQS, hp)
    got, summaries = load_targets(tmp_path / "targets.pt", REQS, hp.model_copy(update={"L2": 1.0,
                                                                                      "nullspace_threshold": 0.1,
                                                                                      "mom2_update_weight": 7.0}))
    assert torch.equal(got, z) and summaries == [{"a": 1}, {"a": 2}]
    with pytest.raises(ValueError, match="other requests"):
        load_targets(tmp_path / "targets.pt", REQS[::-1], hp)
    with pytest.raises(ValueError, match="v_lr"):
        load_targets(tmp_path / "targets.pt", REQS, hp.model_copy(update={"v_lr": 0.123}))


def test_value_moves_through_norm_stay_at_the_values_size_when_eps_matters():
    """A target beyond the norm's outputs (an output grown 3×) with small values, where the norm's ε makes
    the output grow by ~5e-5 relative as the value grows: Gauss–Newton chases that gain out along the ray,
    and the move must still come back to ‖m‖ (Gemma's layer-4 values drifted to ~50 × ‖m‖ when a
    rounding-sized tolerance refused the return), with the error it reports being the one it reaches."""
    from superedit.editing.out_norm import value_targets_through_norm

    class GainRMSNorm(torch.nn.Module):  # Gemma 3's form: float32 inside, gain (1 + w), ε 1e-6
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(-0.5, 0.5, d))

        def forward(self, x):
            x = x.float()
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    g = torch.Generator().manual_seed(0)
    norm, d = GainRMSNorm(16), 16
    m = torch.randn(3, d, generator=g, dtype=torch.float64)
    m = m / m.norm(dim=1, keepdim=True) * 0.4  # mean(m²) = 0.01: ε / mean(m²) = 1e-4
    with torch.no_grad():
        r = 2.0 * norm(m).double()  # every output three times as long: outside the output set
    dm, err = value_targets_through_norm(norm, m, r)
    assert float(err.min()) > 1e-2  # unreachable, and reported so
    ratio = (m + dm).norm(dim=1) / m.norm(dim=1)
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-6), ratio
    with torch.no_grad():
        got = (norm(m + dm).double() - norm(m).double() - r).norm(dim=1) / r.norm(dim=1)
    assert torch.allclose(got, err, atol=1e-5)
