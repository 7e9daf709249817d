"""Sample (or extend) a model's own-text corpus to N documents and print where it is cached.

The offline default corpus is ``SamplingSettings()`` (256 documents × 128 new tokens, about 32k corpus
tokens); every batch of 64 documents is sampled under its own seed (``seed + batch``), so a larger
``--docs`` keeps the default corpus as its first documents and adds new ones. Resumable: an
interrupted run continues at its first missing batch.

    python benchmarks/real_model/sample_corpus.py --docs 1024            # about 130k tokens
    superedit stats --model pretrained:smollm2-135m --corpus PRINTED_PATH --text-field text ...
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pretrained:smollm2-135m")
    ap.add_argument("--docs", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from superedit.models import load_model
    from superedit.stats.sampled import SamplingSettings, _cache_file, sampled_corpus

    adapter = load_model(args.model)
    settings = SamplingSettings(n_docs=args.docs)
    corpus = sampled_corpus(adapter, settings)
    print(f"{args.docs} documents, fingerprint {corpus.fingerprint()}: {_cache_file(adapter, settings)}")


if __name__ == "__main__":
    main()
