"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT") and the
state-swap test: the *locate* of locate-then-edit.

Causal tracing, for one fact (template with ``{}``, subject, target):

* clean run: ``P_clean`` = probability of the target's FIRST token at the last prompt token (as in
  ROME; a multi-token target is scored by its first token only). The target is tokenized as the
  continuation of the prompt: a leading space is added unless the target or the prompt's end
  already has whitespace. With ``target=None`` the clean run's argmax token is traced.
* corrupted run: Gaussian noise with std ``noise_scale * std(embedding matrix entries)`` is added to
  the token embeddings (output of ``adapter.embedding()``) at the subject tokens; ``samples``
  noise draws are run as a batch of copies and their probabilities averaged. The same seeded draws
  are reused for every restoration, so differences between cells come from the restoration only.
* restored run: the corrupted run with one clean state written back at (layer, token) for
  ``kind`` in {``resid`` (block output), ``mlp`` (= the ``value`` site: the MLP down-projection
  output), ``attn`` (attention output)}; with a ``window`` w the same token is restored at layers
  ``[l - w//2, l - w//2 + w)`` clipped to the model (ROME: w=1 for resid, 10 for mlp/attn).
* indirect effect = ``P_restored - P_corrupt``.

Averages over facts use ROME's token categories (:data:`CATEGORIES`), see :func:`category_positions`.

State swap: for (recipient, donor) facts with the same template, different subjects and different
model answers, the recipient's residual state (block output) at its last subject token at layer l is
replaced by the donor's state at the donor's last subject token (same layer); we count how often
the recipient's argmax answer becomes the donor's answer (transfer) or stays its own (keep).
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..errors import RequestFormatError, SubjectNotFoundError, TemplateError
from ..models.adapter import ModelAdapter
from ..models.hooks import Trace, at_positions
from ..models.positions import encode_prompts, fill_template
from ..utils.logs import get_logger

log = get_logger(__name__)

#: tracing kind -> hook site of :class:`superedit.models.Trace`
KIND_SITES = {"resid": "resid", "mlp": "value", "attn": "attn"}

#: ROME's token categories for averaging over facts (in plotting order)
CATEGORIES = ("first subject token", "middle subject tokens", "last subject token",
              "first subsequent token", "further tokens", "last token")


# ----------------------------------------------------------------------------------------- input
@dataclass(frozen=True)
class Fact:
    """One fact to trace: ``prompt`` is a template with one ``{}`` for ``subject``.

    ``target`` is the answer string (its first token is traced); None traces the model's own
    top-1 prediction.
    """

    prompt: str
    subject: str
    target: str | None = None

    @property
    def filled(self) -> str:
        return fill_template(self.prompt, self.subject)[0]


def as_fact(obj: Any, where: str = "") -> Fact:
    """A :class:`Fact` from a Fact, a dict ``{"prompt", "subject", "target"}`` (``target_true`` is
    accepted as the target), or an object with ``prompt``/``subject``/``target_true`` attributes
    (``superedit.data.EditRequest``: the TRUE fact is traced; without ``target_true`` the model's own
    prediction is). Validates the template; errors name ``where``."""
    tag = f"{where}: " if where else ""
    if isinstance(obj, Fact):
        fact = obj
    elif isinstance(obj, Mapping):
        missing = [k for k in ("prompt", "subject") if not isinstance(obj.get(k), str)]
        if missing:
            raise RequestFormatError(f"{tag}fact record needs string fields 'prompt' (template with {{}}) and "
                                     f"'subject'; missing/invalid: {missing} (keys: {sorted(obj)})")
        target = obj.get("target", obj.get("target_true"))
        if target is not None and not isinstance(target, str):
            raise RequestFormatError(f"{tag}'target' must be a string, got {type(target).__name__}")
        fact = Fact(obj["prompt"], obj["subject"], target)
    elif hasattr(obj, "prompt") and hasattr(obj, "subject"):
        fact = Fact(obj.prompt, obj.subject, getattr(obj, "target_true", None))
    else:
        raise RequestFormatError(f"{tag}cannot read a fact from {type(obj).__name__}; "
                                 "pass {'prompt': '... {} ...', 'subject': ..., 'target': ...}")
    if "{}" not in fact.prompt and fact.subject and fact.subject.strip():
        if fact.subject in fact.prompt:
            raise TemplateError(f"{tag}prompt {fact.prompt!r} has no '{{}}'; it must be a template: replace the "
                                f"subject {fact.subject!r} with {{}}")
        raise SubjectNotFoundError(f"{tag}subject {fact.subject!r} does not occur in prompt {fact.prompt!r}, which "
                                   "has no '{}' either; pass a template such as '{} was born in'")
    try:
        fill_template(fact.prompt, fact.subject)
    except TemplateError as exc:
        raise TemplateError(f"{tag}{exc}") from None
    if fact.target is not None and not fact.target.strip():
        raise RequestFormatError(f"{tag}empty target for prompt {fact.prompt!r}; give the answer string or omit it")
    return fact


def target_token_id(tokenizer, prompt: str, target: str) -> int:
    """Id of the first token of ``target`` as a continuation of the (filled) ``prompt``."""
    t = target if (target[:1].isspace() or prompt[-1:].isspace()) else " " + target
    ids = tokenizer(t, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RequestFormatError(f"target {target!r} tokenizes to nothing")
    return int(ids[0])


@dataclass
class _Prepared:
    fact: Fact
    prompt: str
    input_ids: torch.Tensor  # (1, T)
    tokens: list[str]
    first: int
    last: int
    target_id: int
    target_str: str


def _prepare(adapter: ModelAdapter, fact: Fact) -> _Prepared:
    tok = adapter.tokenizer
    b = encode_prompts(tok, [fact.prompt], [fact.subject], device=adapter.device)
    ids = b.input_ids[:, : b.last_token[0] + 1]
    tokens = [tok.decode([i]) for i in ids[0].tolist()]
    tid = target_token_id(tok, b.prompts[0], fact.target) if fact.target is not None else -1
    return _Prepared(fact, b.prompts[0], ids, tokens, b.subject_first[0], b.subject_last[0], tid,
                     fact.target if fact.target is not None else "")


# ----------------------------------------------------------------------------------------- forward
def _last_logits(adapter: ModelAdapter, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits at the final position of unpadded ``input_ids`` (B, T) -> (B, V) float32."""
    mask = torch.ones_like(input_ids)
    try:
        out = adapter.model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1)
    except TypeError:
        out = adapter.model(input_ids=input_ids, attention_mask=mask)
    return out.logits[:, -1].float()


@contextmanager
def _noised_embeddings(adapter: ModelAdapter, positions: Sequence[int], noise: torch.Tensor | None):
    """Add ``noise`` (B, len(positions), d) to the embedding-module output at ``positions``.

    A plain forward hook on ``adapter.embedding()``, always removed on exit.
    """
    pos = list(positions)

    def hook(module, args, out):
        if noise is None:
            return None
        out = out.clone()
        out[:, pos] = out[:, pos] + noise.to(device=out.device, dtype=out.dtype)
        return out

    handle = adapter.embedding().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def embedding_noise_std(adapter: ModelAdapter) -> float:
    """Standard deviation of the embedding module's OUTPUT entries, where the noise is added.

    That is the std of the embedding matrix times whatever the module multiplies its rows by: Gemma's
    embedding module scales them by √d_model (25.3 for Gemma-3-270M), so noise sized from the matrix
    alone was 25× too weak there and corrupted nothing (mean p_corrupt 0.44 vs p_clean 0.45 over 60
    facts). The factor is measured on the module itself (its output for the first 256 token ids against
    those rows), so no family needs an entry for it; it is exactly 1 for plain embeddings, which keep
    their previous noise to the bit.
    """
    emb = adapter.embedding()
    weight = emb.weight.detach()
    base = float(weight.float().std())
    with torch.no_grad():
        ids = torch.arange(min(weight.shape[0], 256), device=weight.device)
        out = emb(ids).float()
        factor = float(out.std() / weight[ids].float().std())
    return base if abs(factor - 1.0) < 1e-6 else base * factor


def _write_rows(rows: torch.Tensor, toks: torch.Tensor, values: torch.Tensor):
    """Trace edit: ``t[rows[i], toks[i]] = values[i]`` (restore clean states)."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[rows.to(t.device), toks.to(t.device)] = values.to(device=t.device, dtype=t.dtype)
        return t

    return fn


Restore = Sequence[tuple[str, int, int]]  # [(site, layer, token), ...] restored together in one run


class _Tracer:
    """Clean states, noise and batched corrupted runs for one fact."""

    def __init__(self, adapter: ModelAdapter, fact: Fact, noise_scale: float, samples: int, seed: int,
                 batch_size: int, sites: Iterable[str]):
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if noise_scale < 0:
            raise ValueError(f"noise scale must be >= 0, got {noise_scale}")
        self.adapter = adapter
        self.p = _prepare(adapter, fact)
        self.samples = int(samples)
        self.batch_size = max(int(batch_size), self.samples)
        self.seed = int(seed)
        self.noise_std = noise_scale * embedding_noise_std(adapter)
        self.sites = sorted(set(sites))
        self.subj_pos = list(range(self.p.first, self.p.last + 1))
        n = adapter.n_layers
        reads = [(s, l) for s in self.sites for l in range(n)]
        with torch.no_grad(), Trace(adapter, reads=reads) as tr:
            logits = _last_logits(adapter, self.p.input_ids)
        self.clean = {key: tr[key][0] for key in reads}  # (T, d) per (site, layer)
        probs = torch.softmax(logits[0], -1)
        if self.p.target_id < 0:  # trace the model's own prediction
            self.p.target_id = int(probs.argmax())
            self.p.target_str = adapter.tokenizer.decode([self.p.target_id])
        self.p_clean = float(probs[self.p.target_id])
        gen = torch.Generator().manual_seed(self.seed)
        d = adapter.d_model
        self.noise = torch.randn(self.samples, len(self.subj_pos), d, generator=gen) * self.noise_std
        self.noise = self.noise.to(adapter.device)

    def check_site(self, site: str) -> None:
        if site not in self.sites:
            raise ValueError(f"site {site!r} was not recorded in the clean run (sites: {self.sites})")

    @torch.no_grad()
    def run(self, restores: Sequence[Restore]) -> torch.Tensor:
        """P(target) averaged over the noise samples, one value per restore set."""
        out = []
        per = max(1, self.batch_size // self.samples)
        T = self.p.input_ids.shape[1]
        for start in range(0, len(restores), per):
            chunk = restores[start:start + per]
            rows_n = len(chunk) * self.samples
            groups: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
            for i, rset in enumerate(chunk):
                for site, layer, tok in rset:
                    self.check_site(site)
                    if not 0 <= tok < T:
                        raise IndexError(f"token {tok} out of range for a prompt of {T} tokens")
                    rows, toks = groups.setdefault((site, int(layer)), ([], []))
                    for r in range(i * self.samples, (i + 1) * self.samples):
                        rows.append(r)
                        toks.append(int(tok))
            edits = {}
            for key, (rows, toks) in groups.items():
                toks_t = torch.tensor(toks)
                edits[key] = _write_rows(torch.tensor(rows), toks_t, self.clean[key][toks_t.to(self.clean[key].device)])
            ids = self.p.input_ids.expand(rows_n, T)
            noise = self.noise.repeat(len(chunk), 1, 1) if self.noise_std > 0 else None
            with _noised_embeddings(self.adapter, self.subj_pos, noise), Trace(self.adapter, edits=edits):
                probs = torch.softmax(_last_logits(self.adapter, ids), -1)[:, self.p.target_id]
            out.append(probs.view(len(chunk), self.samples).mean(1).cpu())
        return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------- tracing
def default_window(kind: str, n_layers: int) -> int:
    """ROME's windows scaled to the depth: resid 1; mlp/attn 10 at >= 40 layers (GPT-2 XL: 48),
    else ``max(1, round(10 * n_layers / 48))`` (GPT-J 28 -> 6, 12 layers -> 2, 6 layers -> 1)."""
    if kind == "resid":
        return 1
    return 10 if n_layers >= 40 else max(1, round(10 * n_layers / 48))


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers ``[layer - window//2, layer - window//2 + window)`` clipped to ``[0, n_layers)``."""
    lo = layer - window // 2
    return [l for l in range(lo, lo + window) if 0 <= l < n_layers]


@dataclass
class TraceResult:
    """Causal trace of one fact for one kind. ``scores[l, t]``: P(target) with the clean state of
    ``kind`` restored at token t and layers ``window_layers(l, window)``."""

    kind: str
    window: int
    scores: torch.Tensor  # (n_layers, n_tokens)
    p_clean: float
    p_corrupt: float
    tokens: list[str]
    subject_span: tuple[int, int]  # (first, last) token index, inclusive
    prompt: str  # the filled prompt
    template: str
    subject: str
    target: str
    target_id: int
    noise_std: float
    samples: int
    seed: int

    @property
    def indirect_effect(self) -> torch.Tensor:
        return self.scores - self.p_corrupt

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return dict(kind=self.kind, site=KIND_SITES[self.kind], window=self.window, prompt=self.prompt,
                    template=self.template, subject=self.subject, target=self.target,
                    target_token=self.target_id, tokens=self.tokens, subject_span=list(self.subject_span),
                    p_clean=self.p_clean, p_corrupt=self.p_corrupt, noise_std=self.noise_std,
                    samples=self.samples, seed=self.seed, scores=self.scores.tolist())


def _check_kind(kind: str) -> str:
    if kind not in KIND_SITES:
        raise ValueError(f"unknown tracing kind {kind!r}; choose from {sorted(KIND_SITES)}")
    return KIND_SITES[kind]


def trace_fact_kinds(adapter: ModelAdapter, fact: Any, kinds: Sequence[str] = ("resid", "mlp", "attn"),
                     windows: Mapping[str, int] | None = None, noise_scale: float = 3.0, samples: int = 10,
                     seed: int = 0, batch_size: int = 256) -> dict[str, TraceResult]:
    """:func:`trace_fact` for several kinds, sharing the clean run and the noise draws."""
    fact = as_fact(fact)
    sites = [_check_kind(k) for k in kinds]
    tracer = _Tracer(adapter, fact, noise_scale, samples, seed, batch_size, sites)
    p_corrupt = float(tracer.run([()])[0])
    n, T = adapter.n_layers, tracer.p.input_ids.shape[1]
    out = {}
    for kind in kinds:
        site = KIND_SITES[kind]
        w = int((windows or {}).get(kind) or default_window(kind, n))
        if w < 1:
            raise ValueError(f"window must be >= 1, got {w}")
        restores = [[(site, L, t) for L in window_layers(l, w, n)] for l in range(n) for t in range(T)]
        scores = tracer.run(restores).view(n, T)
        p = tracer.p
        out[kind] = TraceResult(kind, w, scores, tracer.p_clean, p_corrupt, p.tokens, (p.first, p.last), p.prompt,
                                fact.prompt, fact.subject, p.target_str, p.target_id, tracer.noise_std,
                                tracer.samples, tracer.seed)
    return out


def trace_fact(adapter: ModelAdapter, fact: Any, kind: str = "mlp", window: int | None = None,
               noise_scale: float = 3.0, samples: int = 10, seed: int = 0, batch_size: int = 256) -> TraceResult:
    """Causal trace of ``fact`` (a :class:`Fact`, a fact dict or an EditRequest) for ``kind``.

    Args:
        kind: "resid" (block output), "mlp" (down-projection output) or "attn".
        window: layers restored together (default :func:`default_window`).
        noise_scale: noise std in units of the embedding-matrix std (ROME: 3).
        samples: noise draws averaged (run as one batch of copies), seeded by ``seed``.
        batch_size: max rows per forward pass (restorations x samples).
    """
    windows = {kind: window} if window is not None else None
    return trace_fact_kinds(adapter, fact, (kind,), windows, noise_scale, samples, seed, batch_size)[kind]


def restored_probs(adapter: ModelAdapter, fact: Any, restores: Sequence[Restore], noise_scale: float = 3.0,
                   samples: int = 10, seed: int = 0, batch_size: int = 256) -> dict[str, Any]:
    """Low-level: P(target) of the corrupted run with arbitrary sets of clean states restored.

    ``restores`` is a list of restore sets; each set is a list of ``(kind_or_site, layer, token)``
    restored together in one run (kinds "mlp"/"resid"/"attn" or sites "value"/"resid"/"attn").
    Returns ``{"p_clean", "p_corrupt", "probs": [one per set], "tokens", "subject_span"}``.
    """
    fact = as_fact(fact)
    norm = [[(KIND_SITES.get(s, s), int(l), int(t)) for s, l, t in rset] for rset in restores]
    sites = {s for rset in norm for s, _, _ in rset}
    bad = sites - set(KIND_SITES.values())
    if bad:
        raise ValueError(f"cannot restore sites {sorted(bad)}; use one of {sorted(KIND_SITES)}")
    tracer = _Tracer(adapter, fact, noise_scale, samples, seed, batch_size, sites)
    probs = tracer.run([()] + norm)
    return dict(p_clean=tracer.p_clean, p_corrupt=float(probs[0]), probs=probs[1:].tolist(),
                tokens=tracer.p.tokens, subject_span=(tracer.p.first, tracer.p.last))


# ----------------------------------------------------------------------------------------- averaging
def category_positions(first: int, last: int, n_tokens: int) -> dict[str, list[int]]:
    """Token indices of each ROME category (may be empty; may overlap when the subject ends the
    prompt or is followed by a single token). Tokens before the subject belong to no category."""
    return {
        "first subject token": [first],
        "middle subject tokens": list(range(first + 1, last)),
        "last subject token": [last],
        "first subsequent token": [last + 1] if last + 1 < n_tokens else [],
        "further tokens": list(range(last + 2, n_tokens - 1)),
        "last token": [n_tokens - 1],
    }


def average_by_category(grid: torch.Tensor, first: int, last: int) -> dict[str, torch.Tensor | None]:
    """``grid`` (n_layers, n_tokens) -> {category: (n_layers,) mean over its tokens, or None if empty}."""
    grid = torch.as_tensor(grid, dtype=torch.float32)
    out: dict[str, torch.Tensor | None] = {}
    for cat, pos in category_positions(first, last, grid.shape[1]).items():
        out[cat] = grid[:, pos].mean(1) if pos else None
    return out


def _early_middle(layer: int, n_layers: int) -> bool:
    return layer < math.ceil(2 * n_layers / 3)


def summarize_traces(results: Sequence[TraceResult]) -> dict[str, Any]:
    """Mean indirect effect per (category, layer) over facts, for one kind.

    Returns ``{"kind", "window", "n_facts", "mean_p_clean", "mean_p_corrupt", "categories": {cat:
    {"n_facts", "mean_ie": [L], "mean_ie_over_clean": [L]}}, "peak": {...}, "last_subject_peak": {...}}``.
    ``mean_ie_over_clean`` = mean IE / mean P_clean (ratio of means). For ``mlp`` a ``criterion``
    entry checks the testbed acceptance: the peak over layers of the last subject token's mean IE is
    >= 0.1 x mean P_clean and lies in the early-middle layers (``layer < ceil(2 n_layers / 3)``).
    """
    if not results:
        raise ValueError("no trace results to summarize")
    kinds = {r.kind for r in results}
    if len(kinds) != 1:
        raise ValueError(f"summarize one kind at a time, got {sorted(kinds)}")
    kind = results[0].kind
    n = results[0].n_layers
    p_clean = sum(r.p_clean for r in results) / len(results)
    p_corrupt = sum(r.p_corrupt for r in results) / len(results)
    acc: dict[str, list[torch.Tensor]] = {c: [] for c in CATEGORIES}
    for r in results:
        for cat, v in average_by_category(r.indirect_effect, *r.subject_span).items():
            if v is not None:
                acc[cat].append(v)
    cats: dict[str, Any] = {}
    best = None
    for cat in CATEGORIES:
        if not acc[cat]:
            cats[cat] = dict(n_facts=0, mean_ie=None, mean_ie_over_clean=None)
            continue
        mean = torch.stack(acc[cat]).mean(0)
        norm = mean / p_clean if p_clean > 0 else torch.full_like(mean, float("nan"))
        cats[cat] = dict(n_facts=len(acc[cat]), mean_ie=mean.tolist(), mean_ie_over_clean=norm.tolist())
        l = int(mean.argmax())
        if best is None or mean[l] > best["mean_ie"]:
            best = dict(category=cat, layer=l, mean_ie=float(mean[l]), mean_ie_over_clean=float(norm[l]))
    ls = cats["last subject token"]
    li = int(torch.tensor(ls["mean_ie"]).argmax())
    last_peak = dict(layer=li, mean_ie=ls["mean_ie"][li], mean_ie_over_clean=ls["mean_ie_over_clean"][li])
    out = dict(kind=kind, window=results[0].window, n_layers=n, n_facts=len(results), mean_p_clean=p_clean,
               mean_p_corrupt=p_corrupt, categories=cats, peak=best, last_subject_peak=last_peak)
    if kind == "mlp":
        ratio = last_peak["mean_ie_over_clean"]
        strong = bool(ratio == ratio and ratio >= 0.1)
        early = _early_middle(li, n)
        out["criterion"] = dict(rule="mlp: max over layers of mean IE at the last subject token >= 0.1 x mean "
                                     "P_clean, at a layer < ceil(2 n_layers / 3)",
                                ie_ge_0_1_clean=strong, early_middle_layer=early,
                                global_peak_at_last_subject=bool(best and best["category"] == "last subject token"),
                                met=bool(strong and early))
    return out


# ----------------------------------------------------------------------------------------- state swap
@dataclass
class SwapResult:
    """State-swap outcome. ``transfer_rate[i]``/``keep_rate[i]`` belong to ``layers[i]``."""

    layers: list[int]
    transfer_rate: list[float | None]  # None when there are no pairs
    keep_rate: list[float | None]
    n_pairs: int
    pairs: list[dict] = field(default_factory=list)
    transferred: list[list[bool]] = field(default_factory=list)  # [pair][layer index]

    @property
    def best_layer(self) -> int | None:
        if not self.n_pairs or not self.layers:
            return None
        return self.layers[max(range(len(self.layers)), key=lambda i: (self.transfer_rate[i], -i))]

    @property
    def best_transfer_rate(self) -> float | None:
        return None if self.best_layer is None else self.transfer_rate[self.layers.index(self.best_layer)]

    def to_dict(self) -> dict[str, Any]:
        return dict(site="resid", position="last subject token", n_pairs=self.n_pairs, layers=self.layers,
                    transfer_rate=self.transfer_rate, keep_rate=self.keep_rate, best_layer=self.best_layer,
                    best_transfer_rate=self.best_transfer_rate, pairs=self.pairs, transferred=self.transferred)


def pair_facts(facts: Sequence[Any], answers: Sequence[Any], seed: int = 0,
               max_pairs: int | None = None) -> list[tuple[int, int]]:
    """Deterministic (recipient, donor) index pairs: same template, different subject, different
    answer. Each fact is a recipient at most once; its donor is drawn with a seeded RNG."""
    facts = [as_fact(f) for f in facts]
    if len(answers) != len(facts):
        raise ValueError(f"{len(facts)} facts but {len(answers)} answers")
    rng = random.Random(f"superedit-swap:{seed}")
    by_template: dict[str, list[int]] = {}
    for i, f in enumerate(facts):
        by_template.setdefault(f.prompt, []).append(i)
    pairs = []
    for i, f in enumerate(facts):
        cands = [j for j in by_template[f.prompt] if facts[j].subject != f.subject and answers[j] != answers[i]]
        if cands:
            pairs.append((i, rng.choice(cands)))
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = sorted(rng.sample(range(len(pairs)), max_pairs))
        pairs = [pairs[k] for k in keep]
    return pairs


def _clean_pass(adapter: ModelAdapter, facts: Sequence[Fact], batch_size: int):
    """(answers (N,), resid states at the last subject token (N, n_layers, d)) of clean runs."""
    n = adapter.n_layers
    answers, states = [], []
    for s in range(0, len(facts), batch_size):
        chunk = facts[s:s + batch_size]
        b = encode_prompts(adapter.tokenizer, [f.prompt for f in chunk], [f.subject for f in chunk],
                           padding_side="right", device=adapter.device)
        rows = torch.arange(len(chunk), device=adapter.device)
        with torch.no_grad(), Trace(adapter, reads=[("resid", l) for l in range(n)]) as tr:
            logits = adapter.model(**b.model_inputs()).logits
        last = torch.tensor(b.last_token, device=adapter.device)
        answers.append(logits[rows, last].argmax(-1).cpu())
        subj = torch.tensor(b.subject_last, device=adapter.device)
        states.append(torch.stack([tr["resid", l][rows, subj] for l in range(n)], 1))
    return torch.cat(answers), torch.cat(states)


def state_swap(adapter: ModelAdapter, facts: Sequence[Any], layers: Sequence[int] | None = None,
               pairs: Sequence[tuple[int, int]] | None = None, seed: int = 0, max_pairs: int | None = None,
               batch_size: int = 64) -> SwapResult:
    """Swap the residual state at the last subject token from donor into recipient, per layer.

    Answers are the model's clean argmax tokens at the last prompt token. ``pairs`` (indices into
    ``facts``) overrides :func:`pair_facts` (e.g. donor == recipient as a sanity check).
    """
    facts = [as_fact(f) for f in facts]
    n = adapter.n_layers
    layers = list(range(n)) if layers is None else [int(l) for l in layers]
    for l in layers:
        adapter.check_layer(l)
    answers, states = _clean_pass(adapter, facts, batch_size)
    if pairs is None:
        pairs = pair_facts(facts, answers.tolist(), seed=seed, max_pairs=max_pairs)
    pairs = [(int(r), int(d)) for r, d in pairs]
    tok = adapter.tokenizer
    info = [dict(recipient=r, donor=d, recipient_subject=facts[r].subject, donor_subject=facts[d].subject,
                 template=facts[r].prompt, recipient_answer=tok.decode([int(answers[r])]),
                 donor_answer=tok.decode([int(answers[d])])) for r, d in pairs]
    if not pairs:
        log.warning("state swap: no (recipient, donor) pair with the same template and different answers")
        return SwapResult(layers, [None] * len(layers), [None] * len(layers), 0)
    transferred = torch.zeros(len(pairs), len(layers), dtype=torch.bool)
    kept = torch.zeros(len(pairs), len(layers), dtype=torch.bool)
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        rec = [facts[r] for r, _ in chunk]
        b = encode_prompts(tok, [f.prompt for f in rec], [f.subject for f in rec], padding_side="right",
                           device=adapter.device)
        rows = torch.arange(len(chunk), device=adapter.device)
        last = torch.tensor(b.last_token, device=adapter.device)
        donor_idx = torch.tensor([d for _, d in chunk])
        rec_ans = answers[[r for r, _ in chunk]]
        don_ans = answers[donor_idx]
        for j, l in enumerate(layers):
            new = states[donor_idx, l]
            with torch.no_grad(), Trace(adapter, edits={("resid", l): at_positions(b.subject_last, new)}):
                pred = adapter.model(**b.model_inputs()).logits[rows, last].argmax(-1).cpu()
            transferred[s:s + len(chunk), j] = pred == don_ans
            kept[s:s + len(chunk), j] = pred == rec_ans
    return SwapResult(layers, transferred.float().mean(0).tolist(), kept.float().mean(0).tolist(), len(pairs),
                      info, transferred.tolist())
