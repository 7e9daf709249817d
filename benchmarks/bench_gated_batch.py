"""Time one `gated` batch on top of a lifelong run's ledger, without committing it.

Loads the run's model and ledger (every edit applied), then runs the method's step on the next
requests of the run's saved stream, the way ``superedit lifelong`` would, and reports the seconds
and the journal. With ``--compare`` it checks the journal against a saved edit file (e.g. the same
batch made by another version of the code), tensor by tensor. This is how lifelong.md's "204 s →
59 s" for the question gate was measured (old code: the same command with ``PYTHONPATH`` pointing at
a worktree of commit af5306b)::

    python benchmarks/bench_gated_batch.py --run runs/tb10k/reedit-1000-gated-question \\
        --stream runs/tb10k/reedit-10k-gated-question/stream.jsonl --start 1000 --n 100 --threads 1 \\
        --compare runs/tb10k/reedit-10k-gated-question/gated/ledger/edits/00010.safetensors

The ledger is opened read-only in effect: the step's result is never recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a `superedit lifelong` output folder with a gated ledger")
    ap.add_argument("--stream", help="stream.jsonl to draw the batch from (default: the run's own)")
    ap.add_argument("--start", type=int, required=True, help="first request of the batch in the stream; must "
                    "equal the number of edits in the ledger")
    ap.add_argument("--n", type=int, default=100, help="requests in the batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compare", help="an edit file (safetensors) holding the same batch's journal")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from superedit.data import EditRequest
    from superedit.editing.methods.gated import gated_step
    from superedit.lifelong.ledger import Ledger
    from superedit.models.loading import load_model

    run = Path(args.run)
    command = json.loads((run / "command.json").read_text()) if (run / "command.json").exists() else {}
    model = (command.get("params") or {}).get("model") or "builtin"
    led = Ledger.open(run / "gated" / "ledger")
    done = sum(len(e["requests"]) for e in led.edits)
    if done != args.start:
        raise SystemExit(f"--start {args.start}: the ledger holds {done} edits; the batch must follow them")
    stream_file = Path(args.stream) if args.stream else run / "stream.jsonl"
    stream = [EditRequest.from_dict(json.loads(line)) for line in stream_file.read_text().splitlines() if line]
    batch = stream[args.start:args.start + args.n]
    if len(batch) < args.n:
        raise SystemExit(f"{stream_file} has only {len(stream)} requests")
    adapter = load_model(model)
    led.apply_to(adapter)
    led.load_state(adapter, None)  # the state carries its whitening factors: no covariance needed
    t0 = time.perf_counter()
    result = gated_step(adapter, batch, led.hparams(), None, state=led.state)
    seconds = time.perf_counter() - t0
    out = {"model": model, "entries_before": done, "batch": len(batch), "threads": args.threads,
           "seconds": round(seconds, 2), "timings": result.meta.get("timings")}
    if args.compare:
        saved = load_file(args.compare)
        out["max_abs_difference"] = {k: float((result.journal[k].float() - saved[k].float()).abs().max())
                                     for k in saved if k in result.journal}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
