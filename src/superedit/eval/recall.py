"""Teacher-forced fact recall for any HF causal LM."""

from __future__ import annotations

from typing import Sequence


def _target_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as it continues ``prompt`` (a leading space is added unless the
    target or the prompt's end already provides whitespace)."""
    t = target if (target[:1].isspace() or prompt[-1:].isspace()) else " " + target
    return tokenizer(t, add_special_tokens=False)["input_ids"]


def target_logprobs_batch(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64):
    """For each (prompt, target): (per-token log-probs of the target tokens, per-token argmax hits).

    Teacher-forced: one forward pass over prompt + target; works with left or right padding
    (``tokenizer.padding_side`` is respected; positions come from the attention mask)."""
    import torch

    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    device = next(model.parameters()).device
    out: list[tuple[list[float], list[bool]]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ps, ts = prompts[start:start + batch_size], targets[start:start + batch_size]
            seqs, spans = [], []
            for p, t in zip(ps, ts):
                pid = tokenizer(p, add_special_tokens=True)["input_ids"]
                tid = _target_ids(tokenizer, p, t)
                if not tid:
                    raise ValueError(f"target {t!r} tokenizes to nothing")
                seqs.append(pid + tid)
                spans.append((len(pid), len(tid)))
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            offs = []
            for i, s in enumerate(seqs):
                off = width - len(s) if left else 0
                ids[i, off:off + len(s)] = torch.tensor(s)
                mask[i, off:off + len(s)] = 1
                offs.append(off)
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                try:
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
                except TypeError:  # models without position_ids
                    logits = model(input_ids=ids, attention_mask=mask).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for i, (plen, tlen) in enumerate(spans):
                o = offs[i]
                rows = torch.arange(o + plen - 1, o + plen - 1 + tlen, device=device)
                tgt = ids[i, o + plen:o + plen + tlen]
                lp = logp[i, rows].gather(-1, tgt[:, None])[:, 0]
                hit = logp[i, rows].argmax(-1) == tgt
                out.append((lp.tolist(), hit.tolist()))
    finally:
        if was_training:
            model.train()
    return out


def fact_recall(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 64) -> list[bool]:
    """True where every target token is the argmax given the prompt and the previous target tokens
    (teacher forcing; the target is prefixed with a space)."""
    return [all(h) for _, h in target_logprobs_batch(model, tokenizer, prompts, targets, batch_size)]


def recall_rate(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 64) -> float:
    hits = fact_recall(model, tokenizer, prompts, targets, batch_size)
    return sum(hits) / max(1, len(hits))
