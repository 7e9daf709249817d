"""Keys k*: the input of the MLP down-projection at the subject's last token, averaged over contexts.

    k*_l = (1/|P|) Σ_{p ∈ prefixes} key_l(p + prompt(subject))[subject_last]      (ROME eq. 3)

All requested layers are read in one forward pass per batch, stopping after the deepest layer.
"""

from __future__ import annotations

import torch

from ..models import ModelAdapter, Trace, encode_prompts

FACT_TOKENS = ("subject_last", "subject_first", "last")


def token_index(batch, fact_token: str) -> list[int]:
    if fact_token == "subject_last":
        return batch.subject_last
    if fact_token == "subject_first":
        return batch.subject_first
    if fact_token == "last":
        return batch.last_token
    raise ValueError(f"fact_token {fact_token!r} is not one of {FACT_TOKENS}")


@torch.no_grad()
def keys_at(adapter: ModelAdapter, templates: list[str], subjects: list[str], layers: list[int],
            fact_token: str = "subject_last", site: str = "key", batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Read ``site`` at ``fact_token`` for each (template, subject): {layer: (n, width)}."""
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for start in range(0, len(templates), batch_size):
        b = encode_prompts(adapter.tokenizer, templates[start:start + batch_size], subjects[start:start + batch_size],
                           padding_side="right", device=adapter.device)
        idx = torch.tensor(token_index(b, fact_token), device=adapter.device)
        rows = torch.arange(len(idx), device=adapter.device)
        with Trace(adapter, reads=[(site, l) for l in layers], stop_after=True) as tr:
            adapter.model(**b.model_inputs())
        for l in layers:  # read where layer l runs (with a --device-map, maybe not the input's device)
            t = tr[site, l]
            out[l].append(t[rows.to(t.device), idx.to(t.device)])
    return {l: torch.cat(v) for l, v in out.items()}


def context_keys(adapter: ModelAdapter, prompts: list[str], subjects: list[str], layers: list[int],
                 prefixes: list[str], fact_token: str = "subject_last") -> dict[int, torch.Tensor]:
    """Keys of every (request, prefix): {layer: (n_requests, n_prefixes, d_mlp)}."""
    templates = [pre + p for p in prompts for pre in prefixes]
    subj = [s for s in subjects for _ in prefixes]
    flat = keys_at(adapter, templates, subj, layers, fact_token)
    return {l: k.reshape(len(prompts), len(prefixes), -1) for l, k in flat.items()}


@torch.no_grad()
def subject_tail_keys(adapter: ModelAdapter, templates: list[str], subjects: list[str], layer: int, tokens: int,
                      site: str = "key", batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at the subject's last ``tokens`` tokens, last first: ``keys`` (n, tokens, width) with
    ``keys[i, j]`` read at token ``subject_last − j``, and ``valid`` (n, tokens) bool, False where the
    subject has fewer than j + 1 tokens (those keys are zero)."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    keys, valid = [], []
    for start in range(0, len(templates), batch_size):
        b = encode_prompts(adapter.tokenizer, templates[start:start + batch_size], subjects[start:start + batch_size],
                           padding_side="right", device=adapter.device)
        last = torch.tensor(b.subject_last, device=adapter.device)
        first = torch.tensor(b.subject_first, device=adapter.device)
        cols = last[:, None] - torch.arange(tokens, device=adapter.device)[None]  # (b, tokens)
        ok = cols >= first[:, None]
        rows = torch.arange(len(last), device=adapter.device)[:, None]
        with Trace(adapter, reads=[(site, layer)], stop_after=True) as tr:
            adapter.model(**b.model_inputs())
        t = tr[site, layer]
        k = t[rows.to(t.device), cols.clamp_min(0).to(t.device)].to(adapter.device)
        keys.append(torch.where(ok[..., None], k, torch.zeros_like(k)))
        valid.append(ok)
    return torch.cat(keys), torch.cat(valid)


def context_tail_keys(adapter: ModelAdapter, prompts: list[str], subjects: list[str], layer: int,
                      prefixes: list[str], tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`subject_tail_keys` of every (request, prefix): keys (n_requests, n_prefixes, tokens, d) and
    valid (n_requests, n_prefixes, tokens)."""
    templates = [pre + p for p in prompts for pre in prefixes]
    subj = [s for s in subjects for _ in prefixes]
    k, ok = subject_tail_keys(adapter, templates, subj, layer, tokens)
    return k.reshape(len(prompts), len(prefixes), tokens, -1), ok.reshape(len(prompts), len(prefixes), tokens)


def compute_keys(adapter: ModelAdapter, prompts: list[str], subjects: list[str], layers: list[int],
                 prefixes: list[str], fact_token: str = "subject_last") -> dict[int, torch.Tensor]:
    """k* per request: {layer: (n_requests, d_mlp)}, the mean over prefixes."""
    return {l: k.mean(dim=1) for l, k in context_keys(adapter, prompts, subjects, layers, prefixes, fact_token).items()}
