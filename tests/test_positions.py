"""Subject token positions on byte-level BPE and sentencepiece-style tokenizers, padded or not."""

import pytest

from helpers import bpe_tokenizer, sp_tokenizer
from superedit.errors import SubjectNotFoundError, TemplateError
from superedit.models import encode_prompts, subject_token_span
from superedit.models.positions import fill_template

CASES = [
    ("{} was born in", "Anna Berg"),  # subject at start
    ("I think {} works as a", "Toko Yasuda"),  # middle
    ("The capital of France is {}", "Paris"),  # end
    ("words, words: {} words words", "words"),  # repeated words: the {} occurrence counts
    ("({}) is located in", "Eiffel Tower"),  # punctuation around it
    ("The mother tongue of {}'s mother is", "Danielle Darrieux"),  # possessive
    ("{}, the company", "Apple A5"),
]
TOKENIZERS = {"bpe": bpe_tokenizer, "sentencepiece": sp_tokenizer}


def _check_span(tok, ids, prompt, subject, start_char, first, last):
    decoded = tok.decode(ids[first:last + 1])
    assert subject in decoded.replace("▁", " "), (decoded, subject)
    # minimal: dropping the first or last token loses part of the subject
    assert subject not in tok.decode(ids[first + 1:last + 1]).replace("▁", " ")
    assert subject not in tok.decode(ids[first:last]).replace("▁", " ")


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("template,subject", CASES)
def test_unpadded_positions(tok_name, template, subject):
    tok = TOKENIZERS[tok_name]()
    first, last = subject_token_span(tok, template, subject)
    prompt, a, _ = fill_template(template, subject)
    ids = tok(prompt)["input_ids"]
    _check_span(tok, ids, prompt, subject, a, first, last)
    if template.startswith("{}") and tok_name == "sentencepiece":
        assert first == 1  # after BOS, which has an empty offset span and never matches
    if template.startswith("{}") and tok_name == "bpe":
        assert first == 0


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_positions_match_unpadded(tok_name, side):
    tok = TOKENIZERS[tok_name]()
    templates, subjects = zip(*CASES)
    b = encode_prompts(tok, list(templates), list(subjects), padding_side=side)
    assert tok.padding_side == TOKENIZERS[tok_name]().padding_side  # restored
    width = b.input_ids.shape[1]
    for row, (t, s) in enumerate(CASES):
        first, last = subject_token_span(tok, t, s)
        n = int(b.attention_mask[row].sum())
        shift = width - n if side == "left" else 0
        assert (b.subject_first[row], b.subject_last[row]) == (first + shift, last + shift)
        assert b.last_token[row] == (width - 1 if side == "left" else n - 1)


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_leading_space_subject_in_filled_prompt(tok_name):
    tok = TOKENIZERS[tok_name]()
    b = encode_prompts(tok, ["Facts: Anna Berg plays"], ["Anna Berg"], filled=True)
    ids = b.input_ids[0].tolist()
    _check_span(tok, ids, b.prompts[0], "Anna Berg", 7, b.subject_first[0], b.subject_last[0])


def test_bad_templates_and_subjects():
    tok = bpe_tokenizer()
    with pytest.raises(TemplateError, match="exactly one"):
        subject_token_span(tok, "no placeholder here", "Paris")
    with pytest.raises(TemplateError, match="exactly one"):
        subject_token_span(tok, "{} and {}", "Paris")
    with pytest.raises(TemplateError, match="empty subject"):
        subject_token_span(tok, "{} is", "  ")
    with pytest.raises(SubjectNotFoundError, match="does not occur"):
        encode_prompts(tok, ["The Eiffel Tower is in"], ["Paris"], filled=True)


def test_prefixed_prompt_uses_the_template_span_not_the_first_occurrence():
    from superedit.models import encode_prompt_target

    tok = bpe_tokenizer()
    prompt, a, b = fill_template("Anna Berg said hi. {} was born in", "Anna Berg")
    by_span = encode_prompt_target(tok, [prompt], ["Oslo"], subject_spans=[(a, b)])
    by_search = encode_prompt_target(tok, [prompt], ["Oslo"], subjects=["Anna Berg"])
    first, last = subject_token_span(tok, "Anna Berg said hi. {} was born in", "Anna Berg")
    assert by_span.subject_last[0] == last
    assert by_search.subject_last[0] < first  # the search finds the earlier mention
