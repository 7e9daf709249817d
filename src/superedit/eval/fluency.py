"""Generation fluency: ROME's weighted n-gram entropy of sampled continuations.

ROME (Meng et al. 2022, ``experiments/py/eval_utils_counterfact.py``) measures fluency as

    compute_n_gram_entropy(text) = mean_n( w_n · H_n(text) ),  n ∈ {2, 3},  w = (2/3, 4/3)

where ``H_n`` is the Shannon entropy (bits) of the frequency distribution of the text's word
n-grams; with two terms this is ``H_2/3 + 2·H_3/3``. ``n_gram_entropy(texts)`` is the arithmetic
mean over texts. Texts are prompt + continuation (ROME's ``generate_fast`` returns both), sampled
with top-k 5.

Differences from ROME's code, on purpose:
  * Words come from :func:`word_tokenize`, a regex close to NLTK's Treebank ``word_tokenize``
    (words, hyphenated words, ``n't``/``'s`` clitics and punctuation as separate tokens), so the
    metric needs no NLTK download. On ordinary English the token streams agree except for rare
    cases such as ``...`` (three tokens here, one in NLTK).
  * A text with fewer than ``n`` words has ``H_n = 0`` (ROME's code divides by zero → NaN).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

NGRAM_NS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

_WORD_RE = re.compile(r"\w+(?=n't\b)|n't\b|\w+(?:-\w+)*|'\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Split ``text`` into words and punctuation (NLTK-like; see the module docstring)."""
    return _WORD_RE.findall(text)


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def entropy_bits(counts: Counter) -> float:
    """Shannon entropy (base 2) of the distribution given by ``counts``; 0 for an empty one."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum((c / total) * math.log2(c / total) for c in counts.values())


def compute_n_gram_entropy(text: str, ns: Sequence[int] = NGRAM_NS,
                           weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """ROME's weighted n-gram entropy of one text: ``mean_i(weights[i] · H_{ns[i]})``."""
    if len(ns) != len(weights) or not ns:
        raise ValueError(f"need one weight per n (ns={list(ns)}, weights={list(weights)})")
    tokens = word_tokenize(text)
    return sum(w * entropy_bits(ngram_counts(tokens, n)) for n, w in zip(ns, weights)) / len(ns)


def n_gram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of :func:`compute_n_gram_entropy` over ``texts`` (ROME's ``n_gram_entropy``)."""
    if not texts:
        raise ValueError("n_gram_entropy needs at least one text")
    return sum(compute_n_gram_entropy(t) for t in texts) / len(texts)


def generate_texts(adapter, prompts: Sequence[str], n_tokens: int = 100, seed: int = 0, top_k: int = 5,
                   batch_size: int = 16) -> list[str]:
    """Sample ``n_tokens`` new tokens (top-k, seeded, no early stop at EOS) after each prompt.

    Returns prompt + continuation, decoded without special tokens (as ROME's ``generate_fast``).
    The global RNG state is left untouched (``torch.random.fork_rng``); the same seed gives the same
    texts for the same weights, so pre/post-edit generations are paired.
    """
    import torch

    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0 (got {n_tokens})")
    tok = adapter.tokenizer
    device = adapter.device
    out: list[str] = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            old = tok.padding_side
            tok.padding_side = "left"
            try:
                enc = tok(chunk, return_tensors="pt", padding=True).to(device)
            finally:
                tok.padding_side = old
            gen = adapter.model.generate(**enc, do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0,
                                         max_new_tokens=n_tokens,
                                         pad_token_id=tok.pad_token_id, eos_token_id=None)
            out.extend(tok.batch_decode(gen, skip_special_tokens=True))
    return out
