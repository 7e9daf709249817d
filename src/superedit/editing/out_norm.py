"""Residual-space targets through a norm on the MLP output (families whose ``mlp_out_norm`` is set).

MEMIT's spread (:mod:`superedit.editing.methods.spread`) asks each edited layer to move the residual
stream at the subject's last token by r (d_model): for most families the residual adds the
down-projection's output m as it is, so the layer's value must move by r too. Gemma 3 instead adds
N(m), its ``post_feedforward_layernorm`` (an RMSNorm with a gain), so the value must move by the Δm
that solves

    N(m + Δm) − N(m) = r.                                                          (1)

N is scale-invariant (N(c·m) = N(m)), its outputs lie on an ellipsoid, so (1) is solved in least
squares, ‖N(m + Δm) − N(m) − r‖ → min, by Gauss–Newton with the minimum-norm step (an SVD least-squares
solve with the Jacobian J = ∂N/∂m, d_model × d_model, which is singular along m) and step halving;
every accepted point is taken back to ‖m‖ along its ray (same output up to ε, smallest change of
scale; :func:`_back_to_norm`), so the moves stay on the sphere of the value's own size. J comes
from autograd on the model's own module, so no formula of a particular norm is written here.

Which moves are reachable: N's outputs have a fixed size (an RMSNorm's lie on the ellipsoid
{g ⊙ u : rms(u) = 1}), so a layer can turn its contribution but hardly shrink it: only by putting its
value into dimensions whose gain is near zero, or, through the norm's ε, by making the value tiny
(which the solve does when that is closer). A small share of a residual move is a short chord and
is nearly reachable; a move far off the output set is not, and the relative error returned says by
how much.
Float64 where the module allows (Gemma's RMSNorm computes in float32 internally, so (1) holds to
about 1e-6 relative there).
"""

from __future__ import annotations

import torch

from ..utils.logs import get_logger

log = get_logger(__name__)

F64 = torch.float64


def value_targets_through_norm(norm: torch.nn.Module, m: torch.Tensor, r: torch.Tensor, max_iter: int = 12,
                               tol: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Value increments Δm (n, d) with N(m + Δm) − N(m) ≈ r for each row, and each row's relative error
    ‖N(m + Δm) − N(m) − r‖ / ‖r‖ (n,). ``m``: the values now (n, d); ``r``: the wanted residual moves (n, d)."""
    dtype = next(norm.parameters(), torch.empty(0)).dtype
    dev = m.device

    def f(x: torch.Tensor) -> torch.Tensor:
        return norm(x.to(dtype)[None])[0].to(F64)

    out, errs = [], []
    with torch.enable_grad():
        for mi, ri in zip(m.to(dev, F64), r.to(dev, F64)):
            base = f(mi).detach()
            dm = torch.zeros_like(mi)
            rnorm = float(ri.norm()) or 1.0
            err = ri.clone()
            for _ in range(max_iter):
                if float(err.norm()) <= tol * rnorm:
                    break
                J = torch.autograd.functional.jacobian(f, mi + dm).to(F64)  # (d, d)
                # minimum-norm least squares (SVD, singular values below 1e-5 × the largest cut: the
                # radial, scale-only direction); no explicit pseudo-inverse is formed
                step = torch.linalg.lstsq(J.cpu(), err.cpu()[:, None], rcond=1e-5, driver="gelsd").solution[:, 0].to(dev)
                t = 1.0
                while t > 1e-4:  # halve the step until the error drops
                    moved = _back_to_norm(f, mi, dm + t * step, ri, base, rnorm)
                    if moved is not None and float(moved[1].norm()) < float(err.norm()):
                        dm, err = moved
                        break
                    t /= 2
                else:
                    break  # no descent along the Gauss-Newton direction: the best reachable point
            out.append(dm)
            errs.append(float(err.norm()) / rnorm)
    errors = torch.tensor(errs, dtype=F64)
    if float(errors.max()) > 1e-3:
        log.info("residual targets through the MLP-output norm: %d of %d reached only to a relative error "
                 "above 1e-3 (max %.3g): the norm's outputs cannot move that far", int((errors > 1e-3).sum()),
                 len(errs), float(errors.max()))
    return torch.stack(out), errors


#: the output change a return to the value's own norm may cost, relative to the wanted move ‖r‖
RAY_TOLERANCE = 1e-3


def _back_to_norm(f, m: torch.Tensor, dm: torch.Tensor, r: torch.Tensor, base: torch.Tensor, rnorm: float):
    """(Δm, error) for the point m + Δm taken back along its ray to ‖m‖, or as it is; None if not finite.

    N is scale-invariant up to its ε (N(c·x) = N(x)), so every c·(m + Δm), c > 0, gives nearly the same
    output. A Gauss–Newton step is tangent to the sphere through m + Δm and so lengthens it; on a target
    the norm cannot reach exactly the steps keep going and drift out along the ray. A large value move
    makes the weight update large, and every other key's value moves with it (p(k_i, k_j)·Δm), so each
    accepted point is returned to ‖m‖ unless that changes the output by more than RAY_TOLERANCE × ‖r‖.
    The tolerance is set by the wanted move, not by float rounding: ε alone changes the output by about
    ε / (2·mean(m²)) relative (5e-5 for values of norm 2.5 in 640 dimensions), and an earlier
    rounding-sized tolerance (1e-5) refused the return there and left moves of ~50 × ‖m‖ on Gemma."""
    target = m + dm
    tn = float(target.norm())
    if not bool(torch.isfinite(target).all()) or tn == 0.0:
        return None
    err = r - (f(target).detach() - base)
    scaled = target * (float(m.norm()) / tn) - m
    scaled_err = r - (f(m + scaled).detach() - base)
    if float(scaled_err.norm()) <= float(err.norm()) + RAY_TOLERANCE * rnorm:
        return scaled, scaled_err
    return dm, err
