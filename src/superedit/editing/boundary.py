"""Name boundaries: does the token after t carry on the name that ends at t?

A gate keyed on a subject's tokens fires wherever they occur, also where they open a longer name: the
entry of "Adobe Flash" fires at "Flash" in "Adobe Flash Player", and its value then answers questions
about the player. A causal model cannot tell the two apart at "Flash" itself; the token after it can.
This module learns, from the model's own keys, a linear test on the key at t + 1 that says whether
t + 1 continues a name that reached t:

    P(continues | t + 1) = σ(wᵀ z_{t+1} + b),   z = L⁻¹k / ‖L⁻¹k‖   (k the down-projection input at the
                                                                   gate's layer, C = L Lᵀ as the gate uses)

Training pairs come from a request file's own prompts, whose subject spans are known: the tokens
inside a subject after its first (``"Flash"`` → ``" Player"``: the name so far continues, label 1) and
the token after a subject's last (``" is"``, ``"'s"``, ``","``: the name ended, label 0). The labels
are read off the prompts and the tokenizer, nothing else; the model's key decides at use.

What it does not know: a request file covers a few relations, and the word that follows a subject in
another relation's template can read as a name going on. On SmolLM2, with 9 relations in the tuning
file, a held-out relation's name ends are read so 4% of the time at the chosen setting (against 0.3%
with held-out requests of known relations), and 14 of 1,000 evaluation prompts (" premieres",
" works for", " professionally") lost their own entry. Adding every later token of the prompts as a 0
(``negatives="text"``, for the benchmark) does not help: it catches fewer in-name tokens at any given
rate of misread ends (``docs/results/lifelong.md``). Fit by L2-
regularised logistic regression in float64 (a 1,536-feature logistic regression is a few lines of torch
here; scikit-learn is not a dependency). :func:`boundary_split_report` measures it on held-out groups
(subjects, requests or relations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import ModelAdapter, Trace, encode_prompts

F64 = torch.float64


@dataclass
class NameBoundary:
    """The learned test: ``weight`` (d_mlp,) and ``bias`` over whitened unit keys; ``threshold`` is the
    probability above which the next token is taken to continue the name."""

    weight: torch.Tensor
    bias: float
    threshold: float = 0.5

    def logit_threshold(self) -> float:
        p = min(max(self.threshold, 1e-12), 1 - 1e-12)
        return float(torch.logit(torch.tensor(p, dtype=F64)))

    def continues(self, z: torch.Tensor) -> torch.Tensor:
        """(…, d_mlp) whitened unit keys → (…) bool: the token continues a name."""
        w = self.weight.to(device=z.device, dtype=z.dtype)
        return (z @ w + self.bias) > self.logit_threshold()


def prompts_with_subjects(requests: list) -> tuple[list[str], list[str], list[int]]:
    """Every filled prompt of each request that contains its subject: the edit prompt, its paraphrases and
    generation prompts. Returns (prompts, subjects, request index)."""
    prompts, subjects, owner = [], [], []
    for i, r in enumerate(requests):
        seen = set()
        for p in (r.prompt.format(r.subject), *r.paraphrase_prompts, *r.generation_prompts):
            if r.subject in p and p not in seen:
                seen.add(p)
                prompts.append(p)
                subjects.append(r.subject)
                owner.append(i)
    return prompts, subjects, owner


@torch.no_grad()
def boundary_examples(adapter: ModelAdapter, requests: list, layer: int, whiten: torch.Tensor,
                      negatives: str = "after", batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labelled keys for the boundary test.

    Returns ``z`` (n, d_mlp) float32 whitened unit keys, ``y`` (n,) 1.0 at a token inside a subject after
    its first, 0.0 at the token just after the subject (``negatives="after"``) and, with ``"text"``, also
    at every later token of the prompt; and ``group`` (n,) the request each example came from (to hold
    out whole subjects or relations). The token just after the subject comes first among a prompt's 0s."""
    if negatives not in ("after", "text"):
        raise ValueError(f"negatives {negatives!r} is not 'after' or 'text'")
    prompts, subjects, owner = prompts_with_subjects(requests)
    if not prompts:
        raise ValueError("name boundary: no prompt of the requests contains its subject")
    wt = whiten.to(device=adapter.layer_device(layer), dtype=torch.float32).T
    zs, ys, gs = [], [], []
    for s in range(0, len(prompts), batch_size):
        b = encode_prompts(adapter.tokenizer, prompts[s:s + batch_size], subjects[s:s + batch_size],
                           padding_side="right", device=adapter.device, filled=True)
        with Trace(adapter, reads=[("key", layer)], stop_after=True) as tr:
            adapter.model(**b.model_inputs())
        k = tr["key", layer].to(torch.float32) @ wt
        z = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-30)  # (batch, seq, d_mlp)
        for row in range(z.shape[0]):
            first, last, final = b.subject_first[row], b.subject_last[row], b.last_token[row]
            inside = list(range(first + 1, last + 1))  # the name so far continues at these tokens
            after = list(range(last + 1, final + 1 if negatives == "text" else min(last + 2, final + 1)))
            for pos, label in [(p, 1.0) for p in inside] + [(p, 0.0) for p in after]:
                zs.append(z[row, pos].cpu())
                ys.append(label)
                gs.append(owner[s + row])
    return torch.stack(zs), torch.tensor(ys), torch.tensor(gs)


def fit_boundary(z: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, threshold: float = 0.5,
                 max_iter: int = 200) -> NameBoundary:
    """L2-regularised logistic regression (float64, L-BFGS): mean log-loss + l2/2 ‖w‖²; classes weighted
    to equal total weight, so the fit does not lean on whichever label the prompts hold more of."""
    if not ((y == 0).any() and (y == 1).any()):
        raise ValueError("name boundary: the examples need both labels (subjects of one token only give no "
                         "'continues' example; prompts that end at their subject give no 'ended' example)")
    X, t = z.to(F64), y.to(F64)
    sw = torch.where(t > 0.5, 0.5 / t.sum(), 0.5 / (1 - t).sum())
    w = torch.zeros(X.shape[1], dtype=F64, requires_grad=True)
    b = torch.zeros((), dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (sw * torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, t, reduction="none")).sum() \
            + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return NameBoundary(w.detach().to(torch.float32), float(b.detach()), threshold)


def boundary_split_report(z: torch.Tensor, y: torch.Tensor, group: torch.Tensor, l2: float,
                          thresholds: list[float], hold_out: float = 0.3, seed: int = 0,
                          measured: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
    """Fit on the examples of (1 − hold_out) of the groups (requests, or relations), report on the rest's
    examples ``measured`` = (z, y, group) (default: the same ones): per threshold, the share of held-out
    name ends wrongly taken to continue (``ended_suppressed``: an entry would not fire on its own subject
    there) and of held-out continuations caught (``continues_caught``)."""
    ids = torch.unique(group)
    g = torch.Generator().manual_seed(seed)
    held = ids[torch.randperm(len(ids), generator=g)[: max(1, int(round(hold_out * len(ids))))]]
    model = fit_boundary(z[~torch.isin(group, held)], y[~torch.isin(group, held)], l2)
    zm, ym, gm = (z, y, group) if measured is None else measured
    test = torch.isin(gm, held)
    logits = zm[test].to(F64) @ model.weight.to(F64) + model.bias
    yt = ym[test]
    rows = []
    for p in thresholds:
        cut = NameBoundary(model.weight, model.bias, p).logit_threshold()
        said = logits > cut
        rows.append({"threshold": p, "l2": l2, "ended_suppressed": float(said[yt == 0].float().mean()),
                     "continues_caught": float(said[yt == 1].float().mean()),
                     "n_ended": int((yt == 0).sum()), "n_continues": int((yt == 1).sum()),
                     "n_held_out_groups": int(len(held))})
    return rows


def learn_boundary(adapter: ModelAdapter, requests_path: str, layer: int, whiten: torch.Tensor, l2: float,
                   threshold: float) -> NameBoundary:
    """The test fitted on every prompt of ``requests_path`` (the hparams' ``boundary_requests``)."""
    from ..data import load_requests
    from ..errors import RequestFormatError, UsageError

    try:
        reqs = load_requests(requests_path)
    except (FileNotFoundError, RequestFormatError) as exc:
        raise UsageError(f"boundary_requests {requests_path!r} cannot be read: {exc}") from exc
    try:
        z, y, _ = boundary_examples(adapter, reqs, layer, whiten, "after")
        return fit_boundary(z, y, l2, threshold)
    except ValueError as exc:
        raise UsageError(f"boundary_requests {requests_path!r}: {exc}") from exc
