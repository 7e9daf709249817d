"""``superedit ledger show|verify|undo|export``: inspect and manage an edit ledger (see superedit.lifelong.ledger).

* ``show``   — method, layers, generation, the edits (status, requests) and the norms of the total delta;
* ``verify`` — check every file of the ledger against the SHA-256 recorded when it was committed (and that
  its tensors are finite); lists each damaged file; exit 2 when any is damaged or missing;
* ``undo``   — undo edit ``--index`` (default: the last applied one). Ledgers of methods whose state is
  a sum over edits (D4S) undo any edit exactly; the others only the last applied one (the ledger says
  so otherwise). Methods with a running state (D4S, AlphaEdit) need the base model (``--model``,
  default: the model the ledger was made on) to rebuild it, and its key covariance (``--corpus``,
  default: the testbed's own; computed only if the state needs it);
* ``export`` — ``--mode deltas``: the total W − W₀ as a saved delta (``superedit eval --delta`` reads it);
  ``--mode model``: the edited model as an HF directory (needs the base model).
"""

from __future__ import annotations

import typer

from .common import DeviceMapOpt, DeviceOpt, DtypeOpt, JsonOpt, command, emit

LedgerOpt = typer.Option(..., "--ledger", "-l", help="Ledger directory (holds ledger.json).")
ModelOpt = typer.Option(None, "--model", "-m", help="Base model (default: the model the ledger was created on).")


def _summary(led) -> dict:
    import torch

    edits = []
    for e in led.edits:
        reqs = [f"{r.get('prompt', '').replace('{}', r.get('subject', ''))} → {r.get('target_new')}" for r in e["requests"]]
        edits.append({"index": e["index"], "status": e["status"], "timestamp": e.get("timestamp"),
                      "n_requests": len(e["requests"]), "requests": reqs})
    norms = {}
    for l in led.layers:
        t = led.tensors.get(f"layer.{l}.delta")
        if t is not None and t.numel():
            t = t.to(torch.float64)
            norms[str(l)] = {"fro": float(t.norm()), "l1_mean": float(t.abs().mean()), "max_abs": float(t.abs().max())}
    return {"ledger": str(led.dir), "method": led.method, "layers": led.layers, "generation": led.generation,
            "model": led.info.get("model", {}).get("source"), "n_edits": len(led.edits), "active": led.active(),
            "undone": [e["index"] for e in led.edits if e["status"] == "undone"], "delta_norms": norms,
            "edits": edits}


def _load_base(led, model: str | None, device: str | None, dtype: str | None = None, device_map: str | None = None):
    from ..models import load_model

    return load_model(model or led.info["model"]["source"], device=device, dtype=dtype, device_map=device_map)


def register(app) -> None:
    sub = typer.Typer(help="Inspect and manage an edit ledger: show, verify, undo, export.", no_args_is_help=True)

    @sub.command("show")
    @command
    def show(ledger: str = LedgerOpt, as_json: bool = JsonOpt):
        """The ledger's method, layers, generation, edits and the norms of its total delta."""
        from ..lifelong.ledger import Ledger

        res = _summary(Ledger.open(ledger))
        if not as_json:
            lines = [f"{res['ledger']}: {res['method']} at layers {res['layers']}, generation {res['generation']}, "
                     f"{len(res['active'])} applied / {len(res['undone'])} undone edit(s)"]
            for e in res["edits"]:
                lines.append(f"  #{e['index']:<4d} {e['status']:8s} {'; '.join(e['requests'])[:100]}")
            for l, n in res["delta_norms"].items():
                lines.append(f"  layer {l}: ‖ΔW‖_F = {n['fro']:.4g}, mean |ΔW| = {n['l1_mean']:.4g}")
            typer.echo("\n".join(lines), err=True)
            res = {k: res[k] for k in ("ledger", "method", "layers", "generation", "n_edits", "active", "undone")}
        emit(res, as_json)

    @sub.command("verify")
    @command
    def verify(ledger: str = LedgerOpt, as_json: bool = JsonOpt):
        """Check every file of the ledger (content hashes, finite tensors); exit 2 if any is damaged."""
        from ..lifelong.ledger import verify_ledger

        res = verify_ledger(ledger)
        if not as_json:
            lines = [f"{res['ledger']}: {'OK' if res['ok'] else 'DAMAGED'} — {res['n_files']} file(s) checked, "
                     f"{len(res['damaged'])} damaged, {len(res['unverified'])} without a recorded hash"]
            lines += [f"  damaged: {d['problem']}" for d in res["damaged"]]  # the problem names the file
            lines += [f"  not verified (no hash recorded): {f}" for f in res["unverified"]]
            lines += [f"  note: {n}" for n in res["notes"]]
            typer.echo("\n".join(lines), err=True)
        else:
            emit(res, as_json)
        if not res["ok"]:
            raise typer.Exit(code=2)

    @sub.command("undo")
    @command
    def undo(ledger: str = LedgerOpt,
             index: int = typer.Option(None, "--index", "-i", help="Edit to undo (default: the last applied one)."),
             model: str = ModelOpt,
             corpus: str = typer.Option(None, "--corpus", help="Corpus of the key covariance (D4S; default: the "
                                        "ledger's hparams mom2_corpus, else the testbed's own)."),
             device: str = DeviceOpt,
             dtype: str = DtypeOpt,
             device_map: str = DeviceMapOpt,
             as_json: bool = JsonOpt):
        """Undo one edit and commit (D4S: any edit, exactly; other methods: only the last applied one)."""
        from ..lifelong.ledger import Ledger

        with Ledger.open(ledger, lock=True) as led:  # refused here when another process writes to it
            if led.entry.stateful:
                adapter = _load_base(led, model, device, dtype, device_map)
                stats = None
                if led.entry.needs_stats:  # lazy: computed (or read from the cache) on first use only
                    from ..editing.covariance import CorpusCovariance

                    hp = led.hparams()
                    stats = CorpusCovariance(adapter, corpus or hp.mom2_corpus or None, n_tokens=hp.mom2_n_tokens,
                                             max_length=hp.mom2_max_length, layers=led.layers)
                led.load_state(adapter, stats)
            target = index if index is not None else (led.active()[-1] if led.active() else None)
            led.undo(index)
        res = _summary(led)
        emit({"undone": target, "ledger": res["ledger"], "method": res["method"], "generation": res["generation"],
              "active": res["active"], "delta_norms": res["delta_norms"]}, as_json)

    @sub.command("export")
    @command
    def export(ledger: str = LedgerOpt,
               out: str = typer.Option(..., "--out", "-o", help="Output directory."),
               mode: str = typer.Option("deltas", "--mode", help="deltas: the total W − W₀ as a saved delta; "
                                        "model: the edited model as an HF directory (needs the base model)."),
               model: str = ModelOpt,
               device: str = DeviceOpt,
               dtype: str = DtypeOpt,
               device_map: str = DeviceMapOpt,
               as_json: bool = JsonOpt):
        """Export the ledger's total delta, or the edited model."""
        from ..errors import LedgerError
        from ..lifelong.ledger import Ledger

        led = Ledger.open(ledger)
        if mode not in ("deltas", "model"):
            raise LedgerError(f"--mode must be 'deltas' or 'model' (got {mode!r})")
        adapter = None
        if mode == "model" or not led.tensors:
            adapter = _load_base(led, model, device, dtype, device_map)
            if mode == "deltas":
                led.base_weights(adapter)  # no edit committed yet: the shapes come from the base model
        path = led.export(out, mode=mode, adapter=adapter)
        emit({"exported": str(path), "mode": mode, "ledger": str(led.dir), "method": led.method,
              "n_active_edits": len(led.active()), "generation": led.generation}, as_json)

    app.add_typer(sub, name="ledger")
