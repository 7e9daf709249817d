"""Lifelong editing: D4S running sums, AlphaEdit null-space projection, the crash-safe edit ledger."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import tiny_adapter
from superedit.data import EditRequest
from superedit.editing.covariance import FixedCovariance
from superedit.editing.delta import LayerDelta, WeightDelta
from superedit.editing.hparams import AlphaEditHParams, D4SHParams
from superedit.editing.methods import get_method
from superedit.editing.methods.alphaedit import alphaedit_solve, nullspace_projector
from superedit.editing.methods.d4s import D4SSums
from superedit.editing.methods.protocol import StepResult
from superedit.editing.solve import memit_solve
from superedit.errors import LedgerError
from superedit.lifelong import ledger as ledger_mod
from superedit.lifelong.ledger import Ledger
from helpers import corpus_cov

F64 = torch.float64
FAST = dict(v_num_grad_steps=4, n_prefixes=1, context_lengths=[3])
REQS = [
    EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris"),
    EditRequest(prompt="{} is located in", subject="Eiffel Tower", target_new="Oslo"),
    EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano"),
]


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def spd(n, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=F64) / n ** 0.5
    return scale * (A @ A.T + 0.05 * torch.eye(n, dtype=F64))


# ------------------------------------------------------------------ D4S algebra
@pytest.mark.parametrize("factor", ["cholesky", "inverse"])
def test_d4s_incremental_equals_dense(factor):
    d_model, d_mlp, lam = 12, 40, 2.0
    g = torch.Generator().manual_seed(1)
    st = D4SSums(0, torch.randn(d_model, d_mlp, generator=g), spd(d_mlp, 2), lam, factor=factor)
    terms = []
    for step in range(50):
        k = 1 if step % 2 == 0 else 4
        R, K = torch.randn(d_model, k, generator=g, dtype=F64), torch.randn(d_mlp, k, generator=g, dtype=F64)
        st.add(R, K)
        terms.append((R, K))
        if step % 10 == 9:
            dense = st.dense_delta()
            assert rel(st.delta(), dense) < 1e-6, step  # the cheap Woodbury path on X
            assert rel(st.solve_delta(), dense) < 1e-6, step  # X from the updated factor (two triangular solves)
    ref = memit_solve(torch.cat([r for r, _ in terms], 1), torch.cat([k for _, k in terms], 1), spd(d_mlp, 2), lam)
    assert rel(st.delta(), ref[0] @ ref[1].T) < 1e-6
    assert rel(st.weights().double(), st.W0.double() + ref[0] @ ref[1].T) < 1e-6
    # exact downdates (undo) of every third term
    for R, K in terms[::3]:
        st.remove(R, K)
    keep = [t for i, t in enumerate(terms) if i % 3]
    ref = memit_solve(torch.cat([r for r, _ in keep], 1), torch.cat([k for _, k in keep], 1), spd(d_mlp, 2), lam)
    assert rel(st.delta(), ref[0] @ ref[1].T) < 1e-6
    assert rel(st.solve_delta(), ref[0] @ ref[1].T) < 1e-6
    assert st.n_terms == sum(k.shape[1] for _, k in keep)


def test_d4s_single_steps_equal_one_memit_solve_against_w0():
    """n single-edit steps == one MEMIT solve over all n edits (residuals against W₀)."""
    d_model, d_mlp, lam, n = 8, 24, 5.0, 15
    g = torch.Generator().manual_seed(3)
    W0, C = torch.randn(d_model, d_mlp, generator=g, dtype=F64), spd(d_mlp, 4)
    V, K = torch.randn(d_model, n, generator=g, dtype=F64), torch.randn(d_mlp, n, generator=g, dtype=F64)
    st = D4SSums(0, W0, C, lam)
    for i in range(n):
        st.add(V[:, i] - W0 @ K[:, i], K[:, i])  # residual of edit i against the ORIGINAL weights
    left, right = memit_solve(V - W0 @ K, K, C, lam)
    assert rel(st.weights(), W0 + left @ right.T) < 1e-8


def test_d4s_ill_conditioned_downdate_falls_back_to_resolve():
    d_model, d_mlp = 4, 10
    st = D4SSums(0, torch.zeros(d_model, d_mlp, dtype=F64), torch.eye(d_mlp, dtype=F64), 1e-3)
    K = torch.zeros(d_mlp, 1, dtype=F64)
    K[0] = 1e3  # A = 1e-3·I + K Kᵀ: removing K leaves almost nothing along e₀
    R = torch.ones(d_model, 1, dtype=F64)
    K2 = torch.randn(d_mlp, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    R2 = torch.randn(d_model, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    st.add(R2, K2)
    st.add(R, K)
    assert st.remove(R, K) is False  # detected, re-solved from the sums
    assert rel(st.delta(), st.dense_delta()) < 1e-9
    assert rel(st.S_kk, K2 @ K2.T) < 1e-9


def test_d4s_state_dict_round_trip_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(5)
    W0, C = torch.randn(6, 16, generator=g), spd(16, 6)
    st = D4SSums(3, W0, C, 1.5)
    for _ in range(4):
        st.add(torch.randn(6, 2, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64))
    for with_factor in (True, False):
        save_file(st.state_dict(with_factor), str(tmp_path / "s.safetensors"))
        st2 = D4SSums(3, W0, C, 1.5).load_state_dict(load_file(str(tmp_path / "s.safetensors")))
        R, K = torch.randn(6, 1, generator=g, dtype=F64), torch.randn(16, 1, generator=g, dtype=F64)
        a, b = D4SSums(3, W0, C, 1.5).load_state_dict(st.state_dict()), st2
        a.add(R, K)
        b.add(R, K)
        assert rel(a.delta(), b.delta()) < 1e-12 and a.n_terms == b.n_terms == 9


def test_d4s_projected_equals_alphaedit_form():
    """D4S + null-space projection == S_rk P (S_kk P + αI)⁻¹ (AlphaEdit's form over all edits)."""
    d_model, d_mlp, alpha = 6, 20, 3.0
    g = torch.Generator().manual_seed(7)
    span = torch.randn(d_mlp, 8, generator=g, dtype=F64)
    P = nullspace_projector(span @ span.T / 8, 1e-2)
    st = D4SSums(0, torch.zeros(d_model, d_mlp, dtype=F64), torch.eye(d_mlp, dtype=F64), alpha)
    Rs, Ks = torch.randn(d_model, 5, generator=g, dtype=F64), torch.randn(d_mlp, 5, generator=g, dtype=F64)
    for i in range(5):
        st.add(Rs[:, i], P @ Ks[:, i])
    S_rk, S_kk = Rs @ Ks.T, Ks @ Ks.T
    want = torch.linalg.solve((S_kk @ P + alpha * torch.eye(d_mlp, dtype=F64)).T, (S_rk @ P).T).T
    assert rel(st.delta(), want) < 1e-9
    assert float((st.delta() @ span).norm()) < 1e-8 * float(st.delta().norm())


# ------------------------------------------------------------------ AlphaEdit
def test_alphaedit_nullspace_properties():
    d_model, d_mlp, m = 10, 30, 12
    g = torch.Generator().manual_seed(11)
    span = torch.randn(d_mlp, m, generator=g, dtype=F64)
    C = span @ span.T / m
    P = nullspace_projector(C, 1e-2)
    assert torch.allclose(P @ P, P, atol=1e-10) and round(float(P.trace())) == d_mlp - m
    kp = span @ torch.randn(m, 5, generator=g, dtype=F64)  # preserved keys
    assert float((P @ kp).norm()) < 1e-9 * float(kp.norm())
    assert round(float(nullspace_projector(C, 1e-3, relative=True).trace())) == d_mlp - m
    R, K1 = torch.randn(d_model, 3, generator=g, dtype=F64), torch.randn(d_mlp, 3, generator=g, dtype=F64)
    KpKp = kp @ kp.T
    left, right = alphaedit_solve(R, K1, P, KpKp, 10.0)
    delta = left @ right.T
    assert float((delta @ kp).norm()) < 1e-9 * float(delta.norm())  # W k unchanged for preserved keys
    G = KpKp + K1 @ K1.T
    paper = R @ K1.T @ P @ torch.linalg.inv(G @ P + 10.0 * torch.eye(d_mlp, dtype=F64))
    assert rel(delta, paper) < 1e-9


def test_alphaedit_step_on_model_preserves_span():
    adapter = tiny_adapter("gpt2")
    d_mlp = adapter.d_mlp
    g = torch.Generator().manual_seed(0)
    spans = {l: torch.randn(d_mlp, 40, generator=g, dtype=F64) for l in (1, 2)}
    stats = FixedCovariance({l: s @ s.T / 40 for l, s in spans.items()})
    hp = AlphaEditHParams(layers=[1, 2], L2=1.0, **FAST)
    before = {l: adapter.down_weight_param(l).clone() for l in (1, 2)}
    entry = get_method("alphaedit")
    state = entry.make_state(adapter, hp, stats)
    res = entry.fn(adapter, REQS[:2], hp, stats, state=state)
    for l in (1, 2):
        assert torch.equal(adapter.down_weight_param(l), before[l])
        d = res.delta.layers[l].dense(F64)
        assert float(d.norm()) > 0
        assert float((d @ spans[l]).norm()) < 1e-8 * float(d.norm()) * float(spans[l].norm())
        assert state.n_keys[l] == 2 and res.journal[f"layer.{l}.K"].shape == (d_mlp, 2)
        assert state.projector(l) is state.projector(l)  # computed once, kept on the state (no module cache)
    # the journal takes the step out of the state again, exactly
    KpKp = {l: state.KpKp[l].clone() for l in (1, 2)}
    state.remove(res.journal)
    for l in (1, 2):
        assert float(state.KpKp[l].abs().max()) < 1e-9 * float(KpKp[l].abs().max()) and state.n_keys[l] == 0
    # D4S ledger sums + the same projection (project_nullspace): the total delta spares the span too
    hp2 = D4SHParams(layers=[1, 2], project_nullspace=True, L2=1.0, **FAST)
    d4s_state = get_method("d4s").make_state(adapter, hp2, stats)
    total = get_method("d4s").fn(adapter, REQS[:2], hp2, stats, state=d4s_state).delta
    for l in (1, 2):
        d = total.layers[l].dense(F64)
        assert float(d.norm()) > 0
        assert float((d @ spans[l]).norm()) < 1e-8 * float(d.norm()) * float(spans[l].norm())
        assert rel(d4s_state[l].delta(), d4s_state[l].dense_delta()) < 1e-9


# ------------------------------------------------------------------ D4S on a model + ledger
@pytest.fixture(scope="module")
def d4s_world():
    adapter = tiny_adapter("gpt2")
    return corpus_cov(adapter, [1, 2]), D4SHParams(layers=[1, 2], mom2_update_weight=10.0, **FAST)


def test_d4s_first_step_is_memit(d4s_world):
    stats, hp = d4s_world
    adapter = tiny_adapter("gpt2")
    before = {l: adapter.down_weight_param(l).clone() for l in (1, 2)}
    state = get_method("d4s").make_state(adapter, hp, stats)
    d4s = get_method("d4s").fn(adapter, REQS[:2], hp, stats, state=state)
    for l in (1, 2):
        assert torch.equal(adapter.down_weight_param(l), before[l])
    memit = get_method("memit").fn(adapter, REQS[:2], hp, stats).delta
    for l in (1, 2):
        assert rel(d4s.delta.layers[l].dense(F64), memit.layers[l].dense(F64)) < 1e-4
        assert rel(state[l].delta(), state[l].dense_delta()) < 1e-9
        assert torch.equal(d4s.delta.layers[l].dense(F64), state.total_delta(l))  # increment of a fresh state = total


def _weights(adapter):
    return {l: adapter.down_weight(l).detach().double().clone() for l in (1, 2)}


def test_ledger_crash_resume_undo_redo(tmp_path, monkeypatch, d4s_world):
    stats, hp = d4s_world
    # uninterrupted run: three single-edit steps
    a = tiny_adapter("gpt2")
    la = Ledger.create(tmp_path / "a", a, "d4s", hp)
    la.apply_to(a)
    snaps = []
    for r in REQS:
        la.step(a, [r], stats)
        snaps.append(_weights(a))
    assert la.active() == [0, 1, 2] and la.generation == 4

    # interrupted run: crash between the state file and ledger.json during edit #2
    b = tiny_adapter("gpt2")
    lb = Ledger.create(tmp_path / "b", b, "d4s", hp)
    lb.apply_to(b)
    lb.step(b, [REQS[0]], stats)
    lb.step(b, [REQS[1]], stats)

    def crash():
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ledger_mod, "_before_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        lb.step(b, [REQS[2]], stats)
    monkeypatch.undo()
    assert len(list((tmp_path / "b").glob("state.*.safetensors"))) == 2  # old generation + the uncommitted one
    fresh = tiny_adapter("gpt2")
    lb2 = Ledger.open(tmp_path / "b")
    assert len(lb2.edits) == 2 and lb2.generation == 3
    lb2.apply_to(fresh)
    for l in (1, 2):
        assert rel(_weights(fresh)[l], snaps[1][l]) < 1e-6  # the last completed edit's weights
    lb2.step(fresh, [REQS[2]], stats)  # resume
    for l in (1, 2):
        assert rel(_weights(fresh)[l], snaps[2][l]) < 1e-5  # same as the uninterrupted run
    assert len(list((tmp_path / "b").glob("state.*.safetensors"))) == 1

    # undo edit #1 (not the last) then redo == never undoing; undo persists across reopen
    la.undo(1)
    la.apply_to(a)
    undone = _weights(a)
    for l in (1, 2):
        st = la.state[l]
        assert rel(st.delta(), st.dense_delta()) < 1e-9
        assert rel(undone[l], snaps[2][l]) > 1e-4
    c = tiny_adapter("gpt2")
    lc = Ledger.open(tmp_path / "a")
    assert lc.active() == [0, 2] and lc.edits[1]["status"] == "undone"
    lc.apply_to(c)
    for l in (1, 2):
        assert rel(_weights(c)[l], undone[l]) < 1e-7
    la.redo(1)
    la.apply_to(a)
    for l in (1, 2):
        assert rel(_weights(a)[l], snaps[2][l]) < 1e-6
    with pytest.raises(LedgerError, match="only undone edits"):
        la.redo(1)
    # export of the deltas round-trips through WeightDelta.load
    la.export(tmp_path / "exp")
    loaded = WeightDelta.load(tmp_path / "exp")
    fresh2 = tiny_adapter("gpt2")
    loaded.apply(fresh2)
    for l in (1, 2):
        assert rel(_weights(fresh2)[l], snaps[2][l]) < 1e-6
    with pytest.raises(LedgerError, match="base weights"):
        la.apply_to(fresh2)  # already edited, not the base model


def test_increment_ledger_undo_only_last(tmp_path):
    adapter = tiny_adapter("gpt2")
    hp = get_method("memit").hparams_cls(layers=[1], **FAST)
    led = Ledger.create(tmp_path / "m", adapter, "memit", hp)
    base = adapter.down_weight(1).detach().double().clone()
    g = torch.Generator().manual_seed(0)
    incs = []
    for i in range(3):
        d = WeightDelta({1: LayerDelta(torch.randn(adapter.d_model, 1, generator=g),
                                       torch.randn(adapter.d_mlp, 1, generator=g))}, "memit")
        incs.append(d.layers[1].dense(F64))
        led.record([REQS[i]], StepResult(d))
    with pytest.raises(LedgerError, match="only the last applied edit"):
        led.undo(0)
    led.undo()  # the last one
    led.apply_to(adapter)
    assert rel(adapter.down_weight(1).double(), (base + incs[0] + incs[1]).float().double()) < 1e-6
    led.redo(2)
    led.apply_to(adapter)
    assert rel(adapter.down_weight(1).double(), base + sum(incs)) < 1e-6


def test_ledger_corrupt_or_missing_files(tmp_path):
    adapter = tiny_adapter("gpt2")
    hp = D4SHParams(layers=[1], **FAST)
    with pytest.raises(LedgerError, match="no ledger.json"):
        Ledger.open(tmp_path / "nothing")
    Ledger.create(tmp_path / "l", adapter, "d4s", hp)
    with pytest.raises(LedgerError, match="already exists"):
        Ledger.create(tmp_path / "l", adapter, "d4s", hp)
    path = tmp_path / "l" / "ledger.json"
    good = path.read_text()
    path.write_text(good[: len(good) // 2])
    with pytest.raises(LedgerError, match="corrupt ledger file"):
        Ledger.open(tmp_path / "l")
    path.write_text(json.dumps({"format": "x"}))
    with pytest.raises(LedgerError, match="missing field"):
        Ledger.open(tmp_path / "l")
    path.write_text(good)
    state = tmp_path / "l" / json.loads(good)["state_file"]
    state.write_bytes(b"garbage")
    with pytest.raises(LedgerError, match="corrupt"):
        Ledger.open(tmp_path / "l")
    state.unlink()
    with pytest.raises(LedgerError, match="missing"):
        Ledger.open(tmp_path / "l")


def test_ledger_killed_process_keeps_last_complete_edit(tmp_path):
    """A process killed (os._exit) between the state file and ledger.json leaves the previous generation."""
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from helpers import tiny_adapter
        from superedit.editing.delta import LayerDelta, WeightDelta
        from superedit.editing.hparams import MEMITHParams
        from superedit.editing.methods.protocol import StepResult
        from superedit.lifelong import ledger as L
        a = tiny_adapter("gpt2")
        led = L.Ledger.create({str(tmp_path / 'k')!r}, a, "memit", MEMITHParams(layers=[1]))
        for i in range(2):
            if i == 1:
                L._before_commit = lambda: os._exit(9)
            d = WeightDelta({{1: LayerDelta(dense_=torch.full((a.d_model, a.d_mlp), float(i + 1)))}}, "memit")
            led.record([dict(prompt="{{}} is", subject="X", target_new="Y")], StepResult(d))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=80)
    assert proc.returncode == 9, proc.stderr
    lock = tmp_path / "k" / "lock"
    assert json.loads(lock.read_text())["pid"] != os.getpid()  # the killed writer's lock is left behind
    from superedit.lifelong.ledger import verify_ledger

    rep = verify_ledger(tmp_path / "k")  # the committed files are intact; the uncommitted ones are named
    assert rep["ok"] and any("interrupted commit" in n for n in rep["notes"])
    led = Ledger.open(tmp_path / "k")
    assert len(led.edits) == 1
    adapter = tiny_adapter("gpt2")
    base = adapter.down_weight(1).detach().double().clone()
    led.apply_to(adapter)
    assert rel(adapter.down_weight(1).double(), base + 1.0) < 1e-6
    # the next writer takes the dead process's lock over and goes on
    d = WeightDelta({1: LayerDelta(dense_=torch.full((adapter.d_model, adapter.d_mlp), 2.0))}, "memit")
    led.record([dict(prompt="{} is", subject="X", target_new="Z")], StepResult(d))
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    led.close()
    assert not lock.exists() and verify_ledger(tmp_path / "k")["ok"]


def test_mom2_ridge_bounds_the_solve_on_a_singular_covariance():
    """A covariance with dead directions (as a layer with dead units has): λC gives them no weight, so
    the solve fits the edit keys' tiny components there with huge entries; mom2_ridge bounds it, and
    make_d4s_state / the MEMIT solve use exactly C + ridge · mean(diag C) · I."""
    from superedit.editing.methods.d4s import make_d4s_state
    from superedit.editing.solve import with_ridge

    g = torch.Generator().manual_seed(3)
    d_model, d_mlp, live = 8, 30, 20
    B = torch.randn(d_mlp, live, generator=g, dtype=F64)
    B[live:] = 0.0
    C = B @ B.T / live  # rank 20: 10 dead directions
    K = torch.randn(d_mlp, 12, generator=g, dtype=F64)
    K[live:] *= 1e-6  # edit keys barely touch the dead units
    R = torch.randn(d_model, 12, generator=g, dtype=F64)
    raw = memit_solve(R, K, C, 10.0)
    ridged = memit_solve(R, K, with_ridge(C, 1e-3), 10.0)
    assert (raw[0] @ raw[1].T).norm() > 1e3 * (ridged[0] @ ridged[1].T).norm()
    assert torch.equal(with_ridge(C, 0.0), C)
    assert torch.allclose(with_ridge(C, 0.1) - C, 0.1 * C.diagonal().mean() * torch.eye(d_mlp, dtype=F64))

    class Stats:
        def mom2(self, layer):
            return C

    class Adapter:
        def check_layer(self, l):
            pass

        def down_weight(self, l):
            return torch.zeros(d_model, d_mlp, dtype=F64)

    hp = D4SHParams(layers=[0], mom2_update_weight=10.0, mom2_ridge=1e-3)
    st = make_d4s_state(Adapter(), hp, Stats())[0]
    assert torch.allclose(st.A0, 10.0 * with_ridge(C, 1e-3))


def test_alphaedit_ledger_undo_takes_the_keys_out_of_the_state(tmp_path):
    """An increment method with state: undo subtracts the increment AND removes the step's journal from
    Σ K_p K_pᵀ (reloaded from disk the same); redo puts both back."""
    adapter = tiny_adapter("gpt2")
    stats = corpus_cov(adapter, [1, 2])
    hp = AlphaEditHParams(layers=[1, 2], L2=1.0, nullspace_threshold=0.1, nullspace_relative=True, **FAST)
    led = Ledger.create(tmp_path / "a", adapter, "alphaedit", hp)
    led.apply_to(adapter)
    led.step(adapter, [REQS[0]], stats)
    after_one = {k: v.clone() for k, v in led.state.state_dict().items()}
    totals_one = {l: led.total_delta(l).clone() for l in (1, 2)}
    led.step(adapter, [REQS[1]], stats)
    after_two = {k: v.clone() for k, v in led.state.state_dict().items()}
    led.undo()
    for k, v in after_one.items():
        assert torch.allclose(led.state.state_dict()[k].to(F64), v.to(F64), rtol=0, atol=1e-9), k
    for l in (1, 2):
        assert rel(led.total_delta(l), totals_one[l]) < 1e-9
    reopened = Ledger.open(tmp_path / "a")
    reopened.load_state(tiny_adapter("gpt2"), stats)
    for k, v in after_one.items():
        assert torch.allclose(reopened.state.state_dict()[k].to(F64), v.to(F64), rtol=0, atol=1e-9), k
    led.redo(1)
    for k, v in after_two.items():
        assert torch.allclose(led.state.state_dict()[k].to(F64), v.to(F64), rtol=0, atol=1e-9), k
