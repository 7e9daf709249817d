"""Memory and time of AlphaEdit's and D4S's per-layer state at Llama-3-8B's width (issue #15 item 5).

Random matrices, no model: d_mlp = 14,336 and d_model = 4,096 by default (``--d-mlp``/``--d-model`` for
quick checks). One part per process (``--part``), because the peak resident set is per process:

* ``projector``: AlphaEdit's null-space projector from a random SPD C (eigendecomposition, float64;
  O(d³): at 14,336 it takes far longer than this benchmark's budget on one core, so measure it at
  smaller ``--d-mlp`` and extrapolate by d³, saying so);
* ``alphaedit``: one AlphaEdit solve step with ``--keys`` keys, from a projector with a null space of
  ``--null-frac`` · d (a random orthonormal basis: the step's cost does not depend on how the basis was
  found) and a dense Σ K_p K_pᵀ, the factorised solve (``alphaedit_solve``) and, with ``--dense``, the
  reference with the dense d × d projector;
* ``d4s``: one D4S incremental step (``D4SSums.add``: Woodbury X update + rank-1 Cholesky updates) with
  ``--keys`` keys from an existing factor; ``--c identity`` is the null-space mode (λC = α·I, kept as a
  scalar), ``--c dense`` a dense C (λC kept as a d × d matrix).

Peak memory: the largest resident set (VmRSS, sampled every 5 ms by a thread) during each phase, minus
the resident set before it; ``state_bytes`` is the sum of the persistent tensors' sizes.

    python benchmarks/bench_big_width.py --part alphaedit                 # d_mlp 14,336: ~3 min, ~3 GB
    python benchmarks/bench_big_width.py --part d4s --c identity          # d_mlp 14,336: ~2 min, ~6 GB
    python benchmarks/bench_big_width.py --part projector --d-mlp 4096    # eigh: ~1 min
    python benchmarks/bench_big_width.py --part all --d-mlp 1024 --d-model 256   # quick check, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from contextlib import contextmanager

import torch

F64 = torch.float64
GB = 1e9


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss(record: dict, name: str):
    """record[name] = {"seconds", "peak_extra_gb"} of the block (VmRSS sampled every 5 ms; on cuda the
    allocator's peak instead)."""
    cuda = record.get("_device") == "cuda"
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            stop.wait(0.005)

    th = None if cuda else threading.Thread(target=sample, daemon=True)
    if th:
        th.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if th:
            stop.set()
            th.join()
            peak[0] = max(peak[0], rss_bytes())
        else:
            peak[0] = torch.cuda.max_memory_allocated()
        record[name] = {"seconds": round(dt, 3), "peak_extra_gb": round((peak[0] - base) / GB, 3)}
        print(f"  {name}: {dt:.2f} s, peak +{(peak[0] - base) / GB:.2f} GB", flush=True)


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def random_orthonormal(d: int, m: int, g: torch.Generator, device) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, m, generator=g, dtype=F64).to(device))[0].contiguous()


def part_projector(a, rec):
    from superedit.editing.methods.alphaedit import nullspace_basis

    g = torch.Generator().manual_seed(0)
    d = a.d_mlp
    X = torch.randn(d, d // 2, generator=g, dtype=F64).to(a.device)
    C = X @ X.T / (d // 2)  # rank d/2: a null space of d/2 (the largest basis either way)
    C.diagonal().add_(1e-6)
    del X
    with peak_rss(rec, "projector_build"):
        P = nullspace_basis(C, 1e-3)
    rec["projector"] = {"null_dim": P.rank, "basis_columns": int(P.basis.shape[1]), "complement": P.complement,
                        "stored_gb": round(P.nbytes / GB, 3), "dense_P_gb": round(d * d * 8 / GB, 3)}
    print(f"  projector: null dim {P.rank}, basis {tuple(P.basis.shape)} = {P.nbytes / GB:.2f} GB "
          f"(dense P would be {d * d * 8 / GB:.2f} GB)")


def part_alphaedit(a, rec):
    from superedit.editing.methods.alphaedit import NullSpaceProjector, alphaedit_solve, alphaedit_solve_dense

    g = torch.Generator().manual_seed(1)
    d, n = a.d_mlp, a.keys
    r = int(round(a.null_frac * d))
    complement = r > d - r
    with peak_rss(rec, "setup_basis_qr"):
        B = random_orthonormal(d, d - r if complement else r, g, a.device)
    P = NullSpaceProjector(B, complement)
    Kp = torch.randn(d, 100, generator=g, dtype=F64).to(a.device)
    KpKp = Kp @ Kp.T  # Σ K_p K_pᵀ of 100 earlier keys (dense d × d in the state)
    del Kp
    K = torch.randn(d, n, generator=g, dtype=F64).to(a.device)
    R = torch.randn(a.d_model, n, generator=g, dtype=F64).to(a.device)
    rec["alphaedit"] = {"null_dim": P.rank, "basis_columns": int(B.shape[1]), "complement": complement,
                        "state_gb": round(nbytes(KpKp, B) / GB, 3), "KpKp_gb": round(nbytes(KpKp) / GB, 3),
                        "basis_gb": round(nbytes(B) / GB, 3)}
    for i in range(a.steps):
        with peak_rss(rec, f"alphaedit_step_{i}"):
            _, Y = alphaedit_solve(R, K, P, KpKp, 10.0)
    if a.dense:
        Pd = P.dense()
        with peak_rss(rec, "alphaedit_step_dense_reference"):
            _, Y0 = alphaedit_solve_dense(R, K, Pd, KpKp, 10.0)
        rec["alphaedit"]["rel_diff_vs_dense"] = float((Y - Y0).norm() / Y0.norm())
        print(f"  factorised vs dense: relative difference {rec['alphaedit']['rel_diff_vs_dense']:.2e}")


def part_d4s(a, rec):
    from superedit.editing.methods.d4s import D4SSums

    g = torch.Generator().manual_seed(2)
    d, n = a.d_mlp, a.keys
    W0 = torch.randn(a.d_model, d, generator=g, dtype=torch.float32).to(a.device) * 0.01
    if a.c == "dense":
        C = torch.randn(d, 64, generator=g, dtype=F64).to(a.device)
        C = C @ C.T / 64
        C.diagonal().add_(1.0)
    else:
        C = None
    with peak_rss(rec, "d4s_factor_from_scratch"):
        sums = D4SSums(0, W0, C, 10.0, "cholesky")
    del C
    # some earlier edits, so the factor is a real one and X non-zero
    K0 = torch.randn(d, n, generator=g, dtype=F64).to(a.device)
    sums.add(torch.randn(a.d_model, n, generator=g, dtype=F64).to(a.device), K0)
    _ = sums.S_kk  # fold the pending keys in (what a save does), so the step below starts clean
    state = nbytes(sums._A0, sums.S_kk, sums.F, sums.S_rk, sums.X, sums.W0)
    rec["d4s"] = {"c": a.c, "factor": "cholesky (upper U, float64)",
                  "state_gb": round(state / GB, 3),
                  "parts_gb": {k: round(nbytes(v) / GB, 3) for k, v in
                               (("lambda_C", sums._A0), ("S_kk", sums.S_kk), ("factor_U", sums.F), ("S_rk", sums.S_rk),
                                ("X", sums.X), ("W0", sums.W0))}}
    for i in range(a.steps):
        K = torch.randn(d, n, generator=g, dtype=F64).to(a.device)
        R = torch.randn(a.d_model, n, generator=g, dtype=F64).to(a.device)
        with peak_rss(rec, f"d4s_step_{i}"):
            sums.add(R, K)
    if a.check:
        with peak_rss(rec, "d4s_dense_check"):
            X_ref = sums.dense_delta()
        rec["d4s"]["rel_diff_vs_dense"] = float((sums.X - X_ref).norm() / X_ref.norm())
        print(f"  incremental vs dense: relative difference {rec['d4s']['rel_diff_vs_dense']:.2e}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="all", choices=["all", "projector", "alphaedit", "d4s"])
    p.add_argument("--d-mlp", dest="d_mlp", type=int, default=14336)
    p.add_argument("--d-model", dest="d_model", type=int, default=4096)
    p.add_argument("--keys", type=int, default=10, help="keys per step")
    p.add_argument("--steps", type=int, default=1, help="steps timed (each one measured)")
    p.add_argument("--null-frac", dest="null_frac", type=float, default=0.25,
                   help="AlphaEdit: null-space dimension / d_mlp (≤ 0.5: the basis Û is kept, else its complement)")
    p.add_argument("--c", default="identity", choices=["identity", "dense"],
                   help="D4S: λC = α·I (null-space mode, a scalar) or a dense C (a d × d matrix)")
    p.add_argument("--dense", action="store_true", help="AlphaEdit: also time the dense-projector reference")
    p.add_argument("--check", action="store_true", help="D4S: compare X with a dense re-solve")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rec: dict = {"_device": torch.device(a.device).type}
    rec["config"] = {k: v for k, v in vars(a).items() if k != "json"}
    rec["config"]["torch"] = torch.__version__
    print(f"bench_big_width: d_mlp {a.d_mlp}, d_model {a.d_model}, {a.keys} keys, device {a.device}, "
          f"{a.threads} thread(s)", flush=True)
    parts = ["projector", "alphaedit", "d4s"] if a.part == "all" else [a.part]
    for part in parts:
        print(f"[{part}]", flush=True)
        {"projector": part_projector, "alphaedit": part_alphaedit, "d4s": part_d4s}[part](a, rec)
    rec["max_rss_gb"] = round(_maxrss() / GB, 3)
    rec.pop("_device")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rec, fh, indent=1)
    return rec


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
