"""Context prefixes over which keys and values are averaged (ROME's "context templates").

ROME/MEMIT average the key over the subject preceded by short texts the model itself generated,
so the edit does not depend on the exact prompt start. The empty prefix always comes first.
"""

from __future__ import annotations

import torch

from ..models import ModelAdapter

SEED_WORDS = ["The", "Therefore", "Because", "I", "You"]


def context_prefixes(adapter: ModelAdapter, lengths: list[int], n_per_length: int, seed: int = 0) -> list[str]:
    """``[""]`` + ``n_per_length`` sampled texts for each token length, each ending in ". ".

    Deterministic for a given (model, lengths, n, seed). Generated once per adapter (kept in
    ``adapter.memo``): later calls, e.g. after edits changed the weights, get the same prefixes.
    """
    key = ("context_prefixes", tuple(lengths), n_per_length, seed)
    if key in adapter.memo:
        return list(adapter.memo[key])
    tok = adapter.tokenizer
    prefixes = [""]
    with torch.random.fork_rng(devices=[adapter.device] if adapter.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for length in lengths:
            if n_per_length == 0 or length <= 0:
                continue
            starts = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(n_per_length)]
            old = tok.padding_side
            tok.padding_side = "left"
            try:
                enc = tok(starts, return_tensors="pt", padding=True).to(adapter.device)
            finally:
                tok.padding_side = old
            with torch.no_grad():
                out = adapter.model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=length,
                                             pad_token_id=tok.pad_token_id, eos_token_id=None)
            for text in tok.batch_decode(out, skip_special_tokens=True):
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                prefixes.append(text + ". ")
    adapter.memo[key] = prefixes
    return list(prefixes)
