"""NAS (norm-anchor scaling) as an option of every closed-form method: anchored values have the anchor's
norm, point where the optimised value points, and the option changes nothing when it is off."""

import pytest
import torch

from helpers import corpus_cov, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.contexts import context_prefixes
from superedit.editing.hparams import (AlphaEditHParams, D4SHParams, HParamsError, KeelHParams, MEMITHParams,
                                      ROMEHParams)
from superedit.editing.keys import compute_keys
from superedit.editing.methods import get_method
from superedit.editing.methods.anchors import (anchored, reference_value_norm, trimmed_mean, value_norms,
                                               value_site_outputs)
from superedit.editing.methods.spread import memit_targets
from superedit.editing.values import optimize_value, optimize_values

F64 = torch.float64
FAST = dict(v_num_grad_steps=4, n_prefixes=1, context_lengths=[3])
REQS = [EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris", case_id=0),
        EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano", case_id=1)]
ANCHOR = 3.0


@pytest.fixture(scope="module")
def tiny():
    a = tiny_adapter("gpt2")
    return a, corpus_cov(a, [1, 2])


def test_anchored_rows_have_the_anchor_norm_and_keep_direction():
    v = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 2.0, 2.0]])
    out = anchored(v, 7.5)
    assert out.dtype == F64
    assert torch.allclose(out.norm(dim=1), torch.tensor([7.5, 0.0, 7.5], dtype=F64), rtol=0, atol=1e-12)
    assert torch.allclose(out[0] / 7.5, v[0].to(F64) / 5.0) and torch.equal(out[1], torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError):
        anchored(v, 0.0)


def test_rome_with_anchor_writes_a_value_of_the_anchor_norm(tiny):
    """ROME lands exactly on its target at k*, so the edited module's output there is v*_NAS: norm = anchor."""
    a, stats = tiny
    hp = ROMEHParams(layers=[1], norm_anchor=ANCHOR, **FAST)
    req = REQS[0]
    prefixes = context_prefixes(a, hp.context_lengths, hp.n_prefixes, hp.seed)
    k = compute_keys(a, [req.prompt], [req.subject], [1], prefixes, hp.fact_token)[1][0].to(F64)
    val = optimize_value(a, req.prompt, req.subject, req.target_new, 1, "value", hp, prefixes)
    res = get_method("rome").fn(a, [req], hp, stats)
    W = a.down_weight(1).to(F64) + res.delta.layers[1].dense(F64)
    out = W @ k + a.down_bias(1).to(F64)
    assert float(out.norm()) == pytest.approx(ANCHOR, rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(out, val.target.to(F64), dim=0)
    assert float(cos) == pytest.approx(1.0, abs=1e-6)  # same direction as the optimised v*
    info = res.meta["requests"][0]
    assert info["nas_v_star_norm"] * info["nas_scale"] == pytest.approx(ANCHOR, rel=1e-12)


def test_rome_without_anchor_lands_on_the_optimised_value(tiny):
    a, stats = tiny
    hp = ROMEHParams(layers=[1], **FAST)
    assert hp.norm_anchor == 0.0  # off by default
    req = REQS[1]
    prefixes = context_prefixes(a, hp.context_lengths, hp.n_prefixes, hp.seed)
    k = compute_keys(a, [req.prompt], [req.subject], [1], prefixes, hp.fact_token)[1][0].to(F64)
    val = optimize_value(a, req.prompt, req.subject, req.target_new, 1, "value", hp, prefixes)
    res = get_method("rome").fn(a, [req], hp, stats)
    out = (a.down_weight(1).to(F64) + res.delta.layers[1].dense(F64)) @ k + a.down_bias(1).to(F64)
    assert torch.allclose(out, val.target.to(F64), atol=1e-5)
    assert "nas_scale" not in res.meta["requests"][0]


def test_memit_targets_anchor_the_value_part_and_are_untouched_when_off(tiny):
    a, _ = tiny
    off = MEMITHParams(layers=[1, 2], **FAST)
    on = off.replace(norm_anchor=ANCHOR)
    prefixes = context_prefixes(a, off.context_lengths, off.n_prefixes, off.seed)
    vals = optimize_values(a, [(r.prompt, r.subject, r.target_new) for r in REQS], 2, "resid", off, prefixes)
    z_off, s_off = memit_targets(a, REQS, off, prefixes)
    assert torch.equal(z_off, torch.stack([v.target for v in vals]))  # bit-identical to the plain optimisation
    assert all("nas_scale" not in s for s in s_off)
    z_on, s_on = memit_targets(a, REQS, on, prefixes)
    v0 = value_site_outputs(a, REQS, 2).to(F64)
    h = torch.stack([v.init for v in vals]).to(F64)
    value_part = z_on - (h - v0)
    assert torch.allclose(value_part.norm(dim=1), torch.full((2,), ANCHOR, dtype=F64), rtol=1e-6, atol=0)
    v_star = v0 + torch.stack([v.delta for v in vals]).to(F64)
    assert torch.allclose(torch.nn.functional.cosine_similarity(value_part, v_star, dim=1),
                          torch.ones(2, dtype=F64), atol=1e-9)
    assert [s["nas_v_star_norm"] for s in s_on] == pytest.approx(v_star.norm(dim=1).tolist(), rel=1e-12)


@pytest.mark.parametrize("method,hp", [
    ("memit", MEMITHParams(layers=[1, 2], mom2_update_weight=10.0, **FAST)),
    ("d4s", D4SHParams(layers=[1, 2], mom2_update_weight=10.0, **FAST)),
    ("alphaedit", AlphaEditHParams(layers=[1, 2], L2=1.0, nullspace_threshold=0.1, nullspace_relative=True, **FAST)),
    ("keel", KeelHParams(layers=[1, 2], L2=1.0, nullspace_threshold=0.1, nullspace_relative=True, **FAST)),
])
def test_every_spread_method_takes_the_anchor(tiny, method, hp):
    a, stats = tiny
    plain = get_method(method).fn(a, REQS, hp, stats)
    nas = get_method(method).fn(a, REQS, hp.replace(norm_anchor=ANCHOR), stats)
    for info in nas.meta["requests"]:
        assert info["nas_v_star_norm"] * info["nas_scale"] == pytest.approx(ANCHOR, rel=1e-12)
    assert not torch.allclose(plain.delta.layers[2].dense(F64), nas.delta.layers[2].dense(F64))


def test_reference_value_norm_is_the_trimmed_mean_of_value_norms(tiny):
    a, _ = tiny
    hp = ROMEHParams(layers=[1], **FAST)
    norms = value_norms(a, REQS, hp, "value")
    assert reference_value_norm(a, REQS, hp, "value", drop_top=0.0) == pytest.approx(sum(norms) / 2, rel=1e-12)
    assert reference_value_norm(a, REQS, hp, "value", drop_top=0.5) == pytest.approx(min(norms), rel=1e-12)
    # δ added at the MLP output or at the residual after it changes the same forward: with no term that
    # depends on the site's own norm (weight decay, clamp), both sites give the same v* = v₀ + δ
    free = dict(v_weight_decay=0.0, clamp_norm_factor=1e6, **FAST)
    at_value = value_norms(a, REQS, ROMEHParams(layers=[1], **free), "value")
    at_resid = value_norms(a, REQS, MEMITHParams(layers=[1], **free), "resid")
    assert at_resid == pytest.approx(at_value, rel=1e-4)


def test_trimmed_mean_drops_the_top_five_percent():
    assert trimmed_mean([float(i) for i in range(1, 21)]) == pytest.approx(10.0)  # drops 20
    assert trimmed_mean([2.0, 4.0]) == 3.0  # ⌊0.05·2⌋ = 0 dropped
    with pytest.raises(ValueError):
        trimmed_mean([])


def test_negative_anchor_is_refused_naming_the_field():
    with pytest.raises(HParamsError, match="norm_anchor"):
        MEMITHParams(norm_anchor=-1.0)
