"""stats/whitening.py: the ridge rule and the Cholesky whitener (C is never inverted)."""

import re
from pathlib import Path

import pytest
import torch

from superedit.errors import StatsError
from superedit.stats.whitening import Whitener, with_ridge

F64 = torch.float64


def spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, 3 * d, dtype=F64, generator=g)
    return B @ B.T / (3 * d)


def test_ridge_rule_adds_a_fraction_of_the_mean_diagonal():
    C = spd(6)
    assert with_ridge(C, 0.0) is C
    torch.testing.assert_close(with_ridge(C, 0.1) - C, 0.1 * C.diagonal().mean() * torch.eye(6, dtype=F64))
    for bad in (-1e-3, float("nan"), float("inf"), True):
        with pytest.raises(StatsError, match="ridge must be a finite number"):
            with_ridge(C, bad)


def test_whitener_inner_products_and_solve_are_c_inverse_ones():
    C = spd(8, seed=1)
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(3, 8, dtype=F64, generator=g), torch.randn(5, 8, dtype=F64, generator=g)
    for ridge in (0.0, 0.05):
        W = Whitener(C, ridge=ridge)
        Cr = with_ridge(C, ridge)
        torch.testing.assert_close(W.inner(A, B), A @ torch.linalg.solve(Cr, B.T))
        torch.testing.assert_close(W.solve(A), torch.linalg.solve(Cr, A.T).T)
        torch.testing.assert_close(W.L @ W.L.T, Cr)
        assert W.ridge_abs == pytest.approx(ridge * float(C.diagonal().mean()))


def test_whitening_cosine_formula_scale_invariance_and_gradient():
    C = spd(8, seed=3)
    W = Whitener(C)
    g = torch.Generator().manual_seed(4)
    k = torch.randn(8, dtype=F64, generator=g)
    K = torch.randn(4, 8, dtype=F64, generator=g)
    s = K @ torch.linalg.solve(C, k)
    n = (K * torch.linalg.solve(C, K.T).T).sum(1).sqrt() * (k @ torch.linalg.solve(C, k)).sqrt()
    torch.testing.assert_close(W.cosine(K, k), s / n)
    torch.testing.assert_close(W.cosine(torch.stack([k, 3 * k]), k), torch.ones(2, dtype=F64))
    # float32 keys in, float32 out, gradients flow into the keys
    K32 = K.float().requires_grad_(True)
    cos = W.cosine(K32, k.float())
    assert cos.dtype == torch.float32
    cos.sum().backward()
    assert K32.grad is not None and torch.isfinite(K32.grad).all() and K32.grad.abs().sum() > 0


def test_singular_covariance_needs_a_ridge_and_bad_shapes_are_named():
    B = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    C = B @ B.T  # rank 3
    with pytest.raises(StatsError, match="layer 4: the key covariance C is singular"):
        Whitener(C, layer=4)
    assert Whitener(C, ridge=1e-2).condition_number < 1e12
    with pytest.raises(StatsError, match="square matrix"):
        Whitener(torch.zeros(3, 4))
    with pytest.raises(StatsError, match="NaN"):
        Whitener(torch.full((3, 3), float("nan")))
    with pytest.raises(StatsError, match="width 5 do not match the covariance size 8"):
        Whitener(spd(8)).whiten(torch.zeros(2, 5))


#: The one explicit inverse by design: D4S's ``factor_kind: woodbury`` keeps A⁻¹ = (λC + Σkkᵀ)⁻¹ and
#: updates it by Woodbury; its default ``cholesky`` kind keeps the Cholesky factor instead.
ALLOWED_INVERSES = {("editing/methods/d4s.py", "cholesky_inverse"), ("lifelong/d4s.py", "cholesky_inverse")}


def test_no_explicit_inverse_anywhere_in_the_package():
    src = Path(__file__).resolve().parents[1] / "src" / "superedit"
    pattern = re.compile(r"linalg\.inv\b|torch\.inverse\b|\.inverse\(\)|cholesky_inverse|linalg\.pinv|"
                         r"spd_solve\([^,]*,\s*torch\.eye")  # solving against I (a ridge term inside A is fine)
    offenders = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 for m in [pattern.search(line)] if m and (str(p.relative_to(src)), m.group(0)) not in ALLOWED_INVERSES]
    assert not offenders, offenders
