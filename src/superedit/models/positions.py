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


@dataclass
class TargetBatch:
    """Prompts followed by target tokens, right-padded, for teacher forcing.

    ``logits[row, p]`` predicts token ``input_ids[row, p + 1]``; ``target_positions[row]`` lists the
    positions ``p`` whose next token is a target token, ``target_ids[row]`` those tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: list[int]
    target_positions: list[list[int]]
    target_ids: list[list[int]]
    subject_last: list[int | None]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def to(self, device) -> "TargetBatch":
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        return self

    def loss_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, labels) of shape (batch, seq): mask[r, p] = 1 where position p predicts a target token."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.float32)
        labels = torch.zeros(self.input_ids.shape, dtype=torch.long)
        for r, (ps, ts) in enumerate(zip(self.target_positions, self.target_ids)):
            mask[r, ps] = 1.0
            labels[r, ps] = torch.tensor(ts, dtype=torch.long)
        return mask.to(self.input_ids.device), labels.to(self.input_ids.device)


def pad_id(tokenizer) -> int:
    """The id padded positions carry: the tokenizer's pad token, else 0 (those positions are masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_prompt_target(tokenizer, prompts: list[str], targets: list[str], subjects: list[str] | None = None,
                         device=None, subject_spans: list[tuple[int, int]] | None = None) -> TargetBatch:
    """Tokenize ``prompt + " " + target`` and mark the target tokens.

    The target tokens are the tokens of the full text beyond the tokenized prompt; pre-tokenizers of
    byte-level BPE and sentencepiece both split at the space, so the prompt's tokens are a prefix of
    the full text's (checked). With ``subject_spans`` (char spans, e.g. from :func:`fill_template`) each
    prompt's last subject token is located there; with only ``subjects``, at the subject's first occurrence.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows, plens, tpos, tids, slast = [], [], [], [], []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        if not t or not t.strip():
            raise ValueError(f"empty target for prompt {p!r}")
        p_ids = tokenizer(p)["input_ids"]
        enc = tokenizer(p + " " + t.strip(), return_offsets_mapping=True)
        ids = enc["input_ids"]
        n = len(p_ids)
        if ids[:n] != p_ids or len(ids) <= n:
            raise ValueError(f"prompt {p!r} does not tokenize as a prefix of prompt + target {t!r}")
        # drop trailing special tokens (e.g. EOS appended by a post-processor)
        end = len(ids)
        while end > n and enc["offset_mapping"][end - 1][1] <= enc["offset_mapping"][end - 1][0]:
            end -= 1
        ids = ids[:end]
        rows.append(ids)
        plens.append(n)
        tpos.append(list(range(n - 1, len(ids) - 1)))
        tids.append(ids[n:])
        if subject_spans is not None or subjects is not None:
            a, b = subject_spans[i] if subject_spans is not None else locate_subject(p, subjects[i])
            idx = tokens_overlapping(enc["offset_mapping"][:n], a, b)
            if not idx:
                raise SubjectNotFoundError(f"no token of the subject {p[a:b]!r} in {p!r}")
            slast.append(idx[-1])
        else:
            slast.append(None)
    width = max(len(r) for r in rows)
    pad = pad_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attn[r, :len(ids)] = 1
    batch = TargetBatch(input_ids, attn, plens, tpos, tids, slast)
    return batch.to(device) if device is not None else batch
