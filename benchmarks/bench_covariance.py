"""Benchmark: one-pass early-exit key covariance vs ROME's per-layer collection and full passes.

A randomly initialised 12-layer GPT-2-shaped model (GPT-2 vocabulary size 50257, width --n-embd) and
a synthetic corpus; C = E[k kᵀ] for --layers (default 2-6) is collected

* by ``collect_covariances`` (all layers in one forward pass per batch that stops after the deepest
  requested layer), and
* as ROME's ``layer_stats`` does it: one pass per layer, each stopping after that layer
  (``collect_covariances`` called once per layer), and
* by ``collect_covariances_per_layer_full_pass`` (one full forward pass, LM head included, per layer),

in the same run, with no cache. Prints tokens/s of each, the speed ratio against ROME's per-layer
collection (target ≥ 3×) and against full passes, and the largest difference between the results.

    python benchmarks/bench_covariance.py [--tokens 4096] [--n-embd 256] [--layers 2-6] [--json out.json]

``--model pretrained:smollm2-135m`` (or any ``--model`` superedit loads) times a real model instead, on the
same synthetic text; ``--rounds N`` interleaves the one-pass and per-layer collections N times and
reports each one's median (timings on a shared machine drift; interleaving keeps the ratio fair);
``--skip-full`` leaves out the full-pass baseline (slow on a real model).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time

TARGET = 3.0


def synthetic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = ["Paris", "Oslo", "the river", "Anna Berg", "Toko Yasuda", "a pianist", "the tower", "Google",
                "the committee", "Mount Fuji", "the old library", "a small village", "the orchestra"]
    verbs = ["is located in", "was founded by", "plays", "speaks", "is owned by", "works with", "overlooks",
             "was named after", "belongs to", "is famous for"]
    objects = ["France", "Norway", "the guitar", "French", "Apple", "a bakery", "the harbour", "the north",
               "a famous painter", "its gardens", "the valley", "the king", "three bridges"]
    docs = []
    for _ in range(n_docs):
        sents = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}" for _ in range(rng.randint(4, 14))]
        docs.append(". ".join(s[0].upper() + s[1:] for s in sents) + ".")
    return docs


def build(n_embd: int, n_layer: int, n_head: int, corpus: list[str], seed: int = 0):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from superedit.models import ModelAdapter

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        bos_token="<|endoftext|>")
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ModelAdapter(model=model, tokenizer=tokenizer, source=f"bench-gpt2-{n_layer}x{n_embd}", revision="bench")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--layers", default="2-6")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--model", default=None, help="a model superedit loads (default: the random GPT-2-shaped one)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of one pass vs per layer (median)")
    ap.add_argument("--skip-full", action="store_true", help="skip the full-pass-per-layer baseline")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    args = ap.parse_args(argv)

    os.environ.setdefault("SUPEREDIT_NO_PROGRESS", "1")
    import torch

    from superedit.commands.common import parse_layers
    from superedit.stats import Corpus, collect_covariances, collect_covariances_per_layer_full_pass
    from superedit.utils.io import write_json_atomic

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = synthetic_corpus(max(64, args.tokens // 40))
    if args.model:
        from superedit.models import load_model

        adapter = load_model(args.model)
        model_desc = {"model": args.model, "family": adapter.family, "n_layer": adapter.n_layers,
                      "d_mlp": adapter.d_mlp}
    else:
        adapter = build(args.n_embd, args.n_layer, args.n_head, texts)
        model_desc = {"family": "gpt2", "n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                      "vocab_size": 50257, "d_mlp": adapter.d_mlp}
    layers = parse_layers(args.layers, adapter.n_layers)
    corpus = Corpus(texts, source="synthetic")
    kw = dict(max_length=args.max_length, batch_tokens=args.batch_tokens)

    collect_covariances(adapter, layers, corpus, min(512, args.tokens), use_cache=False, **kw)  # warm-up

    fast_times, rome_times = [], []
    for _ in range(max(1, args.rounds)):
        t0 = time.perf_counter()
        fast = collect_covariances(adapter, layers, corpus, args.tokens, use_cache=False, **kw)
        fast_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rome = {l: collect_covariances(adapter, [l], corpus, args.tokens, use_cache=False, **kw)[l] for l in layers}
        rome_times.append(time.perf_counter() - t0)
    t_fast, t_rome = statistics.median(fast_times), statistics.median(rome_times)
    slow, t_slow = None, float("nan")
    if not args.skip_full:
        t0 = time.perf_counter()
        slow = collect_covariances_per_layer_full_pass(adapter, layers, corpus, args.tokens, **kw)
        t_slow = time.perf_counter() - t0

    count = fast[layers[0]].count
    max_diff = max(float((fast[l].mom2 - ref[l].mom2).abs().max()) for ref in (slow, rome) if ref for l in layers)
    ratio = t_rome / t_fast
    result = {
        "benchmark": "bench_covariance",
        "model": model_desc, "rounds": len(fast_times), "one_pass_s_rounds": fast_times,
        "rome_per_layer_s_rounds": rome_times,
        "layers": layers, "tokens": count, "max_length": args.max_length, "batch_tokens": args.batch_tokens,
        "one_pass_s": t_fast, "rome_per_layer_s": t_rome, "per_layer_s": None if slow is None else t_slow,
        "one_pass_tokens_per_s": count / t_fast,  # tokens of statistics for all layers per second
        "rome_per_layer_tokens_per_s": count / t_rome,
        "per_layer_tokens_per_s": None if slow is None else count / t_slow,
        "speedup": ratio, "speedup_vs_full_passes": None if slow is None else t_slow / t_fast, "target": TARGET, "meets_target": ratio >= TARGET, "max_abs_diff": max_diff,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
    }
    print(f"model: {model_desc}; layers {layers}; {count} tokens; {torch.get_num_threads()} torch threads; "
          f"median of {len(fast_times)} interleaved round(s)")
    print(f"one pass, early exit : {t_fast:8.2f} s  {count / t_fast:10.1f} tokens/s")
    print(f"ROME: pass per layer : {t_rome:8.2f} s  {count / t_rome:10.1f} tokens/s")
    if slow is not None:
        print(f"full pass per layer  : {t_slow:8.2f} s  {count / t_slow:10.1f} tokens/s")
    print(f"vs ROME per layer    : {ratio:8.2f}x  (target ≥ {TARGET:.0f}x: {'met' if ratio >= TARGET else 'NOT met'})")
    if slow is not None:
        print(f"vs full passes       : {t_slow / t_fast:8.2f}x")
    print(f"max |C_fast - C_ref| : {max_diff:.3e}")
    if args.json_path:
        write_json_atomic(args.json_path, result)
        print(f"wrote {args.json_path}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
