"""What the rest of superedit needs from a testbed model directory.

* ``testbed_corpus(model_dir)`` — text for covariance statistics and context prefixes: biographies in
  the training distribution plus filler sentences (the testbed's "Wikipedia").
* ``true_facts(model_dir)`` — the facts the model was trained on, as dicts for request building.
* ``default_edit_requests(model_dir, n, seed)`` — seeded counterfactual edit requests: for a synthetic
  world, a true fact rewritten to another object of the same relation (paraphrases from held-out
  templates, neighbourhood prompts from subjects sharing relation and object, aliases as subject
  rephrases); for a world learned from a dataset file, that file's own requests.
"""

from __future__ import annotations

import random
from pathlib import Path

from ..errors import SupereditError
from .build import load_world, read_testbed_meta

MAX_NEIGHBOURS = 10


def testbed_corpus(model_dir: str | Path, n_passes: int = 2, seed: int = 1234) -> list[str]:
    """Training-distribution documents (fresh shuffles and phrasings) followed by the filler text."""
    world = load_world(model_dir)
    rng = random.Random(f"superedit-corpus:{seed}")
    docs: list[str] = []
    for _ in range(n_passes):
        docs += world.training_documents(rng, filler_prob=0.3)
    return docs + list(world.filler)


def true_facts(model_dir: str | Path) -> list[dict]:
    """One dict per (subject, relation): the first training template is the edit prompt."""
    world = load_world(model_dir)
    out = []
    for subj in world.subjects:
        for rid, obj in subj.facts.items():
            rel = world.relation(rid)
            if not rel.train_templates:
                continue
            neigh = [(n, obj) for n in world.neighbours(subj.name, rid)[:MAX_NEIGHBOURS]]
            out.append({"id": f"{subj.name}|{rid}", "subject": subj.name, "relation": rid,
                        "template": rel.train_templates[0], "object": obj,
                        "paraphrase_templates": list(rel.heldout_templates), "neighbours": neigh,
                        "aliases": list(subj.aliases)})
    return out


def default_edit_requests(model_dir: str | Path, n: int | None, seed: int = 0) -> list:
    """Seeded counterfactual edits for a testbed model (see the module docstring).

    Synthetic worlds give one fact per subject first (a seeded order), then a second fact of each
    subject, and so on: as in CounterFact, the first ``len(subjects)`` requests have distinct subjects,
    so a batch of them never asks one key (the subject's last token) for two different values.
    """
    from ..data import load_requests, sample_requests
    from ..data.sampling import counterfactual_requests_from_facts

    meta = read_testbed_meta(model_dir)
    facts_file = (meta.get("facts_file") or meta.get("world", {}).get("source_file")) if isinstance(meta, dict) else None
    world = load_world(model_dir)
    if world.source != "synthetic":
        if not facts_file or not Path(facts_file).exists():
            raise SupereditError(f"testbed {model_dir} learned the facts of {facts_file or 'a dataset file'}, which is "
                                 "not available here; pass --requests FILE")
        return sample_requests(load_requests(facts_file), n, seed)
    reqs = counterfactual_requests_from_facts(true_facts(model_dir), None, seed, source=f"testbed:{Path(model_dir).name}")
    rng = random.Random(f"superedit-edit-order:{seed}")
    rng.shuffle(reqs)
    seen: dict[str, int] = {}
    rank = []
    for r in reqs:
        rank.append(seen.get(r.subject, 0))
        seen[r.subject] = rank[-1] + 1
    order = sorted(range(len(reqs)), key=lambda i: rank[i])  # stable: the seeded order within each round
    reqs = [reqs[i] for i in order]
    return reqs if n is None else reqs[:n]
