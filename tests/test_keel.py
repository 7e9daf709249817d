"""keel: cumulative least squares in the preserved-knowledge null space (editing/methods/keel.py)."""

import pytest
import torch

from helpers import corpus_cov, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.covariance import FixedCovariance
from superedit.editing.hparams import D4SHParams, KeelHParams
from superedit.editing.methods import get_method
from superedit.editing.methods.alphaedit import nullspace_projector
from superedit.editing.methods.keel import KeelState, KeelSums, keel_solve
from superedit.editing.methods.protocol import StepResult, total_key
from superedit.lifelong.ledger import Ledger

F64 = torch.float64
FAST = dict(v_num_grad_steps=4, n_prefixes=1, context_lengths=[3])
LAYERS = (1, 2)
REQS = [EditRequest(prompt=p, subject=s, target_new=n, case_id=i) for i, (p, s, n) in enumerate([
    ("{} was born in", "Anna Berg", "Paris"), ("{} is located in", "Eiffel Tower", "Oslo"),
    ("{} plays the", "Toko Yasuda", "piano"), ("{} is owned by", "Google Trends", "Apple")])]


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def spans():
    """A covariance of rank 40 (of d_mlp 128) per layer: its range is the 'preserved knowledge'."""
    d_mlp = tiny_adapter("gpt2").d_mlp
    g = torch.Generator().manual_seed(0)
    return {l: torch.randn(d_mlp, 40, generator=g, dtype=F64) for l in LAYERS}


@pytest.fixture(scope="module")
def low_rank_stats(spans):
    return FixedCovariance({l: s @ s.T / 40 for l, s in spans.items()})


@pytest.fixture(scope="module")
def world():
    return corpus_cov(tiny_adapter("gpt2"), list(LAYERS)), KeelHParams(layers=list(LAYERS), L2=1.0,
                                                                         nullspace_threshold=0.1,
                                                                         nullspace_relative=True, **FAST)


def weights(adapter):
    return {l: adapter.down_weight(l).detach().clone() for l in LAYERS}


def carry(adapter, base, state):
    """Set W = W₀ + Δ from the state (what a ledger does between steps)."""
    for l in LAYERS:
        adapter.set_down_weight(l, base[l].to(F64) + state.total_delta(l))


def two_steps(adapter, hp, stats):
    entry = get_method("keel")
    state = entry.make_state(adapter, hp, stats)
    base = weights(adapter)
    results = []
    for s in (0, 2):
        res = entry.fn(adapter, REQS[s:s + 2], hp, stats, state=state)
        results.append(res)
        carry(adapter, base, state)
    return state, results


# ------------------------------------------------------------------ (a) the delta is the formula
def test_keel_delta_equals_the_dense_formula_from_the_sums(world):
    stats, hp = world
    adapter = tiny_adapter("gpt2")
    entry = get_method("keel")
    state = entry.make_state(adapter, hp, stats)
    res = entry.fn(adapter, REQS[:3], hp, stats, state=state)
    assert isinstance(res, StepResult)
    assert set(res.journal) == {f"layer.{l}.{n}" for l in LAYERS for n in "RK"}
    I = torch.eye(adapter.d_mlp, dtype=F64)
    for l in LAYERS:
        s = state[l]
        K, R = res.journal[f"layer.{l}.K"], res.journal[f"layer.{l}.R"]
        assert K.shape == (adapter.d_mlp, 3) and R.shape == (adapter.d_model, 3)
        assert rel(s.S_rk, R @ K.T) < 1e-14 and rel(s.S_kk, K @ K.T) < 1e-14
        P = s.P
        # the form Δ = S_rk P (S_kk P + αI)⁻¹ (explicit inverse, reference only)
        brief = s.S_rk @ P @ torch.linalg.inv(s.S_kk @ P + hp.L2 * I)
        assert float(brief.norm()) > 0
        assert rel(s.delta, brief) < 1e-9
        # the symmetric form solved: S_rk P (P S_kk P + αI)⁻¹ P
        assert rel(s.delta, s.S_rk @ P @ torch.linalg.inv(P @ s.S_kk @ P + hp.L2 * I) @ P) < 1e-9
        # a fresh state: the increment is the whole Δ, and the step is the normal equations' solution
        assert rel(res.delta.layers[l].dense(F64), s.delta) < 1e-12
        grad = ((s.delta @ K - R) @ K.T + hp.L2 * s.delta) @ P
        assert float(grad.norm()) < 1e-9 * float((R @ K.T @ P).norm())
        assert state[l].n_terms == 3 and state[l].steps == 1
        assert int(round(float(P.trace()))) == res.meta["layers"][LAYERS.index(l)]["nullspace_dim"]


# ------------------------------------------------------------------ (b) exact protection, model untouched
def test_keel_spares_the_preserved_keys_and_leaves_the_model_untouched(spans, low_rank_stats):
    adapter = tiny_adapter("gpt2")
    hp = KeelHParams(layers=list(LAYERS), L2=1.0, **FAST)  # the paper's absolute threshold 1e-2
    before = {l: adapter.down_weight_param(l).clone() for l in LAYERS}
    entry = get_method("keel")
    state = entry.make_state(adapter, hp, low_rank_stats)
    res = entry.fn(adapter, REQS, hp, low_rank_stats, state=state)
    for l in LAYERS:
        assert torch.equal(adapter.down_weight_param(l), before[l])  # the call leaves the model as it found it
        d = res.delta.layers[l].dense(F64)
        assert float(d.norm()) > 0
        assert int(round(float(state[l].P.trace()))) == adapter.d_mlp - 40
        k0 = spans[l]  # keys in C's range
        assert float((d @ k0).norm()) <= 1e-10 * float(d.norm()) * float(k0.norm())
        k_any = torch.randn(adapter.d_mlp, 5, generator=torch.Generator().manual_seed(l), dtype=F64)
        assert float((d @ k_any).norm()) > 1e-3 * float(d.norm()) * float(k_any.norm())  # elsewhere it acts


def test_push_through_holds_on_an_ill_conditioned_history():
    """Δ k₀ = 0 for k₀ in C's range to float64 precision even when κ(P S_kk P + αI) ~ 1e12."""
    g = torch.Generator().manual_seed(3)
    d, dm = 64, 16
    U = torch.randn(d, 20, generator=g, dtype=F64)
    P = nullspace_projector(U @ U.T, 1e-2)
    K = torch.randn(d, 30, generator=g, dtype=F64) * 1e3
    R = torch.randn(dm, 30, generator=g, dtype=F64)
    delta = keel_solve(R @ K.T, K @ K.T, P, 1e-4)
    assert float((delta @ U).norm()) <= 1e-10 * float(delta.norm()) * float(U.norm())


# ------------------------------------------------------------------ (c) cumulative
def test_two_steps_equal_one_step_with_both_batches(world):
    """The state after two steps is one solve over both steps' terms: replaying both journals at once
    into a fresh state gives the same Δ (and sums) — and so does any batching of the same terms."""
    stats, hp = world
    adapter = tiny_adapter("gpt2")
    state, results = two_steps(adapter, hp, stats)
    one = get_method("keel").make_state(tiny_adapter("gpt2"), hp, stats)
    both = {k: torch.cat([results[0].journal[k], results[1].journal[k]], dim=1) for k in results[0].journal}
    one.add(both)
    for l in LAYERS:
        assert state[l].n_terms == one[l].n_terms == 4
        assert rel(state[l].S_rk, one[l].S_rk) < 1e-13 and rel(state[l].S_kk, one[l].S_kk) < 1e-13
        assert rel(state.total_delta(l), one.total_delta(l)) < 1e-10
        # the two increments add up to the total (the model carries W₀ + Δ after every step)
        inc = results[0].delta.layers[l].dense(F64) + results[1].delta.layers[l].dense(F64)
        assert rel(inc, state.total_delta(l)) < 1e-12
    # at the level of the solver: any split of the same columns gives the same Δ
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(8, 24, generator=g, dtype=F64)
    P = nullspace_projector(torch.diag(torch.linspace(1e-3, 1.0, 24, dtype=F64)), 0.5)
    R, K = torch.randn(8, 6, generator=g, dtype=F64), torch.randn(24, 6, generator=g, dtype=F64)
    a, b = KeelSums(0, W0, P, 0.3), KeelSums(0, W0, P, 0.3)
    a.add(R[:, :2], K[:, :2])
    a.add(R[:, 2:], K[:, 2:])
    b.add(R, K)
    assert rel(a.delta, b.delta) < 1e-12 and a.steps == 2 and b.steps == 1


def test_keel_equals_d4s_with_its_nullspace_option(world):
    """D4S's project_nullspace variant (keys projected into its sums, λC → L2·I) computes keel's Δ."""
    stats, hp = world
    adapter = tiny_adapter("gpt2")
    keel = get_method("keel").make_state(adapter, hp, stats)
    res = get_method("keel").fn(adapter, REQS[:3], hp, stats, state=keel)
    hp2 = D4SHParams(layers=list(LAYERS), project_nullspace=True, L2=hp.L2, nullspace_threshold=hp.nullspace_threshold,
                     nullspace_relative=True, **FAST)
    d4s = get_method("d4s").make_state(adapter, hp2, stats)
    d4s.add({k: (v if k.endswith(".R") else d4s[int(k.split(".")[1])].projector @ v) for k, v in res.journal.items()})
    for l in LAYERS:
        assert rel(d4s.total_delta(l), keel.total_delta(l)) < 1e-9


def test_alphaedit_increments_add_up_to_keel():
    """Recursive least squares: AlphaEdit's step, fed the residual on the model as it is (R = R₀ − Δ_old K)
    and Σ K_p K_pᵀ of every earlier edit, moves the total exactly to keel's joint solve over all edits.
    So in exact arithmetic the two methods follow the same trajectory (docs/results/lifelong.md)."""
    from superedit.editing.methods.alphaedit import alphaedit_solve

    g = torch.Generator().manual_seed(5)
    d, dm, alpha = 48, 12, 2.0
    U = torch.randn(d, 15, generator=g, dtype=F64)
    P = nullspace_projector(U @ U.T, 1e-2)
    sums = KeelSums(0, torch.zeros(dm, d, dtype=F64), P, alpha)
    total = torch.zeros(dm, d, dtype=F64)
    KpKp = torch.zeros(d, d, dtype=F64)
    for step in range(6):
        K = torch.randn(d, 4, generator=g, dtype=F64)
        R0 = torch.randn(dm, 4, generator=g, dtype=F64)
        left, right = alphaedit_solve(R0 - total @ K, K, P, KpKp, alpha)
        total = total + left @ right.T
        KpKp = KpKp + K @ K.T
        sums.add(R0, K)
        assert rel(total, sums.delta) < 1e-10, step


def test_keel_and_alphaedit_ledgers_agree_to_rounding(world, tmp_path):
    """The identity above through the whole method (values, keys, MEMIT spread, ledgers): after two steps of two
    edits the totals differ only by float32 weight rounding and what it does to the optimised values."""
    from superedit.editing.hparams import AlphaEditHParams

    stats, hp = world
    totals = {}
    for name, h in (("keel", hp), ("alphaedit", AlphaEditHParams(**{k: v for k, v in hp.to_dict().items()}))):
        a = tiny_adapter("gpt2")
        led = Ledger.create(tmp_path / name, a, name, h)
        led.apply_to(a)
        for s in (0, 2):
            led.step(a, REQS[s:s + 2], stats)
        totals[name] = {l: led.total_delta(l).clone() for l in LAYERS}
    for l in LAYERS:
        assert float(totals["keel"][l].norm()) > 0
        assert rel(totals["keel"][l], totals["alphaedit"][l]) < 1e-5


# ------------------------------------------------------------------ (d) undo
def test_remove_restores_the_sums(world):
    stats, hp = world
    adapter = tiny_adapter("gpt2")
    entry = get_method("keel")
    state = entry.make_state(adapter, hp, stats)
    base = weights(adapter)
    first = entry.fn(adapter, REQS[:2], hp, stats, state=state)
    after_first = {l: (state[l].S_rk.clone(), state[l].S_kk.clone(), state[l].delta.clone()) for l in LAYERS}
    carry(adapter, base, state)
    second = entry.fn(adapter, REQS[2:], hp, stats, state=state)
    after_both = {l: state.total_delta(l).clone() for l in LAYERS}
    state.remove(second.journal)  # undo the last
    for l in LAYERS:
        S_rk, S_kk, delta = after_first[l]
        assert rel(state[l].S_rk, S_rk) < 1e-14 and rel(state[l].S_kk, S_kk) < 1e-14
        assert rel(state[l].delta, delta) < 1e-10
        assert state[l].n_terms == 2 and state[l].steps == 1
    state.remove(first.journal)  # nothing left: the empty sums, exactly
    for l in LAYERS:
        assert not state[l].S_rk.any() and not state[l].S_kk.any() and not state[l].delta.any()
        assert state[l].n_terms == 0 and state[l].steps == 0
    # undo ANY edit: take the first step out while the second stays = a state with only the second's terms
    state.add(first.journal)
    state.add(second.journal)
    for l in LAYERS:
        assert rel(state.total_delta(l), after_both[l]) < 1e-10
    state.remove(first.journal)
    only = entry.make_state(tiny_adapter("gpt2"), hp, stats)
    only.add(second.journal)
    for l in LAYERS:
        assert rel(state.total_delta(l), only.total_delta(l)) < 1e-10


def test_a_failed_step_leaves_the_state_as_it_was(world, monkeypatch):
    stats, hp = world
    adapter = tiny_adapter("gpt2")
    entry = get_method("keel")
    state = entry.make_state(adapter, hp, stats)
    entry.fn(adapter, REQS[:1], hp, stats, state=state)
    sd = state.state_dict()
    import superedit.editing.methods.spread as spread

    real = spread.compute_keys
    calls = [0]

    def flaky(*a, **k):  # the second layer's keys fail: layer 1's terms are already in the sums
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(spread, "compute_keys", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        entry.fn(adapter, REQS[1:2], hp, stats, state=state)
    after = state.state_dict()
    for k in sd:
        assert torch.allclose(after[k].to(F64), sd[k].to(F64), rtol=1e-9, atol=1e-12), k
    assert int(after["layer.1.counts"][0]) == 1


# ------------------------------------------------------------------ (e) persistence and resume
def test_state_dict_round_trip_is_bit_identical(world, tmp_path):
    from safetensors.torch import load_file, save_file

    stats, hp = world
    adapter = tiny_adapter("gpt2")
    state, _ = two_steps(adapter, hp, stats)
    save_file(state.state_dict(), str(tmp_path / "s.safetensors"))
    loaded = get_method("keel").make_state(tiny_adapter("gpt2"), hp, stats).load_state_dict(
        load_file(str(tmp_path / "s.safetensors")))
    assert isinstance(loaded, KeelState)
    for k, v in state.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for l in LAYERS:
        assert torch.equal(loaded[l].P, state[l].P)  # recomputed from the same C, bit for bit
        assert set(state.state_dict()) >= {f"layer.{l}.S_rk", f"layer.{l}.S_kk", f"layer.{l}.counts", total_key(l)}


def test_ledger_reopened_midway_continues_bit_identically(world, tmp_path):
    """A ledger closed after two edits and reopened from disk (a new state from the state file) ends with
    exactly the tensors of an uninterrupted run; undo of a middle edit then redo is exact to rounding.
    (The SIGKILL version of this, with kills between state file and ledger.json: tests/test_resume.py.)"""
    stats, hp = world
    a = tiny_adapter("gpt2")
    la = Ledger.create(tmp_path / "a", a, "keel", hp)
    la.apply_to(a)
    for r in REQS:
        la.step(a, [r], stats)
    b = tiny_adapter("gpt2")
    lb = Ledger.create(tmp_path / "b", b, "keel", hp)
    lb.apply_to(b)
    for r in REQS[:2]:
        lb.step(b, [r], stats)
    del lb
    c = tiny_adapter("gpt2")
    lc = Ledger.open(tmp_path / "b")
    lc.apply_to(c)
    lc.load_state(c, stats)
    for r in REQS[2:]:
        lc.step(c, [r], stats)
    assert len(lc.edits) == len(la.edits) == 4
    assert la.tensors.keys() == lc.tensors.keys()
    for k in la.tensors:
        assert torch.equal(la.tensors[k], lc.tensors[k]), k
    for l in LAYERS:
        assert torch.equal(a.down_weight(l), c.down_weight(l))
        assert float(la.total_delta(l).norm()) > 0
    full = {l: la.total_delta(l).clone() for l in LAYERS}
    la.undo(1)  # not the last: keel undoes any edit
    assert la.active() == [0, 2, 3]
    la.redo(1)
    for l in LAYERS:
        assert rel(la.total_delta(l), full[l]) < 1e-10


# ------------------------------------------------------------------ (f) registry and CLI
def test_registry_entry_and_cli_listing():
    from typer.testing import CliRunner

    from superedit.cli import app

    entry = get_method("keel")
    assert entry.hparams_cls is KeelHParams and entry.needs_stats and entry.stateful
    assert entry.undo == "any" and entry.rank_one is None
    assert entry.state == "superedit.editing.methods.keel:make_keel_state"
    assert not entry.rank_one_edits(KeelHParams(layers=[1]), 1)
    out = " ".join(CliRunner().invoke(app, ["edit", "--help"]).output.split())
    assert "keel" in out
    out = " ".join(CliRunner().invoke(app, ["lifelong", "--help"]).output.split())
    assert "keel" in out


def test_hparams_validate_alpha_and_take_the_shared_options():
    from superedit.editing.hparams import HParamsError, load_hparams

    with pytest.raises(HParamsError, match="L2"):
        KeelHParams(L2=0)
    hp = load_hparams(KeelHParams, "keel", "testbed-small")
    assert hp.layers == [0, 1] and hp.L2 > 0 and hp.norm_anchor >= 0
    assert "norm_anchor" in KeelHParams.model_fields and "nullspace_threshold" in KeelHParams.model_fields
