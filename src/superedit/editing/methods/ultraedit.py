"""UltraEdit (Gu et al. 2025, arXiv 2505.14679): training-, subject- and memory-free lifelong editing.

No key covariance, no value optimisation, no subject: one forward/backward pass over the batch's
``prompt + target`` per step, on the model as it is. For every edited layer l:

1. Features: at each target position i of the batch (the positions whose next token is a target
   token; ``positions: all`` reads every token of prompt + target) the down-projection's input
   k_i (d_mlp,) and the gradient g_i = ∂L/∂(down-projection output at i) (d_model,), with
   L = Σ_requests mean over its target tokens of −log p(target token).
2. Lifelong normalisation: the features z_i = [k_i ‖ g_i] (d_mlp + d_model,) are merged into running
   statistics over every edit so far — count n, mean μ and M2 = Σ (z − μ)², by the exact parallel
   update of Chan et al. (float64) — and then standardised with them, the current batch included:

       ẑ_i = (z_i − μ) / (σ + ε) = [k̂_i ‖ ĝ_i],      σ = √(M2 / (n − 1))   (0 while n = 1)

3. Pseudo-values (the output change of a gradient step taken on normalised features):

       r_i = −lr · ‖k̂_i‖² · ĝ_i              R = [r_1 … r_N] (d_model, N)

4. Closed form: ridge least squares from the RAW keys K = [k_1 … k_N] (d_mlp, N) to R:

       Δ_l = R (KᵀK + λI)⁻¹ Kᵀ  =  R Kᵀ (KKᵀ + λI)⁻¹          λ = ``ridge``

   solved in float64 by Cholesky on the smaller Gram matrix (N×N when N ≤ d_mlp, else d_mlp×d_mlp)
   and kept as the low-rank factors Δ = R Yᵀ, Y = K (KᵀK + λI)⁻¹ (d_mlp, N).

All layers' increments come from the same pass (UltraEdit has no MEMIT-style spread). The running
statistics are the method's whole memory: O(d_mlp + d_model) per layer, whatever the number of edits.

State (:class:`UltraEditState`): per layer ``layer.<l>.rows`` (int64, feature rows so far),
``layer.<l>.mean`` and ``layer.<l>.m2`` (float64, d_mlp + d_model), and ``layer.<l>.counts`` (edits
merged); a run resumed from ``state_dict`` continues with the same bits. Journal of a step: the batch's
own ``rows``/``mean``/``m2``/``counts`` per layer; ``add`` merges them in, ``remove`` takes them out with
the inverse of the parallel update (exact up to float64 rounding).

Where this differs from the authors' code (read for this module; no code taken): their running
variance adds n_b·var_unbiased(batch) for a batch's M2 (this is exact Chan: Σ (z − μ_b)²); they edit
up/gate projections for some models — superedit edits the down-projection only (their Mistral and
GPT-J settings). Positions: their ``token: ans`` reads the answer tokens as inputs, ``mask`` every
token; ``positions: target`` here reads the positions predicting the answer tokens, where the
gradient is non-zero (the last answer token as input gets a zero gradient).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ...models import ModelAdapter, Trace, encode_prompt_target
from ...models.positions import fill_template
from ..delta import LayerDelta, WeightDelta
from ..hparams import UltraEditHParams
from ..solve import spd_solve
from .protocol import StepResult

F64 = torch.float64
REQUESTS_PER_PASS = 32  #: requests per forward/backward pass when reading features


# ----------------------------------------------------------------------- running statistics
def batch_moments(z: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean (D,), M2 (D,) = Σ (z − mean)²) of the rows of ``z`` (N, D), float64."""
    z = z.to(F64)
    mean = z.mean(dim=0)
    return int(z.shape[0]), mean, ((z - mean) ** 2).sum(dim=0)


def merge_moments(a: tuple[int, torch.Tensor, torch.Tensor], b: tuple[int, torch.Tensor, torch.Tensor]):
    """Moments of the union of two row sets (Chan et al.'s parallel update): n = n_a + n_b,
    μ = μ_a + δ n_b / n, M2 = M2_a + M2_b + δ² n_a n_b / n with δ = μ_b − μ_a."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    if nb == 0:
        return na, ma.clone(), sa.clone()
    if na == 0:
        return nb, mb.clone(), sb.clone()
    d = mb - ma
    return n, ma + d * (nb / n), sa + sb + d * d * (na * nb / n)


def unmerge_moments(total: tuple[int, torch.Tensor, torch.Tensor], b: tuple[int, torch.Tensor, torch.Tensor]):
    """Moments of ``total`` without the rows of ``b`` (the inverse of :func:`merge_moments`)."""
    (n, m, s), (nb, mb, sb) = total, b
    na = n - nb
    if na < 0:
        raise ValueError(f"cannot remove {nb} rows from statistics over {n}")
    if na == 0:
        return 0, torch.zeros_like(m), torch.zeros_like(s)
    ma = (m * n - mb * nb) / na
    d = mb - ma
    return na, ma, (s - sb - d * d * (na * nb / n)).clamp_min(0.0)


def standardise(z: torch.Tensor, moments: tuple[int, torch.Tensor, torch.Tensor], eps: float) -> torch.Tensor:
    """(z − μ) / (σ + ε) row-wise, σ = √(M2 / (n − 1)) (0 for n ≤ 1)."""
    n, mean, m2 = moments
    std = (m2 / (n - 1)).sqrt() if n > 1 else torch.zeros_like(m2)
    return (z.to(F64) - mean) / (std + eps)


def ultraedit_solve(K: torch.Tensor, R: torch.Tensor, ridge: float) -> torch.Tensor:
    """Y (d_mlp, N) with Δ = R Yᵀ = R (KᵀK + λI)⁻¹ Kᵀ, for K (d_mlp, N), R (d_model, N); float64, Cholesky.

    Y = K (KᵀK + λI)⁻¹ = (KKᵀ + λI)⁻¹ K: the N×N system when N ≤ d_mlp, else the d_mlp×d_mlp one."""
    K = K.to(F64)
    d, n = K.shape
    if n <= d:
        return spd_solve(K.T @ K + ridge * torch.eye(n, dtype=F64, device=K.device), K.T).T
    return spd_solve(K @ K.T + ridge * torch.eye(d, dtype=F64, device=K.device), K)


# ----------------------------------------------------------------------- state
class UltraEditState:
    """The lifelong normaliser: running (count, mean, M2) of [k ‖ g] per edited layer (module docstring)."""

    def __init__(self, layers: list[int], width: int, device=None):
        self.moments = {int(l): (0, torch.zeros(width, dtype=F64, device=device),
                                 torch.zeros(width, dtype=F64, device=device)) for l in layers}
        self.n_edits = {int(l): 0 for l in layers}

    def _batches(self, journal: dict[str, torch.Tensor]):
        for l in self.moments:
            if f"layer.{l}.rows" in journal:
                dev = self.moments[l][1].device
                yield l, (int(journal[f"layer.{l}.rows"][0]), journal[f"layer.{l}.mean"].to(dev, F64),
                          journal[f"layer.{l}.m2"].to(dev, F64)), int(journal[f"layer.{l}.counts"][0])

    def merged(self, layer: int, batch: tuple[int, torch.Tensor, torch.Tensor]):
        """The layer's statistics with ``batch`` merged in (the state is not changed)."""
        return merge_moments(self.moments[layer], batch)

    def add(self, journal: dict[str, torch.Tensor]) -> None:
        for l, b, edits in self._batches(journal):
            self.moments[l] = merge_moments(self.moments[l], b)
            self.n_edits[l] += edits

    def remove(self, journal: dict[str, torch.Tensor]) -> None:
        for l, b, edits in self._batches(journal):
            self.moments[l] = unmerge_moments(self.moments[l], b)
            self.n_edits[l] -= edits

    def total_delta(self, layer: int) -> None:
        return None  # increments add up in the ledger

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for l, (n, mean, m2) in self.moments.items():
            out[f"layer.{l}.rows"] = torch.tensor([n], dtype=torch.int64)
            out[f"layer.{l}.counts"] = torch.tensor([self.n_edits[l]], dtype=torch.int64)
            out[f"layer.{l}.mean"] = mean.detach().to("cpu", copy=True)
            out[f"layer.{l}.m2"] = m2.detach().to("cpu", copy=True)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> "UltraEditState":
        for l, (_, mean, _) in self.moments.items():
            if f"layer.{l}.mean" not in sd:
                continue
            for name in ("mean", "m2"):
                got = tuple(sd[f"layer.{l}.{name}"].shape)
                if got != tuple(mean.shape):
                    raise ValueError(f"layer.{l}.{name} has shape {got}, expected {tuple(mean.shape)}")
            self.moments[l] = (int(sd[f"layer.{l}.rows"][0]), sd[f"layer.{l}.mean"].to(mean.device, F64).clone(),
                               sd[f"layer.{l}.m2"].to(mean.device, F64).clone())
            self.n_edits[l] = int(sd[f"layer.{l}.counts"][0])
        return self


def make_ultraedit_state(adapter: ModelAdapter, hparams: UltraEditHParams, stats=None,
                         base: dict[int, torch.Tensor] | None = None) -> UltraEditState:
    """Empty statistics (no edits yet) for ``hparams.layers``."""
    for l in hparams.layers:
        adapter.check_layer(l)
    return UltraEditState(sorted(hparams.layers), adapter.d_mlp + adapter.d_model, adapter.device)


# ----------------------------------------------------------------------- features
def edit_features(adapter: ModelAdapter, requests: list, layers: list[int],
                  positions: str = "target") -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], list[int]]:
    """Keys {l: (N, d_mlp)} and output gradients {l: (N, d_model)} (float64) at the batch's ``positions``
    ("target" or "all"; module docstring, step 1), and the number of rows of each request."""
    keys: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    grads: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    rows_per_request: list[int] = []
    for start in range(0, len(requests), REQUESTS_PER_PASS):
        chunk = requests[start:start + REQUESTS_PER_PASS]
        filled = [fill_template(r.prompt, r.subject) for r in chunk]
        batch = encode_prompt_target(adapter.tokenizer, [f[0] for f in filled], [r.target_new for r in chunk],
                                     device=adapter.device)
        mask, labels = batch.loss_mask()
        probes: dict[int, torch.Tensor] = {}

        def probe(layer: int):
            def fn(t: torch.Tensor) -> torch.Tensor:
                probes[layer] = torch.zeros_like(t, requires_grad=True)
                return t + probes[layer]

            return fn

        with torch.enable_grad():
            with Trace(adapter, reads=[("key", l) for l in layers], edits={("value", l): probe(l) for l in layers}) as tr:
                logits = adapter.model(**batch.model_inputs()).logits
            logp = F.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            loss = (-(logp * mask).sum(dim=1) / mask.sum(dim=1)).sum()
            g = torch.autograd.grad(loss, [probes[l] for l in layers])
        where = mask > 0 if positions == "target" else batch.attention_mask > 0
        rows_per_request += where.sum(dim=1).tolist()
        for l, gl in zip(layers, g):
            keys[l].append(tr["key", l][where.to(gl.device)].to(adapter.device, F64))  # one device for the state
            grads[l].append(gl[where.to(gl.device)].to(adapter.device, F64))
    return ({l: torch.cat(v) for l, v in keys.items()}, {l: torch.cat(v) for l, v in grads.items()},
            rows_per_request)


# ----------------------------------------------------------------------- the method
def ultraedit_step(adapter: ModelAdapter, requests: list, hparams: UltraEditHParams, stats=None,
                   state: UltraEditState | None = None) -> StepResult:
    """One UltraEdit turn on the model as it is; merges the batch's features into ``state`` (None: a fresh
    normaliser, as for a single edit) after every layer is solved. ``stats`` is not used (memory-free)."""
    layers = sorted(hparams.layers)
    state = make_ultraedit_state(adapter, hparams) if state is None else state
    t0 = time.perf_counter()
    keys, grads, rows = edit_features(adapter, requests, layers, hparams.positions)
    t1 = time.perf_counter()
    d_mlp = adapter.d_mlp
    deltas: dict[int, LayerDelta] = {}
    journal: dict[str, torch.Tensor] = {}
    info = []
    for l in layers:
        z = torch.cat([keys[l], grads[l]], dim=1)  # (N, d_mlp + d_model)
        batch = batch_moments(z)
        z_hat = standardise(z, state.merged(l, batch), hparams.norm_eps)
        k_hat, g_hat = z_hat[:, :d_mlp], z_hat[:, d_mlp:]
        R = (-hparams.lr * (k_hat * k_hat).sum(dim=1, keepdim=True) * g_hat).T  # (d_model, N)
        K = keys[l].T  # (d_mlp, N)
        Y = ultraedit_solve(K, R, hparams.ridge)
        deltas[l] = LayerDelta(R.to(adapter.layer_dtype(l)), Y.to(adapter.layer_dtype(l)))
        journal[f"layer.{l}.rows"] = torch.tensor([batch[0]], dtype=torch.int64)
        journal[f"layer.{l}.counts"] = torch.tensor([len(requests)], dtype=torch.int64)
        journal[f"layer.{l}.mean"], journal[f"layer.{l}.m2"] = batch[1], batch[2]
        info.append({"layer": l, "rows": batch[0], "key_norm": float(K.norm(dim=0).mean()),
                     "pseudo_value_norm": float(R.norm(dim=0).mean())})
    state.add(journal)
    summaries = [{"case_id": r.case_id, "rows": n} for r, n in zip(requests, rows)]
    return StepResult(WeightDelta(deltas, "ultraedit", {"model": adapter.identity(), "hparams": hparams.to_dict(),
                                                        "requests": summaries, "layers": info,
                                                        "timings": {"features": t1 - t0,
                                                                    "solve": time.perf_counter() - t1}}),
                      journal)
