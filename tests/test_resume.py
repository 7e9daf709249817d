"""Bit-exact resume: a lifelong run killed (SIGKILL) at several points and resumed each time ends with
exactly the weights of an uninterrupted run, for D4S, AlphaEdit, UltraEdit and keel (ROME/MEMIT/FT keep no
state).

The kills land between a step's state file and its ledger.json (the commit point) and right after a
commit, in child processes; each resume is a new process that rebuilds the method state from disk."""

import os
import subprocess
import sys
import textwrap

import torch

from helpers import corpus_cov, tiny_adapter
from superedit.data import EditRequest
from superedit.editing.hparams import AlphaEditHParams, D4SHParams, KeelHParams, UltraEditHParams
from superedit.lifelong.ledger import Ledger
from superedit.lifelong.runner import Probe, run_lifelong

FAST = dict(v_num_grad_steps=4, n_prefixes=1, context_lengths=[3])
METHODS = ["d4s", "alphaedit", "ultraedit", "keel"]
HPARAMS = {"d4s": D4SHParams(layers=[1, 2], mom2_update_weight=10.0, **FAST),
           "alphaedit": AlphaEditHParams(layers=[1, 2], L2=1.0, nullspace_threshold=0.1, nullspace_relative=True,
                                         **FAST),
           "ultraedit": UltraEditHParams(layers=[1, 2], lr=1e-3, positions="all"),
           "keel": KeelHParams(layers=[1, 2], L2=1.0, nullspace_threshold=0.1, nullspace_relative=True, **FAST)}
STREAM = [EditRequest(prompt=p, subject=s, target_new=n, case_id=i) for i, (p, s, n) in enumerate([
    ("{} was born in", "Anna Berg", "Paris"), ("{} is located in", "Eiffel Tower", "Oslo"),
    ("{} plays the", "Toko Yasuda", "piano"), ("{} is owned by", "Google Trends", "Apple"),
    ("{} was created by", "Apple A5", "Google"), ("{} was born in", "Anna Berg", "Bergen")])]


def run_stream(out, resume: bool) -> None:
    """The run every process makes (the same stream, hparams, covariance and thread count)."""
    torch.set_num_threads(1)
    stats = corpus_cov(tiny_adapter("gpt2"), [1, 2])
    run_lifelong(lambda: tiny_adapter("gpt2"), STREAM, METHODS, HPARAMS, stats, batch_size=1, eval_every=100,
                 out_dir=out, probe=Probe(), resume=resume)


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    os.environ["SUPEREDIT_NO_PROGRESS"] = "1"
    from superedit.lifelong import ledger, runner
    from test_resume import run_stream

    where, arg = sys.argv[2], sys.argv[3]
    calls = [0]

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def before_commit():  # the n-th commit of this process: state file written, ledger.json not yet
        calls[0] += 1
        if where == "before" and calls[0] == int(arg):
            kill()

    def after_commit(method, n_done):
        if where == "after" and f"{{method}}:{{n_done}}" == arg:
            kill()

    ledger._before_commit, runner._after_commit = before_commit, after_commit
    run_stream(sys.argv[1], resume=sys.argv[4] == "resume")
    sys.exit(3)  # not killed: the kill point was never reached
""")


def test_killed_and_resumed_runs_equal_an_uninterrupted_one(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.dirname(__file__)))
    out = tmp_path / "killed"
    # commits per process: each ledger's creation, then one per edit (d4s, alphaedit, ultraedit, then keel)
    kills = [("before", "4", "new"),  # d4s: during the commit of edit #2
             ("after", "d4s:4", "resume"),  # d4s: right after edit #3's commit
             ("before", "5", "resume"),  # d4s edits #4, #5; alphaedit's creation; during alphaedit edit #1's commit
             ("after", "alphaedit:4", "resume"),
             ("before", "6", "resume"),  # alphaedit #5, #6; ultraedit's creation, #1, #2; during #3's commit
             ("after", "keel:2", "resume"),  # the rest of ultraedit; keel's creation, #0, #1: right after #1's commit
             ("before", "3", "resume")]  # keel #2, #3; during keel #4's commit
    for where, arg, mode in kills:
        proc = subprocess.run([sys.executable, str(script), str(out), where, arg, mode], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == -9, (where, arg, proc.returncode, proc.stderr[-2000:])
    run_stream(out, resume=True)  # the last resume, to the end
    ref = tmp_path / "uninterrupted"
    run_stream(ref, resume=False)
    for m in METHODS:
        a, b = Ledger.open(ref / m / "ledger"), Ledger.open(out / m / "ledger")
        assert len(b.edits) == len(a.edits) == len(STREAM)  # nothing lost, nothing applied twice
        for l in a.layers:
            assert float(a.total_delta(l).norm()) > 0
            assert torch.equal(a.total_delta(l), b.total_delta(l)), (m, l)
        assert a.tensors.keys() == b.tensors.keys()
        for k in a.tensors:  # the whole method state (sums, factor, counts; Σ K_p K_pᵀ; normaliser; keel's sums)
            assert torch.equal(a.tensors[k], b.tensors[k]), (m, k)
