"""Issue #15 item 5 on a real GPU: a random Llama at Llama-3-8B's widths (d_model 4,096, d_mlp 14,336,
32 heads / 8 KV heads) but few layers, built locally (no hub access), with the shipped testbed's
tokenizer. Stages (``benchmarks/gpu/big_model.sh`` runs them all):

  build   write the model directory (bfloat16 weights), a requests file and a corpus file into OUT
  place   the placement paths through the Python API, in bfloat16:
            * single device: load_model(device_map="auto") → ROME, MEMIT and AlphaEdit edits;
            * mixed placement: blocks alternately on the accelerator and on the CPU (accelerate's
              dispatch_model with main_device="cpu": nothing offloaded, every block runs where its
              weights are — what several GPUs look like), the same edits; each layer's factors are
              checked finite and non-zero, and its device/dtype recorded next to the weight's
              (accelerate prints "Some parameters are on the meta device…" for main_device="cpu";
              nothing is offloaded: every edited layer's device is checked by ``layer_device``);
            * --dtype float32 on both placements: the MEMIT deltas agree (rtol 1e-3).
          Writes OUT/place.json.

``--small`` builds a tiny Llama (d_model 64, d_mlp 224) so every stage runs on a CPU in seconds:
``python benchmarks/gpu/big_model_check.py all --device cpu --small --out /tmp/bm``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

F64 = torch.float64


def build(out: Path, small: bool, n_layers: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from superedit.testbed.access import default_edit_requests
    from superedit.testbed.registry import resolve_builtin

    tb = resolve_builtin("builtin")
    tok = AutoTokenizer.from_pretrained(tb)
    width = dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2) if small else \
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=n_layers, max_position_embeddings=512,
                      rope_theta=500000.0, tie_word_embeddings=False, **width,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    mdir = out / "llama-8b-widths"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    reqs = list(default_edit_requests(tb, 4, 0))
    (out / "requests.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs), encoding="utf-8")
    texts = [r.filled_prompt() + " " + r.target_true for r in reqs] * 50
    (out / "corpus.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(f"built {mdir} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params, {n_layers} layers)")
    return mdir


def _mixed_map(n_layers: int, accel: str) -> dict:
    accel = "cuda:0" if accel == "cuda" else accel
    m = {"model.embed_tokens": accel, "model.rotary_emb": accel, "model.norm": accel, "lm_head": accel}
    m.update({f"model.layers.{i}": (accel if i % 2 == 0 else "cpu") for i in range(n_layers)})
    return m


def _edits(adapter, out_name: str, record: dict, layers: list[int], methods=("rome", "memit", "alphaedit")) -> dict:
    from superedit.data import load_requests
    from superedit.editing.covariance import CorpusCovariance
    from superedit.editing.hparams import AlphaEditHParams, MEMITHParams, ROMEHParams
    from superedit.editing.methods import get_method

    reqs = load_requests(str(record["requests"]))[:2]
    fast = dict(v_num_grad_steps=5, n_prefixes=2, context_lengths=[5])
    stats = CorpusCovariance(adapter, str(record["corpus"]), n_tokens=1000, max_length=64, layers=layers,
                             cache_dir=str(record["out"] / "stats" / out_name))
    runs = {"rome": ROMEHParams(layers=[layers[0]], **fast),
            "memit": MEMITHParams(layers=layers, **fast),
            "alphaedit": AlphaEditHParams(layers=layers, nullspace_threshold=1e-2, nullspace_relative=True, **fast)}
    res = {}
    for name, hp in runs.items():
        if name not in methods:
            continue
        t0 = time.perf_counter()
        step = get_method(name).fn(adapter, reqs if name != "rome" else reqs[:1], hp, stats)
        per_layer = {}
        for l, d in step.delta.layers.items():
            dense = d.dense()
            per_layer[l] = {"device": str(dense.device), "weight_device": str(adapter.layer_device(l)),
                            "dtype": str(dense.dtype), "weight_dtype": str(adapter.layer_dtype(l)),
                            "finite": bool(torch.isfinite(dense).all()), "norm": float(dense.double().norm())}
            assert per_layer[l]["finite"], f"{name} layer {l}: non-finite delta"
            assert float(dense.double().norm()) > 0, f"{name} layer {l}: empty delta"
        res[name] = {"seconds": round(time.perf_counter() - t0, 2), "layers": per_layer,
                     "delta": {l: d.dense(F64).cpu() for l, d in step.delta.layers.items()}}
        print(f"  {out_name} {name}: {res[name]['seconds']} s, layers {per_layer}", flush=True)
    return res


def place(out: Path, mdir: Path, device: str, n_layers: int) -> dict:
    from accelerate import dispatch_model

    from superedit.models import load_model

    layers = [1, 2] if n_layers > 2 else [0, 1]
    record = {"requests": out / "requests.jsonl", "corpus": out / "corpus.txt", "out": out}
    report: dict = {"device": device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}
    results = {}
    for dtype in ("bfloat16", "float32"):
        single = load_model(str(mdir), dtype=dtype, device_map="auto" if device.startswith("cuda") else {"": device})
        methods = ("rome", "memit", "alphaedit") if dtype == "bfloat16" else ("memit", "alphaedit")
        results[("single", dtype)] = _edits(single, f"single-{dtype}", record, layers, methods)
        del single
        mixed = load_model(str(mdir), dtype=dtype)  # on the CPU, then dispatched without offload
        dispatch_model(mixed.model, device_map=_mixed_map(n_layers, device), main_device="cpu", force_hooks=True)
        devs = {l: str(mixed.layer_device(l)) for l in range(n_layers)}
        print(f"  mixed placement ({dtype}): {devs}", flush=True)
        results[("mixed", dtype)] = _edits(mixed, f"mixed-{dtype}", record, layers, methods)
        report[f"mixed_layer_devices_{dtype}"] = devs
        del mixed
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    agree = {}
    for name in ("memit", "alphaedit"):
        a, b = results[("single", "float32")][name]["delta"], results[("mixed", "float32")][name]["delta"]
        agree[name] = {l: float((a[l] - b[l]).norm() / a[l].norm()) for l in a}
    report["float32_single_vs_mixed_rel_diff"] = agree
    report["runs"] = {f"{p}-{dt}": {m: {k: v for k, v in r.items() if k != "delta"} for m, r in runs.items()}
                      for (p, dt), runs in results.items()}
    bad = {m: d for m, d in agree.items() if any(v > 1e-3 for v in d.values())}
    report["ok"] = not bad
    (out / "place.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    print(f"  single vs mixed placement (float32): {agree}", flush=True)
    if bad:
        print(f"FAIL: placements disagree: {bad}", file=sys.stderr)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["build", "place", "all"])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="a tiny Llama (CPU check)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the random model")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    mdir = out / "llama-8b-widths"
    if a.stage in ("build", "all"):
        mdir = build(out, a.small, a.layers)
    if a.stage in ("place", "all"):
        if not (mdir / "config.json").exists():
            raise SystemExit(f"{mdir} does not exist: run the 'build' stage first")
        report = place(out, mdir, a.device, a.layers)
        return 0 if report["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
