"""Build a testbed: world -> tokenizer -> trained GPT-2-style model -> standard HF model dir."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from superedit.testbed.sizes import DEFAULT_SEED, N_SUBJECTS, get_size
from superedit.testbed.world import World
from superedit.utils.io import write_json_atomic
from superedit.utils.logs import get_logger

log = get_logger(__name__)

MAX_FP32_BYTES = 9_000_000  # larger checkpoints are stored as fp16 (config still says float32)


def make_world(size: str, seed: int = DEFAULT_SEED, facts_file: str | Path | None = None) -> World:
    if facts_file is not None:
        return World.from_dataset_file(facts_file, seed=seed)
    s = get_size(size)
    return World.generate(seed, s.n_subjects or N_SUBJECTS, relations_per_subject=s.relations_per_subject,
                          unique_surnames=s.unique_surnames)


def build_command(size: str, out_dir: str | Path, seed: int, facts_file: str | Path | None,
                  epochs: int | None = None) -> str:
    cmd = ["superedit", "testbed", "build", "--size", size, "--out", str(out_dir), "--seed", str(seed)]
    if facts_file is not None:
        cmd += ["--facts", str(facts_file)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    return shlex.join(cmd)


def build_testbed(size: str, out_dir: str | Path, seed: int = DEFAULT_SEED,
                  facts_file: str | Path | None = None, epochs: int | None = None) -> Path:
    """Train the ``size`` testbed and write it to ``out_dir`` (config.json, model.safetensors,
    tokenizer files, testbed.json). The directory is written atomically (temp dir + rename);
    an existing ``out_dir`` is replaced. Returns ``out_dir``."""
    import torch

    from superedit.testbed.tokenizer import train_tokenizer
    from superedit.testbed.train import train_model

    spec = get_size(size)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    world = make_world(size, seed, facts_file)
    log.info("building testbed %s (seed %d): %d subjects, %d relations, %d facts", size, seed,
             len(world.subjects), len(world.relations), len(world.facts()))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        t0 = time.time()
        tok = train_tokenizer(world.corpus(seed=seed, record_prob=spec.record_prob, name_prob=spec.name_prob), tmp,
                              vocab_size=spec.vocab_size, add_bos=spec.bos)
        model, figures = train_model(world, tok, spec, seed=seed, epochs=epochs)
        n_params = sum(p.numel() for p in model.parameters())
        if n_params * 4 > MAX_FP32_BYTES:
            model = model.to(torch.float16)
        model.save_pretrained(str(tmp), safe_serialization=True)
        _force_float32_config(tmp / "config.json")
        meta: dict[str, Any] = dict(
            format="superedit-testbed/1", size=size, size_spec=spec.to_dict(), seed=seed,
            facts_file=str(facts_file) if facts_file else None,
            build_command=build_command(size, out_dir, seed, facts_file, epochs),
            split=dict(
                train_templates={r.id: r.train_templates for r in world.relations},
                heldout_templates={r.id: r.heldout_templates for r in world.relations},
                heldout_statements=sum(1 for s in world.statements if s.split == "heldout"),
                aliases="subjects[*].aliases (never in training text)",
            ),
            figures=figures, build_seconds=round(time.time() - t0, 1),
            storage_dtype="float16" if n_params * 4 > MAX_FP32_BYTES else "float32",
            world=world.to_dict(),
        )
        write_json_atomic(tmp / "testbed.json", meta, indent=1)
        tmp.chmod(0o755)  # mkdtemp makes 0700 dirs, atomic writes 0600 files
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("testbed written to %s", out_dir)
    return out_dir


def _force_float32_config(path: Path) -> None:
    cfg = json.loads(path.read_text())
    for k in ("dtype", "torch_dtype"):
        if k in cfg:
            cfg[k] = "float32"
    cfg.setdefault("dtype", "float32")
    write_json_atomic(path, cfg)


def read_testbed_meta(model_dir: str | Path) -> dict[str, Any]:
    p = Path(model_dir) / "testbed.json"
    return json.loads(p.read_text(encoding="utf-8"))


def load_world(model_dir: str | Path) -> World:
    return World.from_dict(read_testbed_meta(model_dir)["world"])
