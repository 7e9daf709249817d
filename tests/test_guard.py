"""guard: AlphaEdit's projector less the directions guard subjects' keys share (editing/methods/guard.py)."""

from pathlib import Path

import pytest
import torch

from helpers import corpus_cov, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import GuardHParams
from superedit.editing.methods.alphaedit import nullspace_basis
from superedit.editing.methods.guard import (guard_step, make_guard_state, shared_directions,
                                             without_directions)
from superedit.errors import UsageError

GUARD_FILE = str(Path(__file__).parent / "data" / "guard_requests.jsonl")
FAST = dict(v_num_grad_steps=4, n_prefixes=1, context_lengths=[3])
REQS = [EditRequest(prompt="{} was born in", subject="Anna Berg", target_new="Paris", target_true="Oslo"),
        EditRequest(prompt="{} is located in", subject="Eiffel Tower", target_new="Oslo", target_true="Paris")]


def _random_cov(d: int, low: int, seed: int) -> torch.Tensor:
    """A covariance whose ``low`` smallest eigenvalues are below the null-space threshold 1e-2."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.full((low,), 1e-4, dtype=torch.float64), torch.linspace(1, 5, d - low, dtype=torch.float64)])
    return Q @ torch.diag(ev) @ Q.T


@pytest.mark.parametrize("low", [3, 9])  # null space below half (basis Û kept) and above (complement V kept)
def test_without_directions_is_the_projector_onto_null_space_minus_their_span(low):
    d, m = 12, 2
    P = nullspace_basis(_random_cov(d, low, seed=low))
    assert P.complement == (low > d - low)
    S = torch.randn(d, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Pg = without_directions(P, S)
    D, D0 = Pg.dense(), P.dense()
    assert Pg.rank == P.rank - m
    assert torch.allclose(D @ D, D, atol=1e-10) and torch.allclose(D, D.T, atol=1e-10)  # an orthogonal projector
    assert torch.allclose(D0 @ D, D, atol=1e-10)  # inside P's range
    assert torch.allclose(D @ S, torch.zeros_like(S), atol=1e-10)  # S's directions are gone ...
    X = torch.randn(d, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Q, _ = torch.linalg.qr(D0 @ S)
    assert torch.allclose(D @ X, D0 @ X - Q @ (Q.T @ (D0 @ X)), atol=1e-10)  # ... and nothing else is
    assert without_directions(P, S[:, :0]) is P


def test_shared_directions_are_the_top_eigenvectors_of_the_second_moment():
    g = torch.Generator().manual_seed(0)
    mean = torch.zeros(8, dtype=torch.float64)
    mean[3] = 5.0
    K = mean + 0.1 * torch.randn(40, 8, generator=g, dtype=torch.float64)  # keys sharing one direction
    S = shared_directions(K, 1)
    assert S.shape == (8, 1) and abs(float(S[3, 0])) > 0.99
    assert shared_directions(K, 0).shape == (8, 0)


def test_a_guard_step_leaves_the_guard_directions_untouched_and_resumes_from_its_state():
    adapter = tiny_adapter("gpt2")
    stats = corpus_cov(adapter, [1, 2])
    hp = GuardHParams(layers=[1, 2], L2=1.0, nullspace_threshold=0.3, nullspace_relative=True, guard_directions=2,
                      guard_requests=GUARD_FILE, **FAST)
    state = make_guard_state(adapter, hp, stats)
    res = guard_step(adapter, REQS, hp, stats, state)
    for l in hp.layers:
        S = state.guard[l]
        assert S.shape == (adapter.d_mlp, 2)
        D = res.delta.layers[l].dense(dtype=torch.float64)
        assert float(D.norm()) > 0
        assert float((D @ S).norm()) < 1e-8 * float(D.norm())  # Δ S = 0: the shared directions keep their values
    # a resumed state takes S from the committed tensors, never from the (possibly edited) model
    sd = state.state_dict()
    again = make_guard_state(adapter, hp, stats).load_state_dict(sd)
    again._read_guard = lambda: pytest.fail("guard directions were read again instead of restored")
    for l in hp.layers:
        assert torch.equal(again.projector(l).basis, state.projector(l).basis)
    bad = dict(sd, **{"layer.1.guard": sd["layer.1.guard"][:, :1]})
    with pytest.raises(ValueError, match="layer.1.guard"):
        make_guard_state(adapter, hp, stats).load_state_dict(bad)


@pytest.mark.parametrize("path, match", [("", "set guard_requests"), ("/nonexistent/guard.json", "guard_requests .* cannot be read: request file not found")])
def test_guard_without_its_requests_says_what_to_set(path, match):
    adapter = tiny_adapter("gpt2")
    stats = corpus_cov(adapter, [1])
    hp = GuardHParams(layers=[1], guard_requests=path, guard_directions=2, **FAST)
    with pytest.raises(UsageError, match=match):
        make_guard_state(adapter, hp, stats).projector(1)
    hp = GuardHParams(layers=[1], guard_requests=GUARD_FILE, guard_directions=50, **FAST)
    with pytest.raises(UsageError, match="fewer than guard_directions"):
        make_guard_state(adapter, hp, stats).projector(1)


def test_guard_with_no_directions_is_alphaedit_and_needs_no_guard_set():
    from superedit.editing.hparams import AlphaEditHParams
    from superedit.editing.methods.alphaedit import alphaedit_step

    adapter = tiny_adapter("gpt2")
    stats = corpus_cov(adapter, [1])
    common = dict(layers=[1], L2=1.0, nullspace_threshold=0.3, nullspace_relative=True, **FAST)
    got = guard_step(adapter, REQS, GuardHParams(guard_directions=0, **common), stats)
    want = alphaedit_step(adapter, REQS, AlphaEditHParams(**common), stats)
    assert torch.allclose(got.delta.layers[1].dense(dtype=torch.float64), want.delta.layers[1].dense(dtype=torch.float64),
                          atol=1e-10)
    with pytest.raises(UsageError, match="exceeds the key width"):
        make_guard_state(adapter, GuardHParams(guard_directions=adapter.d_mlp + 1, guard_requests=GUARD_FILE, **common),
                         stats).projector(1)
