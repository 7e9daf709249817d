"""Generation-based scoring: what the edited model *says*, not what teacher forcing scores.

Teacher-forced comparisons (CounterFact's p(new) > p(true)) are known to overstate an edit's real
effect: the model may rank the new object above the old one and still not say it. Here each prompt
is continued greedily for ``max_new_tokens`` tokens (batched, left-padded, no sampling) and scored on
the continuation text:

* an **edit prompt** (rewrite or paraphrase) succeeds when ``target_new`` appears in the
  continuation and ``target_true`` does not;
* a **neighbourhood prompt** (another subject whose answer must not change) keeps its answer when
  the answer appears and ``target_new`` does not.

"Appears" is a case-insensitive match on word boundaries (``\\b`` around the target, so "Paris"
does not match "Parisian"), over the whitespace-normalised continuation.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch


def mentions(text: str, target: str | None) -> bool:
    """``target`` occurs in ``text`` as whole words (case-insensitive); False for an empty target."""
    if not target or not target.strip():
        return False
    words = r"\s+".join(re.escape(w) for w in target.split())
    return re.search(rf"(?<!\w){words}(?!\w)", " ".join(text.split()), flags=re.IGNORECASE) is not None


@torch.no_grad()
def greedy_continuations(adapter, prompts: Sequence[str], max_new_tokens: int = 12, batch_size: int = 16) -> list[str]:
    """Greedy continuation text of each prompt (prompt excluded), ``max_new_tokens`` tokens at most."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1 (got {max_new_tokens})")
    tok, model = adapter.tokenizer, adapter.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    old_side = tok.padding_side
    out: list[str] = []
    tok.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            enc = tok(chunk, return_tensors="pt", padding=True).to(adapter.device)
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 num_beams=1)
            new = gen[:, enc["input_ids"].shape[1]:]
            out.extend(tok.batch_decode(new, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
    return out


def edit_success(continuation: str, target_new: str, target_true: str | None) -> bool:
    """The continuation says the new object and not the old one."""
    return mentions(continuation, target_new) and not mentions(continuation, target_true)


def kept_answer(continuation: str, answer: str, target_new: str) -> bool:
    """A neighbourhood continuation still says its own answer and not the edit's new object."""
    return mentions(continuation, answer) and not mentions(continuation, target_new)


def generation_scores(adapter, request, max_new_tokens: int = 12, max_neighbours: int | None = None,
                      batch_size: int = 16) -> dict:
    """Generation-based scores of one request under the model as it is now.

    Returns ``gen_efficacy`` (rewrite prompt: 0/1), ``gen_paraphrase`` and ``gen_neighborhood`` (means
    over their prompts; None when the request has none) and the continuations themselves.
    """
    rewrite = request.filled_prompt()
    paras = list(request.paraphrase_prompts)
    neigh = list(request.neighborhood_prompts)[:max_neighbours]
    answers = list(request.neighborhood_answers)
    if len(answers) == 1:
        answers = answers * len(neigh)
    texts = greedy_continuations(adapter, [rewrite] + paras + neigh, max_new_tokens, batch_size)
    rw, pa, ne = texts[0], texts[1:1 + len(paras)], texts[1 + len(paras):]
    para_hits = [edit_success(t, request.target_new, request.target_true) for t in pa]
    neigh_hits = [kept_answer(t, a, request.target_new) for t, a in zip(ne, answers)]
    return {
        "gen_efficacy": float(edit_success(rw, request.target_new, request.target_true)),
        "gen_paraphrase": sum(para_hits) / len(para_hits) if para_hits else None,
        "gen_neighborhood": sum(neigh_hits) / len(neigh_hits) if neigh_hits else None,
        "gen_texts": {"rewrite": rw, "paraphrase": pa, "neighborhood": ne},
    }
