"""Big models (issue #15 item 5): --device-map / --dtype loading, per-layer devices, float64 solves cast
back to the weight's dtype, and the factorised null-space projector of AlphaEdit and D4S."""

import json

import pytest
import torch

from helpers import corpus_cov, saved_tiny_model, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import D4SHParams, MEMITHParams, ROMEHParams
from superedit.editing.methods import get_method
from superedit.editing.methods.alphaedit import (NullSpaceProjector, alphaedit_solve, alphaedit_solve_dense,
                                                 nullspace_basis, nullspace_projector)
from superedit.errors import UsageError
from superedit.models.loading import load_model, parse_device_map

F64 = torch.float64
FAST = dict(v_num_grad_steps=4, n_prefixes=2, context_lengths=[3])
REQ = EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


# ------------------------------------------------------------------ --device-map values
def test_parse_device_map_accepts_words_json_and_a_device():
    assert parse_device_map(None) is None
    assert parse_device_map("auto") == "auto"
    assert parse_device_map("balanced_low_0") == "balanced_low_0"
    assert parse_device_map("cpu") == {"": "cpu"}
    assert parse_device_map('{"": "cpu"}') == {"": "cpu"}
    assert parse_device_map('{"model.layers.0": 0, "lm_head": "cpu"}') == {"model.layers.0": 0, "lm_head": "cpu"}


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", "{}", "gpu7", '{"model": "disk"}', '{"model": "nowhere"}'])
def test_bad_device_map_is_a_usage_error_naming_the_option(bad):
    with pytest.raises(UsageError, match="--device-map"):
        parse_device_map(bad)


def test_device_and_device_map_exclude_each_other(llama_dir):
    with pytest.raises(UsageError, match="--device-map"):
        load_model(str(llama_dir), device="cpu", device_map="auto")


def test_device_map_without_accelerate_says_pip_install(llama_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(UsageError, match="pip install accelerate"):
        load_model(str(llama_dir), device_map="auto")


def test_bad_dtype_names_the_option(llama_dir):
    with pytest.raises(UsageError, match="--dtype"):
        load_model(str(llama_dir), dtype="float8")


# ------------------------------------------------------------------ loading and editing
@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_device_map_loads_and_rome_edits(llama_dir, device_map):
    a = load_model(str(llama_dir), device_map=device_map)
    assert a.layer_device(1) == torch.device("cpu") and a.device == torch.device("cpu")
    hp = ROMEHParams(layers=[1], **FAST)
    res = get_method("rome").fn(a, [REQ], hp, corpus_cov(a, [1]))
    d = res.delta.layers[1]
    assert d.rank_bound == 1 and torch.isfinite(d.dense(F64)).all() and float(d.dense(F64).norm()) > 0


def test_bfloat16_rome_solves_in_float64_and_casts_back(llama_dir, monkeypatch):
    import superedit.editing.methods.rome as rome_mod
    import superedit.editing.solve as solve_mod

    a = load_model(str(llama_dir), dtype="bfloat16")
    assert a.dtype == torch.bfloat16 and a.layer_dtype(1) == torch.bfloat16
    seen = []
    real_spd = solve_mod.spd_solve

    def spy(A, B):
        out = real_spd(A, B)
        seen.append((A.dtype, out.dtype))
        return out

    monkeypatch.setattr(solve_mod, "spd_solve", spy)
    real_rome = rome_mod.rome_solve

    def rome_spy(W, C, k, v, b=None):
        left, right = real_rome(W, C, k, v, b)
        seen.append((left.dtype, right.dtype))
        return left, right

    monkeypatch.setattr(rome_mod, "rome_solve", rome_spy)
    stats = corpus_cov(a, [1])
    before = a.down_weight(1).detach().clone()
    res = get_method("rome").fn(a, [REQ], ROMEHParams(layers=[1], **FAST), stats)
    assert seen and all(x == F64 and y == F64 for x, y in seen)  # the solve and its factors in float64
    d = res.delta.layers[1]
    assert d.left.dtype == torch.bfloat16 and d.right.dtype == torch.bfloat16  # cast back to the weight's dtype
    assert torch.equal(a.down_weight(1), before)  # the call left the model as it found it
    with res.delta.applied(a):
        assert a.down_weight(1).dtype == torch.bfloat16 and not torch.equal(a.down_weight(1), before)


def test_accelerate_hooks_do_not_change_a_memit_edit(llama_dir):
    """With accelerate's device-aligning hooks on every block (what a multi-device --device-map installs;
    forced here on one CPU), the value optimisation's fast path (StartAt) and the edit are unchanged."""
    from accelerate import dispatch_model

    plain = load_model(str(llama_dir))
    hooked = load_model(str(llama_dir))
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"] + \
            [f"model.layers.{i}" for i in range(hooked.n_layers)]
    dispatch_model(hooked.model, device_map={n: "cpu" for n in names}, main_device="cpu", force_hooks=True)
    assert "forward" in vars(hooked.blocks()[0])  # accelerate set its forward on the instance
    hp = MEMITHParams(layers=[0, 1], **FAST)
    stats = corpus_cov(plain, [0, 1])
    d_plain = get_method("memit").fn(plain, [REQ], hp, stats).delta
    d_hooked = get_method("memit").fn(hooked, [REQ], hp, stats).delta
    for l in (0, 1):
        torch.testing.assert_close(d_hooked.layers[l].dense(F64), d_plain.layers[l].dense(F64), rtol=1e-5, atol=1e-7)
    assert "forward" in vars(hooked.blocks()[0])  # StartAt put accelerate's forward back


def test_offloaded_layer_is_refused(llama_dir):
    a = load_model(str(llama_dir))
    w = a.down_weight_param(1)
    a.down_proj(1).weight = torch.nn.Parameter(torch.empty(w.shape, device="meta"), requires_grad=False)
    with pytest.raises(UsageError, match="offloaded"):
        a.layer_device(1)


def test_cli_info_takes_dtype_and_device_map(llama_dir):
    from typer.testing import CliRunner

    from superedit.cli import app

    r = CliRunner().invoke(app, ["info", "--model", str(llama_dir), "--dtype", "bfloat16", "--device-map", "auto",
                                 "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["dtype"] == "bfloat16"
    r = CliRunner().invoke(app, ["info", "--model", str(llama_dir), "--device-map", "{oops", "--json"])
    assert r.exit_code == 2 and "--device-map" in r.output


# ------------------------------------------------------------------ the factorised projector
@pytest.mark.parametrize("rank", [6, 30])  # null space of dim 34 (complement kept) and 10 (basis kept)
@pytest.mark.parametrize("with_earlier", [False, True])
def test_factorised_alphaedit_solve_equals_the_dense_form(rank, with_earlier):
    g = torch.Generator().manual_seed(rank)
    d = 40
    X = torch.randn(d, rank, generator=g, dtype=F64)
    C = X @ X.T / rank
    P, Pf = nullspace_projector(C, 1e-6), nullspace_basis(C, 1e-6)
    assert isinstance(Pf, NullSpaceProjector) and Pf.rank == d - rank
    assert Pf.basis.shape[1] == min(rank, d - rank)  # the smaller basis is kept
    assert Pf.complement == (d - rank > rank)
    torch.testing.assert_close(Pf.dense(), P, rtol=0, atol=1e-12)
    K, R = torch.randn(d, 5, generator=g, dtype=F64), torch.randn(12, 5, generator=g, dtype=F64)
    Kp = torch.randn(d, 9, generator=g, dtype=F64)
    G = Kp @ Kp.T if with_earlier else None
    _, Y0 = alphaedit_solve_dense(R, K, P, G, 0.3)
    _, Y1 = alphaedit_solve(R, K, Pf, G, 0.3)
    assert float((Y1 - Y0).norm() / Y0.norm()) < 1e-10
    torch.testing.assert_close(Pf @ K, P @ K, rtol=0, atol=1e-12)


def test_d4s_nullspace_keeps_no_dense_identity():
    adapter = tiny_adapter("gpt2")
    hp = D4SHParams(layers=[1], project_nullspace=True, nullspace_threshold=1e-3, nullspace_relative=True, **FAST)
    state = get_method("d4s").make_state(adapter, hp, corpus_cov(adapter, [1]))
    sums = state[1]
    assert sums._A0 is None and isinstance(sums.projector, NullSpaceProjector)
    torch.testing.assert_close(sums.A, hp.L2 * torch.eye(adapter.d_mlp, dtype=F64) + sums.S_kk)
