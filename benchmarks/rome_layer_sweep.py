"""Single-edit ROME sweep over layers (and value settings) on a model's default edit requests.

Each request is edited on the unedited weights and scored with the CounterFact metrics; prints the
mean efficacy / paraphrase / neighbourhood score and the final v* NLL per layer. This is how the
layer and value settings in ``configs/hparams/rome/testbed-small.yaml`` were chosen.

    python benchmarks/rome_layer_sweep.py --layers 0,1,2 --n 12                       # ROME's GPT-2 XL value settings
    python benchmarks/rome_layer_sweep.py --layers 0,1 --n 12 clamp_norm_factor=10 v_num_grad_steps=30 v_lr=1.0
"""

from __future__ import annotations

import argparse
import statistics as st
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--layers", default="0,1,2")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="ROMEHParams field=value pairs (on top of the dataclass defaults)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from superedit.commands.common import local_model_dir, resolve_requests
    from superedit.editing.covariance import CorpusCovariance
    from superedit.editing.hparams import ROMEHParams
    from superedit.editing.methods import get_method
    from superedit.eval.metrics import evaluate_request
    from superedit.models import load_model

    layers = [int(x) for x in args.layers.split(",")]
    extra = dict(o.split("=", 1) for o in args.overrides)
    defaults = ROMEHParams()
    kwargs = {k: type(getattr(defaults, k))(v) for k, v in extra.items()}
    adapter = load_model(args.model)
    reqs = resolve_requests(local_model_dir(args.model), None, n=args.n, seed=args.seed)
    stats = CorpusCovariance(adapter, None, n_tokens=defaults.mom2_n_tokens, layers=layers)
    pres = [evaluate_request(adapter, r) for r in reqs]
    rome = get_method("rome").fn
    for layer in layers:
        hp = ROMEHParams(layers=[layer], **kwargs)
        eff, para, nb, nll = [], [], [], []
        t0 = time.time()
        for r, pre in zip(reqs, pres):
            delta = rome(adapter, [r], hp, stats).delta
            with delta.applied(adapter):
                post = evaluate_request(adapter, r, pre=pre)
            eff.append(post["efficacy_score"])
            para.append(post.get("paraphrase_score", float("nan")))
            nb.append(post.get("neighborhood_score", float("nan")))
            nll.append(delta.meta["requests"][0]["v_nll_end"])
        print(f"layer {layer}: efficacy {st.mean(eff):.2f} paraphrase {st.mean(para):.2f} "
              f"neighbourhood {st.mean(nb):.2f} v_nll_end {st.mean(nll):.2f} ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
