"""Test helpers: locally trained tokenizers of both styles and tiny random models of every family."""

from __future__ import annotations

import functools

import torch

CORPUS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "Danielle Darrieux's mother tongue is French, and she lived in Paris.",
    "Anna Berg was born in Oslo. Anna Berg works as a pianist in Bergen!",
    "Toko Yasuda plays the guitar; Toko Yasuda is from Japan.",
    "The the the repeated words, words, words: punctuation (and brackets) matter.",
    "Apple A5 was created by Apple. Google Trends is owned by Google.",
] * 20

FAMILY_CONFIGS = {
    "gpt2": dict(n_layer=4, n_embd=32, n_head=2, n_positions=128),
    "gptj": dict(n_layer=4, n_embd=32, n_head=2, n_positions=128, rotary_dim=8),
    "gpt_neox": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=96,
                     max_position_embeddings=128),
    "llama": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=80, max_position_embeddings=128),
    "mistral": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=72, max_position_embeddings=128),
    "gemma3_text": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=64, head_dim=16, max_position_embeddings=128, sliding_window=16),
    "qwen2": dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=128),
}
FAMILIES = sorted(FAMILY_CONFIGS)


@functools.lru_cache(maxsize=None)
def bpe_tokenizer():
    """GPT-2 style byte-level BPE (leading spaces belong to the next token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


@functools.lru_cache(maxsize=None)
def sp_tokenizer():
    """Sentencepiece-style tokenizer (Metaspace '▁', BOS prepended), as Llama's fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def tokenizer_for(family: str):
    return bpe_tokenizer() if family in ("gpt2", "gptj", "gpt_neox") else sp_tokenizer()


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizer_for(family)
    cfg = AutoConfig.for_model(family, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                               **FAMILY_CONFIGS[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def tiny_adapter(family: str, seed: int = 0):
    from superedit.models import ModelAdapter

    model, tok = tiny_model(family, seed)
    return ModelAdapter(model=model, tokenizer=tok, source=f"tiny-{family}-{seed}", revision="test")


def corpus_cov(adapter, layers, n_docs: int = 12, ridge: float = 1e-3):
    """FixedCovariance of E[k kᵀ] over the test corpus' tokens (read through the hook primitive), plus a ridge."""
    from superedit.editing.covariance import FixedCovariance
    from superedit.models import Trace

    enc = adapter.tokenizer(CORPUS[:n_docs], return_tensors="pt", padding=True)
    with Trace(adapter, reads=[("key", l) for l in layers]) as tr:
        adapter.model(**enc)
    mask = enc["attention_mask"].bool()
    out = {}
    for l in layers:
        K = tr["key", l][mask].to(torch.float64)
        out[l] = K.T @ K / K.shape[0] + ridge * torch.eye(K.shape[1], dtype=torch.float64)
    return FixedCovariance(out)


def shared_data_dir():
    """The real dataset samples: $SUPEREDIT_SHARED_DATA, else ../shared/data beside the repository."""
    import os
    from pathlib import Path

    env = os.environ.get("SUPEREDIT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


SHARED_DATA = shared_data_dir()


def saved_tiny_model(directory, family: str = "gpt2", seed: int = 0):
    """A tiny random model of ``family`` saved as an HF directory (model + tokenizer); returns the path."""
    from pathlib import Path

    a = tiny_adapter(family, seed)
    directory = Path(directory)
    a.model.save_pretrained(directory)
    a.tokenizer.save_pretrained(directory)
    return directory


def saved_model_and_corpus(root, n_texts: int = 6):
    """For CLI tests: the tiny GPT-2 saved in ``root/model`` and ``n_texts`` lines of :data:`CORPUS` in
    ``root/corpus.txt``; returns both paths."""
    from pathlib import Path

    root = Path(root)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(CORPUS[:n_texts]) + "\n")
    return saved_tiny_model(root / "model"), corpus


def strip_timings(rec: dict) -> dict:
    """A lifelong checkpoint record without its wall-clock fields (they differ between equal runs)."""
    from superedit.lifelong.runner import TIMING_FIELDS

    return {k: v for k, v in rec.items() if k not in TIMING_FIELDS}


def assert_close_tree(a, b, path: str = "") -> None:
    """Nested dicts/lists equal, floats to 1e-4 relative (resumed runs repeat float work in another order)."""
    import pytest

    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7), path
    else:
        assert a == b, path
