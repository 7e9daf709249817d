"""Residual-space targets through a norm on the MLP output (families whose ``mlp_out_norm`` is set).

MEMIT's spread (:mod:`superedit.editing.methods.spread`) asks each edited layer to move the residual
stream at the subject's last token by r (d_model): for most families the residual adds the
down-projection's output m as it is, so the layer's value must move by r too. Gemma 3 instead adds
N(m), its ``post_feedforward_layernorm`` (an RMSNorm with a gain), so the value must move by the Δm
that solves

    N(m + Δm) − N(m) = r.                                                          (1)

N is scale-invariant (N(c·m) = N(m)), its outputs lie on an ellipsoid, so (1) is solved in least
squares, ‖N(m + Δm) − N(m) − r‖ → min, by Gauss–Newton with the minimum-norm step (an SVD least-squares
solve with the Jacobian J = ∂N/∂m, d_model × d_model, which is singular along m) and step halving; the
solution is then scaled back to ‖m‖ along its ray (same output, smallest change of scale). J comes
from autograd on the model's own module, so no formula of a particular norm is written here.

Which moves are reachable: N's outputs have a fixed size (an RMSNorm's lie on the ellipsoid
{g ⊙ u : rms(u) = 1}), so a layer can turn its contribution but not shrink it. A small share of a
residual move is a short chord and is nearly reachable; a move that asks for a point inside the
ellipsoid is not, and the relative error returned says by how much.
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
                    new_err = ri - (f(mi + dm + t * step).detach() - base)
                    if float(new_err.norm()) < float(err.norm()):
                        dm, err = dm + t * step, new_err
                        break
                    t /= 2
                else:
                    break  # no descent along the Gauss-Newton direction: the best reachable point
            # N is scale-invariant, so every c·(m + Δm), c > 0, gives the same output: return the one with
            # m's own norm (Gauss–Newton steps on an unreachable r drift along the ray, e.g. to 250 × ‖m‖)
            # (only where that holds: a norm's epsilon breaks the invariance for tiny values)
            target = mi + dm
            if float(target.norm()) > 0:
                scaled = target * (mi.norm() / target.norm()) - mi
                scaled_err = ri - (f(mi + scaled).detach() - base)
                # kept when the output is unchanged up to the module's rounding (Gemma's norm computes in float32)
                if float(scaled_err.norm()) <= float(err.norm()) + 1e-5 * (float(base.norm()) + rnorm):
                    dm, err = scaled, scaled_err
            out.append(dm)
            errs.append(float(err.norm()) / rnorm)
    errors = torch.tensor(errs, dtype=F64)
    if float(errors.max()) > 1e-3:
        log.info("residual targets through the MLP-output norm: %d of %d reached only to a relative error "
                 "above 1e-3 (max %.3g): the norm's outputs cannot move that far", int((errors > 1e-3).sum()),
                 len(errs), float(errors.max()))
    return torch.stack(out), errors
