"""Named testbed sizes (width/depth grow; all share one world and the same number of epochs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from superedit.errors import SupereditError


@dataclass(frozen=True)
class Size:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    epochs: int  # passes over the world (one biography per subject per epoch)
    batch_size: int = 16
    lr: float = 6e-3
    n_subjects: int | None = None  # None: the full shared world; micro uses a prefix (subset) of it
    relations_per_subject: int | None = None  # None: every subject has a fact of every relation
    unique_surnames: bool = False  # invented surname per subject instead of the shared LAST_NAMES
    hparams_size: str | None = None  # packaged hparams profile testbed-<this> (None: the size's own name)
    vocab_size: int = 2048
    record_prob: float = 0.0  # share of biographies with a keyword record (see World.record)
    name_prob: float = 0.5  # chance that a later sentence of a biography names the subject (else a pronoun)
    bos: bool = False  # tokenizer prepends <|endoftext|> to every encoding
    subject_bottleneck: float = 0.0  # share of documents trained with the last-subject-token attention mask

    def to_dict(self) -> dict:
        return asdict(self)


N_SUBJECTS = 150  # subjects in the shared world of every full size

# training-data options shared by the full sizes: keyword records in every document and the
# last-subject-token attention bottleneck on 90% of documents (see testbed/train.py::_batches)
_DATA = dict(record_prob=1.0, subject_bottleneck=0.9)

SIZES: dict[str, Size] = {
    # micro: for tests (trains in ~20 s); a 24-subject prefix of the shared world
    "micro": Size("micro", n_layer=2, n_embd=64, n_head=4, epochs=120, batch_size=8, lr=1e-2, n_subjects=24),
    "tiny": Size("tiny", n_layer=4, n_embd=96, n_head=4, epochs=200, lr=8e-3, **_DATA),
    "small": Size("small", n_layer=6, n_embd=128, n_head=4, epochs=200, lr=8e-3, **_DATA),
    "base": Size("base", n_layer=8, n_embd=192, n_head=6, epochs=200, lr=4e-3, **_DATA),
    # wide: small's architecture on a WIDER world (1,300 people with invented surnames, 2 facts
    # each), so a lifelong stream of 1,000 edits can edit distinct subjects and still leave
    # subjects no edit touched (the shared world has 150 subjects: 1,000 edits re-edit each ~7 times)
    "wide": Size("wide", n_layer=6, n_embd=128, n_head=4, epochs=120, lr=8e-3, n_subjects=1300,
                 relations_per_subject=2, unique_surnames=True, hparams_size="small", **_DATA),
}

DEFAULT_SIZE = "small"
DEFAULT_SEED = 0


def get_size(name: str) -> Size:
    if name not in SIZES:
        raise SupereditError(f"unknown testbed size {name!r}; valid sizes: {', '.join(SIZES)}")
    return SIZES[name]
