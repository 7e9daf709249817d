"""One method protocol: registry capabilities, no branches on method names, and `edit --sequential`
running the same loop (Ledger.step) as the lifelong runner, for every method."""

import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from helpers import corpus_cov, saved_model_and_corpus, tiny_adapter
from superedit.utils.io import read_jsonl
from superedit.data import EditRequest
from superedit.editing.hparams import (AlphaEditHParams, D4SHParams, FTHParams, GatedHParams, GuardHParams, KeelHParams,
                                      MEMITHParams, ROMEHParams, UltraEditHParams)
from superedit.editing.methods import REGISTRY, get_method
from superedit.editing.methods.protocol import StepResult
from superedit.editing.run import run_edits
from superedit.lifelong.ledger import Ledger
from superedit.lifelong.runner import Probe, run_lifelong

SRC = Path(__file__).resolve().parents[1] / "src" / "superedit"
FAST = dict(v_num_grad_steps=4, n_prefixes=1, context_lengths=[3])
REQS = [EditRequest(prompt=p, subject=s, target_new=n, target_true=t, case_id=i)
        for i, (p, s, n, t) in enumerate([("{} was born in", "Anna Berg", "Paris", "Oslo"),
                                           ("{} is located in", "Eiffel Tower", "Oslo", "Paris"),
                                           ("{} plays the", "Toko Yasuda", "piano", "guitar"),
                                           ("{} is owned by", "Google Trends", "Apple", "Google")])]
HPARAMS = {
    "rome": ROMEHParams(layers=[1], **FAST),
    "memit": MEMITHParams(layers=[1, 2], mom2_update_weight=10.0, **FAST),
    "ft": FTHParams(layers=[1], num_steps=2, lr=1e-2),
    "d4s": D4SHParams(layers=[1, 2], mom2_update_weight=10.0, **FAST),
    "alphaedit": AlphaEditHParams(layers=[1, 2], L2=1.0, nullspace_threshold=0.1, nullspace_relative=True, **FAST),
    "ultraedit": UltraEditHParams(layers=[1, 2], lr=1e-3, positions="all"),
    "keel": KeelHParams(layers=[1, 2], L2=1.0, nullspace_threshold=0.1, nullspace_relative=True, **FAST),
    "guard": GuardHParams(layers=[1, 2], L2=1.0, nullspace_threshold=0.1, nullspace_relative=True, guard_directions=2,
                          guard_requests=str(Path(__file__).parent / "data" / "guard_requests.jsonl"), **FAST),
    "gated": GatedHParams(layers=[1], tau=0.6, **FAST),
}


def test_every_method_follows_the_protocol():
    assert set(HPARAMS) == set(REGISTRY)
    adapter = tiny_adapter("gpt2")
    stats = corpus_cov(adapter, [1, 2])
    for name, entry in REGISTRY.items():
        params = inspect.signature(entry.fn).parameters
        assert list(params)[:5] == ["adapter", "requests", "hparams", "stats", "state"], name
        assert params["state"].default is None
        assert entry.undo in ("any", "last") and entry.rank_one in ("per_request", "per_call", None)
        state = entry.make_state(adapter, HPARAMS[name], stats)
        assert (state is None) == (not entry.stateful), name
        if state is not None:
            for m in ("add", "remove", "state_dict", "load_state_dict", "total_delta"):
                assert callable(getattr(state, m)), (name, m)
        # undo of any edit needs a state that determines W − W₀ (or, for a forward-acting state, the model)
        if entry.undo == "any":
            assert state is not None and (state.total_delta(1) is not None or entry.forward is not None)
        assert (entry.forward is None) or (entry.stateful and callable(_forward_fn(entry))), name


def _forward_fn(entry):
    import importlib

    module, name = entry.forward.split(":")
    return getattr(importlib.import_module(module), name)


def test_no_branch_on_a_method_name_outside_the_registry():
    """Code reads registry capabilities; only editing/methods/__init__.py names methods."""
    names = "|".join(REGISTRY)
    pattern = re.compile(rf"""(==|!=)\s*["']({names})["']|\bin\s*\(\s*["']({names})["']\s*,|SUM_METHODS""")
    hits = []
    for path in SRC.rglob("*.py"):
        if path == SRC / "editing" / "methods" / "__init__.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_one_memit_layer_loop():
    """The MEMIT spread (resid targets, (z − cur)/(L − i)) exists once: in editing/methods/spread.py."""
    hits = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
            if re.search(r"len\(layers\)\s*-\s*i\)", p.read_text(encoding="utf-8"))]
    assert hits == ["editing/methods/spread.py"]


@pytest.fixture(scope="module")
def stats():
    return corpus_cov(tiny_adapter("gpt2"), [1, 2])


@pytest.fixture(scope="module")
def lifelong_run(stats, tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol") / "lifelong"
    run_lifelong(lambda: tiny_adapter("gpt2"), REQS, list(HPARAMS), HPARAMS, stats, edits=len(REQS), batch_size=2,
                 eval_every=100, out_dir=out, probe=Probe())
    return out


@pytest.mark.parametrize("method", list(HPARAMS))
def test_sequential_edit_equals_the_lifelong_runner(method, stats, lifelong_run, tmp_path):
    """`edit --sequential` (run_edits with a ledger) and `superedit lifelong` run the same loop: same weights,
    bit for bit; a stateful method's state carries every batch (the defect was a fresh state per batch)."""
    entry = get_method(method)
    a = tiny_adapter("gpt2")
    led = Ledger.create(tmp_path / "ledger", a, method, HPARAMS[method])
    records, summary = run_edits(a, REQS, method, HPARAMS[method], stats if entry.needs_stats else None,
                                 batch_size=2, sequential=True, ledger=led)
    assert summary["n_edited"] == len(REQS) and len(led.edits) == 2
    b = tiny_adapter("gpt2")
    ref = Ledger.open(lifelong_run / method / "ledger")
    ref.apply_to(b)
    for l in HPARAMS[method].layers:
        assert torch.equal(a.down_weight(l), b.down_weight(l)), l
        if entry.forward is None:
            assert float(ref.total_delta(l).norm()) > 0
    if entry.forward is not None:  # the edits are the state's: same entries, same outputs
        for k, v in ref.state.state_dict().items():
            assert torch.equal(led.state.state_dict()[k], v), k
        assert len(ref.state) == len(REQS)
        enc = a.tokenizer([r.prompt.format(r.subject) for r in REQS], return_tensors="pt", padding=True)
        with torch.no_grad():
            assert torch.equal(a.model(**enc).logits, b.model(**enc).logits)
    if entry.stateful and entry.forward is None:
        led.load_state(tiny_adapter("gpt2"), stats)
        counts = {k: v for k, v in led.state.state_dict().items() if k.endswith(".counts")}
        assert counts and all(int(v[0]) == len(REQS) for v in counts.values())  # every edit's terms/keys


def test_sequential_d4s_is_one_solve_over_all_edits(stats):
    """The defect: `edit --method d4s --sequential` ran each batch on a fresh state. Through the ledger the
    second batch's solve includes the first batch's terms: the total equals D4S over all four edits."""
    hp = HPARAMS["d4s"]
    a = tiny_adapter("gpt2")
    run_edits(a, REQS, "d4s", hp, stats, batch_size=2, sequential=True)
    b = tiny_adapter("gpt2")
    entry = get_method("d4s")
    state = entry.make_state(b, hp, stats)
    base = {l: b.down_weight(l).detach().clone() for l in hp.layers}
    for s in (0, 2):
        res = entry.fn(b, REQS[s:s + 2], hp, stats, state=state)
        assert isinstance(res, StepResult) and set(res.journal) == {f"layer.{l}.{n}" for l in hp.layers for n in "RK"}
        for l in hp.layers:  # the model carries W₀ + X, as a ledger keeps it
            b.set_down_weight(l, base[l].double() + state.total_delta(l))
    for l in hp.layers:
        assert torch.equal(a.down_weight(l), b.down_weight(l))
        assert state[l].n_terms == 4


def test_cli_edit_sequential_d4s_equals_lifelong(tmp_path, monkeypatch):
    """`superedit edit --sequential --method d4s` and `superedit lifelong --methods d4s` over the same stream
    (lifelong takes the same --layers/--hparams overrides) give the same ledger, bit for bit."""
    from typer.testing import CliRunner

    from superedit.cli import app
    from superedit.commands.lifelong import load_stream

    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path / "home"))
    mdir, corpus = saved_model_and_corpus(tmp_path)
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text("\n".join(json.dumps(r.to_dict()) for r in REQS[:3]) + "\n")
    hp = tmp_path / "hp.yaml"
    hp.write_text("v_num_grad_steps: 2\nn_prefixes: 1\ncontext_lengths: [3]\nmom2_ridge: 0.01\nmom2_n_tokens: 500\n"
                  "mom2_update_weight: 10.0\n")
    common = ["--model", str(mdir), "--layers", "1,2", "--corpus", str(corpus), "--hparams", str(hp), "--json"]
    cli = CliRunner()
    res = cli.invoke(app, ["lifelong", "--requests", str(reqs), "--methods", "d4s", "--edits", "3",
                           "--eval-every", "10", "--no-report", "--out", str(tmp_path / "ll"), *common])
    assert res.exit_code == 0, res.output
    # the lifelong stream order (seeded shuffle, subject rounds), written out for `edit`
    stream = load_stream(str(reqs), "auto", None, 0, tmp_path / "unused", False)
    ordered = tmp_path / "ordered.jsonl"
    ordered.write_text("\n".join(json.dumps(r.to_dict()) for r in stream) + "\n")
    res = cli.invoke(app, ["edit", "--requests", str(ordered), "--method", "d4s", "--sequential", "--gen-tokens", "0",
                           "--out", str(tmp_path / "ed"), *common])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["ledger"] == str(tmp_path / "ed" / "ledger")
    a, b = Ledger.open(tmp_path / "ed" / "ledger"), Ledger.open(tmp_path / "ll" / "d4s" / "ledger")
    assert [e["requests"] for e in a.edits] == [e["requests"] for e in b.edits] and len(a.edits) == 3
    for l in (1, 2):
        assert torch.equal(a.total_delta(l), b.total_delta(l))
        assert float(a.total_delta(l).norm()) > 0
    res = cli.invoke(app, ["lifelong", "--requests", str(reqs), "--methods", "d4s", "--hparams", str(hp),
                           "--hparams-dir", str(tmp_path), "--model", str(mdir), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "give one of them" in res.output


def test_cli_lifelong_probe_requests_leaves_out_what_the_stream_edits(tmp_path, monkeypatch):
    """`lifelong --probe-requests FILE`: the retention probe is FILE's true facts, less every (subject,
    relation) the stream edits; an unreadable FILE stops the run before anything is written."""
    from typer.testing import CliRunner

    from superedit.cli import app
    from superedit.commands.lifelong import load_stream

    monkeypatch.setenv("SUPEREDIT_HOME", str(tmp_path / "home"))
    mdir, corpus = saved_model_and_corpus(tmp_path)
    reqs = tmp_path / "reqs.jsonl"
    reqs.write_text("\n".join(json.dumps(r.to_dict()) for r in REQS) + "\n")
    extra = EditRequest(prompt="{} speaks", subject="Anna Berg", target_new="French", target_true="Norwegian",
                        case_id=9)  # the stream's subject, another relation: untouched
    probe_file = tmp_path / "probe.jsonl"
    probe_file.write_text("\n".join(json.dumps(r.to_dict()) for r in [*REQS, extra]) + "\n")
    hp = tmp_path / "hp.yaml"
    hp.write_text("num_steps: 1\n")
    common = ["--model", str(mdir), "--layers", "1", "--corpus", str(corpus), "--hparams", str(hp), "--methods",
              "ft", "--edits", "2", "--eval-every", "10", "--no-report", "--requests", str(reqs)]
    res = CliRunner().invoke(app, ["lifelong", *common, "--probe-requests", str(probe_file),
                                   "--out", str(tmp_path / "ll")])
    assert res.exit_code == 0, res.output
    stream = load_stream(str(reqs), "auto", None, 0, tmp_path / "unused", False)[:2]
    probe = json.loads((tmp_path / "ll" / "probe.json").read_text())
    expected = [r for r in [*REQS, extra] if all((r.subject, r.prompt) != (s.subject, s.prompt) for s in stream)]
    assert sorted(f["prompt"] for f in probe["facts"]) == sorted(r.filled_prompt() for r in expected)
    assert len(expected) == 3

    # --probe-n takes a seeded sample of the file, so shrinking it changes the probe: a resume refuses that
    res = CliRunner().invoke(app, ["lifelong", *common, "--probe-requests", str(probe_file), "--probe-n", "2",
                                   "--resume", "--out", str(tmp_path / "ll")])
    assert res.exit_code == 2 and "retention probe differs" in res.output
    res = CliRunner().invoke(app, ["lifelong", *common, "--probe-requests", str(probe_file), "--resume",
                                   "--out", str(tmp_path / "ll")])
    assert res.exit_code == 0, res.output

    # lengthening (--edits 3): without --requests the saved 2-edit stream is all there is, so it says what to
    # pass; with them, the third edit rewrites a fact of the probe this run started with: refused, unchanged
    longer = [a if a != "2" else "3" for a in common]
    no_reqs = longer[:longer.index("--requests")]
    res = CliRunner().invoke(app, ["lifelong", *no_reqs, "--probe-requests", str(probe_file), "--resume",
                                   "--out", str(tmp_path / "ll")])
    assert res.exit_code == 2 and "pass --requests" in res.output, res.output
    res = CliRunner().invoke(app, ["lifelong", *longer, "--probe-requests", str(probe_file), "--resume",
                                   "--out", str(tmp_path / "ll")])
    assert res.exit_code == 2 and "rewrite 1 of the retention probe's facts" in res.output, res.output
    assert len(read_jsonl(tmp_path / "ll" / "stream.jsonl")) == 2
    # a probe the third edit leaves alone: lengthened, with a checkpoint at 3
    only_extra = tmp_path / "extra.jsonl"
    only_extra.write_text(json.dumps(extra.to_dict()) + "\n")
    res = CliRunner().invoke(app, ["lifelong", *common, "--probe-requests", str(only_extra), "--out", str(tmp_path / "l2")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["lifelong", *longer, "--probe-requests", str(only_extra), "--resume",
                                   "--out", str(tmp_path / "l2")])
    assert res.exit_code == 0, res.output
    assert len(read_jsonl(tmp_path / "l2" / "stream.jsonl")) == 3
    assert [(r["n_edits"], r["final"]) for r in read_jsonl(tmp_path / "l2" / "metrics.jsonl")] == \
        [(0, False), (2, True), (2, False), (3, True)]

    res = CliRunner().invoke(app, ["lifelong", *common, "--probe-requests", str(tmp_path / "missing.json"),
                                   "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "missing.json" in res.output
    assert not (tmp_path / "bad").exists()
