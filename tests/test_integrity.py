"""Integrity of ledger and delta files (issue #13 item 1): content hashes verified on every load, no
non-finite tensor committed/loaded/exported, damage refused with nothing lost, the writer lock."""

import json
import logging
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch

from helpers import tiny_adapter
from superedit.data import EditRequest
from superedit.editing.delta import DeltaError, LayerDelta, WeightDelta
from superedit.editing.methods import get_method
from superedit.editing.methods.protocol import StepResult
from superedit.errors import LedgerError
from superedit.lifelong.ledger import Ledger, verify_ledger
from superedit.utils.integrity import WriterLock, sha256_file

F64 = torch.float64
REQS = [EditRequest(prompt="{} was born in", subject=f"Person {i}", target_new="Paris") for i in range(4)]


def flip_data_byte(path, at=0.5):
    """Flip one byte inside the DATA section of a safetensors file (the header stays valid)."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    i = start + int((len(raw) - start) * at)
    raw[i] ^= 0x7F
    path.write_bytes(bytes(raw))


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def make_ledger(path, n=3, method="memit", scale=0.01):
    adapter = tiny_adapter("gpt2")
    hp = get_method(method).hparams_cls(layers=[1], v_num_grad_steps=4, n_prefixes=1, context_lengths=[3])
    led = Ledger.create(path, adapter, method, hp)
    g = torch.Generator().manual_seed(0)
    incs = []
    for i in range(n):
        d = WeightDelta({1: LayerDelta(scale * torch.randn(adapter.d_model, 1, generator=g),
                                       torch.randn(adapter.d_mlp, 1, generator=g))}, method)
        incs.append(d.layers[1].dense(F64))
        led.record([REQS[i]], StepResult(d))
    led.close()
    return led, incs


def cli(*args):
    from typer.testing import CliRunner

    from superedit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ hashes recorded, verified
def test_every_committed_file_has_a_hash_and_verify_passes(tmp_path):
    led, _ = make_ledger(tmp_path / "l")
    info = json.loads((tmp_path / "l" / "ledger.json").read_text())
    assert info["state_sha256"] == sha256_file(tmp_path / "l" / info["state_file"])
    for e in info["edits"]:
        assert e["sha256"] == sha256_file(tmp_path / "l" / e["file"])
    assert len(info["info_sha256"]) == 64
    rep = verify_ledger(tmp_path / "l")
    assert rep["ok"] and rep["n_files"] == 5 and not rep["damaged"] and not rep["unverified"]
    res = cli("ledger", "verify", "--ledger", tmp_path / "l", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["ok"] is True


# ------------------------------------------------------------------ issue #13 row 1: a damaged edit file
def test_flipped_edit_file_undo_refused_nothing_lost(tmp_path):
    led, incs = make_ledger(tmp_path / "l")
    flip_data_byte(tmp_path / "l" / "edits" / "00002.safetensors")
    before = snapshot(tmp_path / "l")
    res = cli("ledger", "undo", "--ledger", tmp_path / "l")
    assert res.exit_code == 2
    assert "00002.safetensors" in res.output and "SHA-256" in res.output and "verify" in res.output
    assert snapshot(tmp_path / "l") == before  # nothing committed, nothing deleted, no lock left behind
    # the current state is intact and still usable: it equals the three increments
    fresh = Ledger.open(tmp_path / "l")
    assert torch.allclose(fresh.total_delta(1), sum(incs), atol=1e-6)
    with pytest.raises(LedgerError, match="00002.safetensors.*damaged"):
        fresh.undo()
    res = cli("ledger", "verify", "--ledger", tmp_path / "l", "--json")
    assert res.exit_code == 2
    rep = json.loads(res.stdout.strip().splitlines()[-1])
    assert [d["file"] for d in rep["damaged"]] == ["edits/00002.safetensors"]


# ------------------------------------------------------------------ issue #13 row 2: a damaged state file
def test_flipped_state_file_show_and_export_refused(tmp_path):
    led, _ = make_ledger(tmp_path / "l")
    state = tmp_path / "l" / led.info["state_file"]
    flip_data_byte(state)
    before = snapshot(tmp_path / "l")
    res = cli("ledger", "show", "--ledger", tmp_path / "l")
    assert res.exit_code == 2 and state.name in res.output and "state file is damaged" in res.output
    res = cli("ledger", "export", "--ledger", tmp_path / "l", "--mode", "model", "--out", tmp_path / "m")
    assert res.exit_code == 2 and state.name in res.output
    assert not (tmp_path / "m").exists()
    with pytest.raises(LedgerError, match="state file is damaged"):
        Ledger.open(tmp_path / "l")
    rep = verify_ledger(tmp_path / "l")
    assert not rep["ok"] and [d["file"] for d in rep["damaged"]] == [state.name]
    assert snapshot(tmp_path / "l") == before


@pytest.mark.parametrize("how", ["content", "syntax"])
def test_damaged_ledger_json_is_a_clear_error(tmp_path, how):
    make_ledger(tmp_path / "l")
    path = tmp_path / "l" / "ledger.json"
    text = path.read_text()
    if how == "content":  # still valid JSON: one character of a request's subject changed
        i = text.index("Person 1") + len("Person ")
        damaged = text[:i] + "7" + text[i + 1:]
    else:
        i = text.index("{")
        damaged = text[:i] + "[" + text[i + 1:]
    path.write_text(damaged)
    with pytest.raises(LedgerError, match="corrupt ledger file"):
        Ledger.open(tmp_path / "l")
    res = cli("ledger", "verify", "--ledger", tmp_path / "l", "--json")
    assert res.exit_code == 2
    assert json.loads(res.stdout.strip().splitlines()[-1])["damaged"][0]["file"] == "ledger.json"
    assert path.read_text() == damaged


def test_non_finite_state_is_never_committed(tmp_path):
    led, incs = make_ledger(tmp_path / "l")
    before = snapshot(tmp_path / "l")
    adapter_shape = incs[0].shape
    bad = WeightDelta({1: LayerDelta(dense_=torch.full(adapter_shape, float("nan")))}, "memit")
    with pytest.raises(LedgerError, match="not committed.*non-finite"):
        led.record([REQS[3]], StepResult(bad))
    assert snapshot(tmp_path / "l") == before and len(led.edits) == 3
    # the ledger goes on: a good edit commits after the refused one
    good = WeightDelta({1: LayerDelta(dense_=torch.full(adapter_shape, 1e-3))}, "memit")
    assert led.record([REQS[3]], StepResult(good)) == 3
    led.close()
    assert verify_ledger(tmp_path / "l")["ok"]


def test_export_model_refuses_overflow_and_uses_the_umask(tmp_path):
    led, _ = make_ledger(tmp_path / "l", n=1)
    adapter = tiny_adapter("gpt2")
    old = os.umask(0o027)
    try:
        led.export(tmp_path / "m", mode="model", adapter=adapter)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o750
    # ΔW = 1e300 is finite in float64 (the state), but W₀ + ΔW is inf in the model's float32
    led2, _ = make_ledger(tmp_path / "big", n=0)
    shape = (adapter.d_model, adapter.d_mlp)
    led2.record([REQS[0]], StepResult(WeightDelta({1: LayerDelta(dense_=torch.full(shape, 1e300, dtype=F64))},
                                                  "memit")))
    led2.close()
    with pytest.raises(LedgerError, match="not exported.*non-finite"):
        led2.export(tmp_path / "m2", mode="model", adapter=tiny_adapter("gpt2"))
    assert not (tmp_path / "m2").exists()


def test_older_ledger_without_hashes_loads_with_a_warning(tmp_path, caplog):
    make_ledger(tmp_path / "l")
    path = tmp_path / "l" / "ledger.json"
    info = json.loads(path.read_text())
    for key in ("info_sha256", "state_sha256"):
        info.pop(key)
    for e in info["edits"]:
        e.pop("sha256")
    path.write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING):
        led = Ledger.open(tmp_path / "l")
        led.undo()  # its edit file is read unverified, with a warning naming it
    text = caplog.text
    assert "older superedit" in text and info["state_file"] in text and "00002.safetensors" in text
    rep = verify_ledger(tmp_path / "l")
    assert rep["ok"] and "edits/00000.safetensors" in rep["unverified"]
    assert "ledger.json" not in rep["unverified"]  # the undo's commit recorded hashes again


# ------------------------------------------------------------------ deltas (issue #13 row 3)
def saved_delta(path):
    g = torch.Generator().manual_seed(1)
    d = WeightDelta({1: LayerDelta(torch.randn(32, 2, generator=g), torch.randn(128, 2, generator=g))}, "memit",
                    {"note": "test"})
    return d.save(path)


def test_delta_round_trip_verified(tmp_path):
    saved_delta(tmp_path / "d")
    info = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert info["tensors_sha256"] == sha256_file(tmp_path / "d" / "delta.safetensors")
    assert WeightDelta.load(tmp_path / "d").layers[1].left.shape == (32, 2)


@pytest.mark.parametrize("damage", ["flip-tensors", "flip-json", "nan-unhashed", "nan-rehashed"])
def test_damaged_delta_refused_by_load_and_eval(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    from superedit.utils.integrity import canonical_sha256

    d = saved_delta(tmp_path / "d")
    tensors, meta = d / "delta.safetensors", d / "delta.json"
    if damage == "flip-tensors":
        flip_data_byte(tensors)
        want = "delta.safetensors.*damaged"
    elif damage == "flip-json":
        meta.write_text(meta.read_text().replace('"note": "test"', '"note": "tesT"'))
        want = "delta.json.*damaged"
    else:
        t = load_file(str(tensors))
        t["layer.1.left"][3, 1] = float("nan")
        save_file(t, str(tensors))
        info = json.loads(meta.read_text())
        info.pop("json_sha256")
        if damage == "nan-unhashed":  # a delta saved before the hashes existed
            info.pop("tensors_sha256")
        else:
            info["tensors_sha256"] = sha256_file(tensors)
            info["json_sha256"] = canonical_sha256(info)
        meta.write_text(json.dumps(info))
        want = r"delta.safetensors.*'layer\.1\.left'.*non-finite"
    with pytest.raises(DeltaError, match=want):
        WeightDelta.load(d)
    res = cli("eval", "--delta", d)
    assert res.exit_code == 2, res.output
    assert str(d) in res.output


def test_save_refuses_a_non_finite_delta(tmp_path):
    d = WeightDelta({1: LayerDelta(dense_=torch.tensor([[1.0, float("inf")]]))}, "ft")
    with pytest.raises(DeltaError, match=r"'layer\.1\.dense'.*non-finite"):
        d.save(tmp_path / "d")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ the writer lock
def _write_lock(path, pid, host=None):
    path.write_text(json.dumps({"pid": pid, "hostname": host or socket.gethostname(), "proc_start": None,
                                "started": "2024-01-01T00:00:00Z", "token": "someone"}))


def test_live_writer_refused_stale_lock_taken_over(tmp_path, caplog):
    make_ledger(tmp_path / "l")
    lock = tmp_path / "l" / "lock"
    assert not lock.exists()  # close() released it
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(lock, live.pid)
        with pytest.raises(LedgerError, match=f"open for writing by process {live.pid}"):
            Ledger.open(tmp_path / "l", lock=True)
        led = Ledger.open(tmp_path / "l")  # readers need no lock
        with pytest.raises(LedgerError, match=f"process {live.pid}"):
            led.undo()
        res = cli("ledger", "undo", "--ledger", tmp_path / "l")
        assert res.exit_code == 2 and str(live.pid) in res.output
        assert cli("ledger", "verify", "--ledger", tmp_path / "l").exit_code == 0
    finally:
        live.kill()
        live.wait()
    # now the pid is dead: the lock is stale and taken over with a warning
    with caplog.at_level(logging.WARNING):
        led = Ledger.open(tmp_path / "l", lock=True)
    assert "stale lock" in caplog.text and str(live.pid) in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    led.undo()
    led.close()
    assert not lock.exists() and Ledger.open(tmp_path / "l").active() == [0, 1]
    # a lock from another host cannot be judged: refused, saying how to clear it
    _write_lock(lock, 1, host="elsewhere.invalid")
    with pytest.raises(LedgerError, match="elsewhere.invalid.*delete"):
        Ledger.open(tmp_path / "l", lock=True)


def test_two_writers_in_one_process_and_a_stale_copy(tmp_path):
    a, _ = make_ledger(tmp_path / "l")
    b = Ledger.open(tmp_path / "l")
    a.undo()  # a takes the lock
    with pytest.raises(LedgerError, match="another writer object in this process"):
        b.undo()
    a.close()
    with pytest.raises(LedgerError, match=r"on disk is at generation 5, this copy read generation 4.*open it again"):
        b.undo()  # b read an older generation: refused instead of overwriting a's commit
    assert not (tmp_path / "l" / "lock").exists()
    c = Ledger.open(tmp_path / "l")
    c.redo(2)
    c.close()
    assert Ledger.open(tmp_path / "l").active() == [0, 1, 2]


def test_writer_lock_release_keeps_a_lock_it_does_not_hold(tmp_path):
    a = WriterLock(tmp_path / "lock", "test")
    a.acquire()
    (tmp_path / "lock").unlink()
    b = WriterLock(tmp_path / "lock", "test")
    b.acquire()
    a.release()  # a's lock is gone; b's must survive
    assert json.loads((tmp_path / "lock").read_text())["token"] == b.token
    b.release()
    assert not (tmp_path / "lock").exists()


def test_eval_refuses_a_delta_that_overflows_the_model_dtype(tmp_path):
    """ΔW = 1e300 is finite in float64 (the saved delta) but W₀ + ΔW is inf in the float32 model."""
    from superedit.models import load_model

    a = load_model("builtin")
    shape = tuple(a.down_weight(1).shape)
    WeightDelta({1: LayerDelta(dense_=torch.full(shape, 1e300, dtype=F64))}, "ft").save(tmp_path / "d")
    res = cli("eval", "--delta", tmp_path / "d", "--model", "builtin")
    assert res.exit_code == 2, res.output
    assert "with this delta applied" in res.output and "layer 1 down-projection weight" in res.output
