"""Subject token positions from the tokenizer's offset mapping.

The subject's first/last token are the first/last tokens whose character span overlaps the
subject's character span in the prompt. This works for any fast tokenizer — byte-level BPE
(GPT-2: " Paris" carries its leading space) and sentencepiece style (Llama: "▁Paris") — with left or
right padding, without per-family offsets. Special and padding tokens (empty spans) never match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SubjectNotFoundError, TemplateError


def fill_template(template: str, subject: str) -> tuple[str, int, int]:
    """Return ``(prompt, start, end)``: the template with the subject at its ``{}``, and its char span."""
    if not isinstance(template, str) or template.count("{}") != 1:
        n = template.count("{}") if isinstance(template, str) else 0
        raise TemplateError(f"prompt template {template!r} must contain exactly one '{{}}' for the subject (found {n})")
    if not subject or not subject.strip():
        raise TemplateError(f"empty subject for template {template!r}")
    start = template.index("{}")
    prompt = template[:start] + subject + template[start + 2:]
    return prompt, start, start + len(subject)


def locate_subject(prompt: str, subject: str) -> tuple[int, int]:
    """Char span of the first occurrence of ``subject`` in an already filled ``prompt``."""
    start = prompt.find(subject) if subject else -1
    if start < 0:
        raise SubjectNotFoundError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    return start, start + len(subject)


def tokens_overlapping(offsets, char_start: int, char_end: int, mask=None) -> list[int]:
    """Indices of tokens whose non-empty (start, end) offset overlaps [char_start, char_end)."""
    idx = []
    for i, (s, e) in enumerate(offsets):
        if mask is not None and not mask[i]:
            continue
        if e > s and e > char_start and s < char_end:
            idx.append(i)
    return idx


@dataclass
class PromptBatch:
    """A tokenized batch with subject positions (indices into the padded sequences)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_first: list[int]
    subject_last: list[int]
    last_token: list[int]  #: index of each prompt's final (non-pad) token
    prompts: list[str]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def to(self, device) -> "PromptBatch":
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        return self


def encode_prompts(tokenizer, templates: list[str], subjects: list[str], padding_side: str | None = None,
                   device=None, filled: bool = False) -> PromptBatch:
    """Tokenize prompts and find each subject's first and last token.

    Args:
        templates: prompt templates with ``{}`` (or already filled prompts when ``filled=True``).
        subjects: one subject per template.
        padding_side: "left" or "right" (default: the tokenizer's own).
        filled: the templates are full prompts; the subject's first occurrence is used.
    """
    if len(templates) != len(subjects):
        raise ValueError(f"{len(templates)} templates but {len(subjects)} subjects")
    prompts, spans = [], []
    for t, s in zip(templates, subjects):
        if filled:
            prompts.append(t)
            spans.append(locate_subject(t, s))
        else:
            p, a, b = fill_template(t, s)
            prompts.append(p)
            spans.append((a, b))
    old_side = tokenizer.padding_side
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, return_offsets_mapping=True)
    finally:
        tokenizer.padding_side = old_side
    first, last, final = [], [], []
    for row, (prompt, (a, b)) in enumerate(zip(prompts, spans)):
        mask = enc["attention_mask"][row].tolist()
        idx = tokens_overlapping(enc["offset_mapping"][row].tolist(), a, b, mask)
        if not idx:
            raise SubjectNotFoundError(f"no token of subject {prompt[a:b]!r} found in tokenized prompt {prompt!r}")
        first.append(idx[0])
        last.append(idx[-1])
        final.append(max(i for i, m in enumerate(mask) if m))
    batch = PromptBatch(enc["input_ids"], enc["attention_mask"], first, last, final, prompts)
    return batch.to(device) if device is not None else batch


def subject_token_span(tokenizer, template: str, subject: str) -> tuple[int, int]:
    """(first, last) token index of ``subject`` in ``template.format(subject)`` (no padding)."""
    b = encode_prompts(tokenizer, [template], [subject])
    return b.subject_first[0], b.subject_last[0]
