"""The one teacher-forced scorer: every figure about target tokens reduces over its output.

For a row of token ids ``x₀ … x_{n−1}`` and a first scored position ``s ≥ 1``, the scorer returns, for
every ``j`` in ``s … n−1``,

    logprob_j = log softmax(logits(x_{<j}))[x_j],        argmax_j = argmax logits(x_{<j}),

from padded, right-aligned batches (rows sorted by length, ``batch_size`` rows per forward pass, the
model in eval mode). Two kinds of rows use it:

* :func:`score_targets` — ``prompt + " " + target`` tokenised by
  :func:`superedit.models.encode_prompt_target` (the package's one target encoding); the target's
  tokens are scored. One request is a list of one: the same row gives the same scores alone or in a
  batch (to float32 rounding).
* :func:`perplexity` — whole texts, every token after the first scored.

Reductions (:class:`TargetScore`): the sum of log-probabilities (``logprob``, the forecast's
log p(target)), the mean token NLL (``nll``, CounterFact's comparisons), ``prob = exp(−nll)`` (ROME's
magnitudes), the fraction of argmax hits (``accuracy``, EasyEdit's token accuracy) and all tokens the
argmax (``hit``, fact recall and the robustness checks).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["TargetScore", "score_targets", "score_token_rows", "perplexity", "fact_recall"]


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced scores of one target after its prompt."""

    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  #: log P(target token | prompt, previous target tokens)
    argmax: tuple[int, ...]  #: the model's argmax at each target position

    @property
    def logprob(self) -> float:
        """log P(target | prompt): the sum of the token log-probabilities."""
        return float(sum(self.logprobs))

    @property
    def nll(self) -> float:
        """Mean token NLL of the target."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """exp(−mean token NLL): the geometric mean of the target's token probabilities."""
        return math.exp(-self.nll)

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens that are the argmax."""
        return sum(int(a == t) for a, t in zip(self.argmax, self.target_ids)) / len(self.target_ids)

    @property
    def hit(self) -> bool:
        """Every target token is the argmax (teacher-forced recall)."""
        return tuple(self.argmax) == tuple(self.target_ids)


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """The model in eval mode (no dropout) inside the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@torch.no_grad()
def score_token_rows(adapter, rows: Sequence[Sequence[int]], starts: Sequence[int],
                     batch_size: int = 32) -> list[tuple[list[float], list[int]]]:
    """``(logprobs, argmax)`` of tokens ``row[start:]`` of each row, each given the tokens before it.

    Shapes: row i has ``len(rows[i]) − starts[i]`` scored tokens (none when ``starts[i] ≥ len(row)``);
    ``starts[i] ≥ 1``. Rows are sorted by length and right-padded (pad id, attention mask 0), so
    padding never precedes a scored token; results come back in the input order.
    """
    if len(rows) != len(starts):
        raise ValueError(f"{len(rows)} rows but {len(starts)} start positions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1 (got {batch_size})")
    if any(s < 1 for s in starts):
        raise ValueError("the first scored token needs at least one token before it (start ≥ 1)")
    tok, model, dev = adapter.tokenizer, adapter.model, adapter.device
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[tuple[list[float], list[int]] | None] = [None] * len(rows)
    with _eval_mode(model):
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            r_idx, p_idx, tgt = [], [], []
            for b, i in enumerate(chunk):
                row = list(rows[i])
                ids[b, :len(row)] = torch.tensor(row, dtype=torch.long)
                mask[b, :len(row)] = 1
                for j in range(starts[i], len(row)):
                    r_idx.append(b)
                    p_idx.append(j - 1)
                    tgt.append(row[j])
            if not tgt:
                for i in chunk:
                    out[i] = ([], [])
                continue
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            picked = logits[torch.tensor(r_idx, device=dev), torch.tensor(p_idx, device=dev)]
            logp = F.log_softmax(picked.float(), dim=-1)
            lp = logp.gather(-1, torch.tensor(tgt, device=dev)[:, None])[:, 0].tolist()
            am = logp.argmax(-1).tolist()
            at = 0
            for i in chunk:
                n = max(0, len(rows[i]) - starts[i])
                out[i] = (lp[at:at + n], am[at:at + n])
                at += n
    return out  # type: ignore[return-value]


def score_targets(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[TargetScore]:
    """One :class:`TargetScore` per (prompt, target), teacher-forced on ``prompt + " " + target``.

    Raises ValueError for unequal lengths or an empty target (from ``encode_prompt_target``)."""
    from ..models import encode_prompt_target

    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    enc = encode_prompt_target(adapter.tokenizer, list(prompts), list(targets))
    lengths = enc.attention_mask.sum(1).tolist()
    rows = [enc.input_ids[r, :n].tolist() for r, n in enumerate(lengths)]
    scored = score_token_rows(adapter, rows, enc.prompt_lengths, batch_size)
    return [TargetScore(tuple(ids), tuple(lp), tuple(am)) for ids, (lp, am) in zip(enc.target_ids, scored)]


def fact_recall(adapter, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64) -> list[bool]:
    """True where every target token is the argmax given the prompt and the previous target tokens."""
    return [s.hit for s in score_targets(adapter, prompts, targets, batch_size)]


def perplexity(adapter, texts: Sequence[str], batch_size: int = 16, max_length: int = 128) -> float:
    """exp(mean token NLL) over every token after the first of each text (truncated to ``max_length``
    tokens); NaN when no text has two tokens."""
    tok = adapter.tokenizer
    rows = [ids for ids in (tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts)
            if len(ids) > 1]
    scored = score_token_rows(adapter, rows, [1] * len(rows), batch_size)
    total = -sum(sum(lp) for lp, _ in scored)
    count = sum(len(lp) for lp, _ in scored)
    return math.exp(total / count) if count else float("nan")
