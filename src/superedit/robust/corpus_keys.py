"""One reader of keys at every token position of a list of texts, shared by the REP gate negatives
(:func:`~superedit.robust.adaptor.mine_hard_negatives`, ``_all_position_keys``) and the
"similar but unrelated keys" scan (:func:`~superedit.robust.geometry.similar_unrelated_keys`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass
class TextKeys:
    index: int  #: position of the text in the input list
    text: str
    token_index: list[int]  #: the non-pad token positions, in order
    spans: list[tuple[int, int]]  #: character span (start, end) of each of those tokens in ``text``
    keys: torch.Tensor  #: (n_tokens, d_mlp) float32 on the CPU

    def prefix_free_count(self, exclude: Sequence[str]) -> int:
        """How many leading tokens end before the first occurrence of any ``exclude`` string (their
        prefix contains none of them); all tokens when none occurs."""
        hits = [i for e in exclude if e for i in [self.text.find(e)] if i >= 0]
        if not hits:
            return len(self.spans)
        first = min(hits)
        return sum(1 for _, end in self.spans if end <= first)


@torch.no_grad()
def iter_text_keys(adapter, texts: Sequence[str], layer: int, batch_size: int = 16,
                   max_length: int | None = None, progress_desc: str | None = None,
                   with_spans: bool = True) -> Iterator[TextKeys]:
    """Keys at ("key", ``layer``) for every non-pad token of each text (one forward pass per batch,
    stopped after ``layer``), with the tokens' character spans (``with_spans``; needs a tokenizer
    that returns offsets, else ``spans`` is empty). ``max_length`` truncates (default: the model's
    position limit)."""
    from ..models import Trace

    tok = adapter.tokenizer
    limit = max_length or adapter.max_positions
    starts = range(0, len(texts), batch_size)
    if progress_desc:
        from ..utils.progress import progress

        starts = progress(starts, total=len(starts), desc=progress_desc)
    for s in starts:
        batch = list(texts[s:s + batch_size])
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=limit,
                  return_offsets_mapping=with_spans)
        offsets = enc.pop("offset_mapping") if with_spans else None
        enc = enc.to(adapter.device)
        with Trace(adapter, reads=[("key", layer)], stop_after=True) as tr:
            adapter.model(**enc)
        K = tr["key", layer].float().cpu()
        mask = enc["attention_mask"].bool().cpu()
        for r, text in enumerate(batch):
            pos = mask[r].nonzero().flatten().tolist()
            spans = [(int(offsets[r, p][0]), int(offsets[r, p][1])) for p in pos] if with_spans else []
            yield TextKeys(s + r, text, pos, spans, K[r, pos])
