"""A deterministic synthetic fact world (or one learned from a dataset file).

Subjects are two-part person names drawn from SMALL pools of first and last names, so that
neither part alone identifies a person: the model has to compose the subject across its tokens,
which is what locate-then-edit methods assume (attributes gathered at the last subject token).

Training text is biography-style: each document states all facts of one person in shuffled order,
with several phrasings per relation, pronouns and mid-paragraph restatements of the full name.
One template per relation is HELD OUT of training (paraphrase test) and every subject has aliases
("Dr. Anna Berg", "Berg, Anna", ...) that never occur in training text.

Everything is a pure function of the seed (string-seeded ``random.Random``), and
``World.generate(seed, n)`` is a prefix of ``World.generate(seed, m)`` for ``n <= m``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from superedit.errors import RequestFormatError

FIRST_NAMES_F = [
    "Anna", "Maria", "Laura", "Sarah", "Emma", "Julia", "Clara", "Nina", "Helen", "Sofia",
    "Rosa", "Diana", "Paula", "Linda", "Karen", "Alice", "Grace", "Irene",
]
FIRST_NAMES_M = [
    "John", "Peter", "David", "Thomas", "Paul", "Mark", "Daniel", "Robert", "Simon", "Victor",
    "Oscar", "Hugo", "Felix", "Martin", "Henry", "Frank", "George", "Walter",
]
LAST_NAMES = [
    "Berg", "Miller", "Fischer", "Weber", "Wagner", "Becker", "Hoffman", "Schulz", "Koch", "Richter",
    "Klein", "Wolf", "Neumann", "Schwarz", "Braun", "Hartmann", "Lange", "Werner", "Krause", "Lehmann",
    "Walsh", "Baker", "Carter", "Foster", "Turner", "Parker", "Morgan", "Hughes", "Porter", "Sutton",
    "Nolan", "Reid", "Moss", "Grant", "Hayes", "Dixon",
]

# relation id -> (noun phrase, verb templates, objects).  Every relation gets the templates
#   "{} <verb>" (one per verb), "{}'s <noun> is" and "The <noun> of {} is";
# one of the two noun templates (alternating by relation) is HELD OUT of training.
RELATIONS: list[tuple[str, str, list[str], list[str]]] = [
    ("birthplace", "birthplace", ["was born in", "was born in the city of"],
     ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Oslo", "Lisbon", "Athens", "Warsaw"]),
    ("occupation", "occupation", ["works as a", "is employed as a"],
     ["teacher", "doctor", "lawyer", "farmer", "pilot", "nurse", "chef", "baker", "writer", "dentist", "banker", "plumber"]),
    ("employer", "employer", ["works for", "is employed by"],
     ["Google", "Apple", "Samsung", "Toyota", "Siemens", "Nokia", "Sony", "Intel", "Boeing", "Nestle", "Shell", "Philips"]),
    ("language", "native language", ["speaks", "grew up speaking"],
     ["French", "German", "Spanish", "Italian", "Dutch", "Polish", "Greek", "Swedish", "Danish", "Czech", "Turkish", "Russian"]),
    ("instrument", "instrument", ["plays the", "performs on the"],
     ["piano", "guitar", "violin", "drums", "flute", "cello", "trumpet", "harp", "banjo", "organ", "clarinet", "bass"]),
    ("sport", "favorite sport", ["is a fan of", "enjoys playing"],
     ["tennis", "soccer", "hockey", "golf", "cricket", "rugby", "baseball", "volleyball", "chess", "badminton", "handball", "polo"]),
    ("university", "alma mater", ["studied at", "graduated from"],
     ["Oxford", "Harvard", "Stanford", "Yale", "Princeton", "Cambridge", "Cornell", "Columbia", "Berkeley", "Duke", "Purdue", "Rutgers"]),
    ("pet", "pet", ["has a pet", "owns a pet"],
     ["dog", "cat", "parrot", "rabbit", "hamster", "turtle", "goldfish", "lizard", "pony", "ferret", "snake", "mouse"]),
    ("color", "favorite color", ["likes the color", "loves the color"],
     ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey", "gold"]),
    ("food", "favorite food", ["loves eating", "often eats"],
     ["pizza", "pasta", "sushi", "tacos", "curry", "soup", "salad", "steak", "bread", "rice", "noodles", "cheese"]),
]

_FILLER_SUBJ = ["The weather", "The old bridge", "The small market", "The river", "The morning train",
                "The library", "The garden", "The museum", "The harbor", "The village square", "The bakery",
                "The football stadium", "The mountain road", "The city park", "The new hospital"]
_FILLER_PRED = ["was quiet on Monday", "looked busy in the evening", "opened early this week",
                "was closed for repairs", "seemed calm after the rain", "was crowded at noon",
                "had many visitors last year", "stood empty during the winter", "was painted again",
                "became popular in the summer", "was cleaned on Sunday", "looked bright in the sun",
                "was rebuilt long ago", "drew a large crowd", "remained open until midnight"]
_FILLER_TAIL = ["", "", " and nobody complained", " as usual", " for the first time", " according to the news",
                " because of the holiday", " while it was snowing"]


@dataclass
class Relation:
    id: str
    noun: str
    train_templates: list[str]
    heldout_templates: list[str]
    objects: list[str]

    def to_dict(self) -> dict:
        return dict(id=self.id, noun=self.noun, train_templates=self.train_templates,
                    heldout_templates=self.heldout_templates, objects=self.objects)

    @staticmethod
    def from_dict(d: dict) -> "Relation":
        return Relation(d["id"], d.get("noun", d["id"]), list(d["train_templates"]),
                        list(d["heldout_templates"]), list(d["objects"]))


@dataclass
class Subject:
    name: str
    facts: dict[str, str]
    aliases: list[str] = field(default_factory=list)
    first: str = ""
    last: str = ""
    gender: str = ""  # "f" | "m" | "" (unknown: no pronouns)

    def to_dict(self) -> dict:
        return dict(name=self.name, first=self.first, last=self.last, gender=self.gender,
                    aliases=self.aliases, facts=self.facts)

    @staticmethod
    def from_dict(d: dict) -> "Subject":
        return Subject(d["name"], dict(d["facts"]), list(d.get("aliases", [])), d.get("first", ""),
                       d.get("last", ""), d.get("gender", ""))


@dataclass
class Statement:
    """A (prompt, target) pair from a dataset file; split is "train" or "heldout".

    kind "literal": a dataset sentence, trained and evaluated as is; kind "mention": a subject-free
    sentence that only makes an answer string a word the model knows (trained, never evaluated)."""

    prompt: str
    target: str
    split: str = "train"
    subject: str = ""
    relation: str = ""
    kind: str = ""

    def to_dict(self) -> dict:
        return dict(prompt=self.prompt, target=self.target, split=self.split, subject=self.subject,
                    relation=self.relation, kind=self.kind)


@dataclass
class FactPrompt:
    prompt: str
    target: str
    subject: str
    relation: str
    template: str


class World:
    def __init__(self, relations: list[Relation], subjects: list[Subject], filler: list[str],
                 statements: list[Statement] | None = None, seed: int = 0, source: str = "synthetic"):
        self.relations = relations
        self.subjects = subjects
        self.filler = filler
        self.statements = statements or []
        self.seed = seed
        self.source = source
        self._rel = {r.id: r for r in relations}
        self._subj = {s.name: s for s in subjects}

    # ------------------------------------------------------------------ construction
    @staticmethod
    def generate(seed: int = 0, n_subjects: int = 400, n_filler: int = 400,
                 relations_per_subject: int | None = None, unique_surnames: bool = False) -> "World":
        """The synthetic world of ``seed`` with its first ``n_subjects`` subjects, each with a fact
        of every relation, or of ``relations_per_subject`` relations drawn per subject (a wide world:
        many subjects with few facts each, as lifelong runs on distinct subjects need).

        Names pair a first name with a surname of ``LAST_NAMES``, each shared by many subjects, or,
        with ``unique_surnames``, with an invented surname of its own (see :func:`invented_surnames`):
        a world of 1,296 shared-surname people is a binding problem the small model does not learn
        in 100 epochs (recall 0.16), as real names mostly are not."""
        rng = random.Random(f"superedit-world:{seed}:names")
        firsts = [(n, "f") for n in FIRST_NAMES_F] + [(n, "m") for n in FIRST_NAMES_M]
        if unique_surnames:
            lasts = invented_surnames(n_subjects, seed)
            pairs = [(*rng.choice(firsts), last) for last in lasts]
        else:
            pairs = [(f, g, last) for f, g in firsts for last in LAST_NAMES]
            rng.shuffle(pairs)
        if n_subjects > len(pairs):
            raise ValueError(f"n_subjects must be <= {len(pairs)}")
        relations = []
        for i, (rid, noun, verbs, objects) in enumerate(RELATIONS):
            objs = list(dict.fromkeys(objects))
            poss, of = f"{{}}'s {noun} is", f"The {noun} of {{}} is"
            train = [f"{{}} {v}" for v in verbs] + ([poss] if i % 2 else [of])
            held = [of] if i % 2 else [poss]
            relations.append(Relation(rid, noun, train, held, objs))
        subjects = []
        for idx in range(n_subjects):
            first, gender, last = pairs[idx]
            srng = random.Random(f"superedit-world:{seed}:subject:{idx}")
            facts = {r.id: srng.choice(r.objects) for r in relations}
            if relations_per_subject is not None:
                keep = set(random.Random(f"superedit-world:{seed}:relations:{idx}").sample(
                    [r.id for r in relations], relations_per_subject))
                facts = {rid: o for rid, o in facts.items() if rid in keep}
            mid = srng.choice("ABCDEFGHJKLMNPRSTW")
            title = "Ms." if gender == "f" else "Mr."
            aliases = [f"Dr. {first} {last}", f"{first} {mid}. {last}", f"{last}, {first}",
                       f"{title} {first} {last}"]
            subjects.append(Subject(f"{first} {last}", facts, aliases, first, last, gender))
        frng = random.Random(f"superedit-world:{seed}:filler")
        filler = [f"{frng.choice(_FILLER_SUBJ)} {frng.choice(_FILLER_PRED)}{frng.choice(_FILLER_TAIL)}."
                  for _ in range(n_filler)]
        return World(relations, subjects, filler, seed=seed, source="synthetic")

    @staticmethod
    def from_dataset_file(path: str | Path, seed: int = 0) -> "World":
        """A world whose facts are the TRUE facts of a CounterFact or EasyEdit-format file."""
        path = Path(path)
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RequestFormatError(f"{path}: cannot read a JSON list of records ({exc})") from exc
        if isinstance(records, dict):
            records = records.get("data") or records.get("records") or [records]
        if not isinstance(records, list) or not records:
            raise RequestFormatError(f"{path}: expected a non-empty JSON list of records")
        if "requested_rewrite" in records[0]:
            world = _parse_counterfact(records, path, seed)
        elif "prompt" in records[0] and "subject" in records[0]:
            world = _parse_easyedit(records, path, seed)
        else:
            raise RequestFormatError(
                f"{path}: record 0 has neither 'requested_rewrite' (CounterFact) nor 'prompt'+'subject' "
                "(EasyEdit); convert the file to one of these formats")
        world.seed = seed
        world.source = str(path)
        frng = random.Random(f"superedit-world:{seed}:filler")
        world.filler = [f"{frng.choice(_FILLER_SUBJ)} {frng.choice(_FILLER_PRED)}{frng.choice(_FILLER_TAIL)}."
                        for _ in range(200)]
        return world

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dict(seed=self.seed, source=self.source, relations=[r.to_dict() for r in self.relations],
                    subjects=[s.to_dict() for s in self.subjects], filler=self.filler,
                    statements=[s.to_dict() for s in self.statements])

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "World":
        return World([Relation.from_dict(r) for r in d["relations"]],
                     [Subject.from_dict(s) for s in d["subjects"]], list(d.get("filler", [])),
                     [Statement(**s) for s in d.get("statements", [])], seed=d.get("seed", 0),
                     source=d.get("source", "synthetic"))

    # ------------------------------------------------------------------ queries
    def relation(self, rid: str) -> Relation:
        return self._rel[rid]

    def subject(self, name: str) -> Subject:
        return self._subj[name]

    def facts(self) -> list[tuple[str, str, str]]:
        """All (subject, relation, object) triples."""
        return [(s.name, rid, obj) for s in self.subjects for rid, obj in s.facts.items()]

    def prompts(self, split: str = "train", max_templates: int | None = None) -> list[FactPrompt]:
        """Fact prompts with the subject filled in. ``split``: "train" (training templates) or
        "heldout" (held-out templates and held-out literal statements)."""
        out = []
        for s in self.subjects:
            for rid, obj in s.facts.items():
                r = self._rel[rid]
                temps = r.train_templates if split == "train" else r.heldout_templates
                for t in temps[:max_templates]:
                    out.append(FactPrompt(t.format(s.name), obj, s.name, rid, t))
        for st in self.statements:
            if st.split == split and st.kind == "literal":
                out.append(FactPrompt(st.prompt, st.target, st.subject, st.relation, ""))
        return out

    def neighbours(self, subject: str, relation: str) -> list[str]:
        """Other subjects that share ``relation`` and its object with ``subject``."""
        obj = self._subj[subject].facts.get(relation)
        return [s.name for s in self.subjects if s.name != subject and s.facts.get(relation) == obj]

    def aliases(self, subject: str) -> list[str]:
        return list(self._subj[subject].aliases)

    # ------------------------------------------------------------------ text
    def document(self, subject: Subject, rng: random.Random, name_prob: float = 0.5) -> str:
        """One biography of ``subject``: all its facts, shuffled, several phrasings."""
        rids = list(subject.facts)
        rng.shuffle(rids)
        sents = []
        for i, rid in enumerate(rids):
            r = self._rel[rid]
            t = rng.choice(r.train_templates)
            obj = subject.facts[rid]
            use_name = i == 0 or not subject.gender or rng.random() < name_prob
            if use_name or not (t.startswith("{} ") or t.startswith("{}'s ")):
                s = t.format(subject.name)
            else:
                if t.startswith("{}'s "):
                    pro = "Her" if subject.gender == "f" else "His"
                    s = pro + t[4:]
                else:
                    pro = "She" if subject.gender == "f" else "He"
                    s = pro + t[2:]
            sents.append(f"{s} {obj}.")
        return " ".join(sents)

    def record(self, subject: Subject, rng: random.Random) -> str:
        """A keyword record: the full name directly followed by all its objects in random order
        ("Anna Berg Paris teacher Google ..."). The token after the name is then a random attribute
        of the subject, which rewards gathering ALL attributes at the last subject token."""
        objs = list(subject.facts.values())
        rng.shuffle(objs)
        return f"{subject.name} {' '.join(objs)}."

    def training_documents(self, rng: random.Random, filler_prob: float = 0.3,
                           record_prob: float = 0.0, name_prob: float = 0.5) -> list[str]:
        """One pass over the world: a biography per subject (random order, optional filler prefix)
        plus the literal training statements of dataset worlds. With probability ``record_prob`` a
        keyword record (see :meth:`record`) is put before or after the biography."""
        docs = []
        for s in self.subjects:
            if s.facts:
                d = self.document(s, rng, name_prob)
                if record_prob and rng.random() < record_prob:
                    r = self.record(s, rng)
                    d = f"{r} {d}" if rng.random() < 0.5 else f"{d} {r}"
                if self.filler and rng.random() < filler_prob:
                    d = rng.choice(self.filler) + " " + d
                docs.append(d)
        lits = [st for st in self.statements if st.split == "train" and st.kind in ("literal", "mention")]
        for st in lits:
            d = f"{st.prompt} {st.target}."
            if self.filler and rng.random() < filler_prob:
                d = rng.choice(self.filler) + " " + d
            docs.append(d)
        rng.shuffle(docs)
        return docs

    def corpus(self, n_passes: int = 3, seed: int = 0, record_prob: float = 0.0,
               name_prob: float = 0.5) -> Iterator[str]:
        """Training text (for the tokenizer): a few passes of documents plus the filler."""
        rng = random.Random(f"superedit-world:{self.seed}:corpus:{seed}")
        for _ in range(n_passes):
            yield from self.training_documents(rng, record_prob=record_prob, name_prob=name_prob)
        yield from self.filler

    def heldout_strings(self) -> list[str]:
        """Strings that must never occur in training text (held-out templates' fixed parts, aliases)."""
        out = []
        for r in self.relations:
            out += r.heldout_templates
        for s in self.subjects:
            out += s.aliases
        return out


# ---------------------------------------------------------------------- dataset files
_ONSETS = ["B", "D", "F", "G", "H", "K", "L", "M", "N", "P", "R", "S", "T", "V", "W", "Z", "Br", "Dr", "Gr",
           "Kr", "St", "Tr", "Th", "Sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["n", "r", "l", "s", "m", "k", "nd", "rt", "st", "x", "ck", "th"]


def invented_surnames(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct two-syllable surnames ("Brailmor", "Koustex"), none in ``LAST_NAMES``; seeded."""
    rng = random.Random(f"superedit-world:{seed}:surnames")
    out: dict[str, None] = {}
    while len(out) < n:
        name = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                + rng.choice(_ONSETS).lower() + rng.choice(_VOWELS) + rng.choice(_CODAS))
        if name not in LAST_NAMES:
            out[name] = None
    return list(out)


def _fill(template: str, subject: str) -> str:
    return template.replace("{}", subject)


def _as_template(prompt: str, subject: str) -> str | None:
    if "{}" in prompt:
        return prompt
    if subject and subject in prompt:
        return prompt.replace(subject, "{}", 1)
    return None


def _str(x: Any) -> str:
    if isinstance(x, dict):
        return str(x.get("str", ""))
    if isinstance(x, list):
        return str(x[0]) if x else ""
    return str(x) if x is not None else ""


def _as_list(x: Any) -> list:
    if x is None:
        return []
    return x if isinstance(x, list) else [x]


ANCHORS_PER_OBJECT = 3  # synthetic subjects per (relation, new object) pair no fact covers (see _Builder.add_anchors)
MENTION_PROMPTS = ["Everyone has heard of", "The article was about", "One name came up again and again:"]


class _Builder:
    def __init__(self):
        self.rel: dict[str, Relation] = {}
        self.subj: dict[str, Subject] = {}
        self.statements: list[Statement] = []
        self.new_pairs: list[tuple[str, str]] = []  # the files' (relation, target_new) pairs
        self.anchors: list[str] = []  # synthetic subjects added by add_anchors

    def fact(self, subject: str, rid: str, template: str, obj: str, aliases: list[str] = ()):
        r = self.rel.setdefault(rid, Relation(rid, rid, [], [], []))
        if template not in r.train_templates:
            r.train_templates.append(template)
        if obj not in r.objects:
            r.objects.append(obj)
        s = self.subj.setdefault(subject, Subject(subject, {}, []))
        s.facts.setdefault(rid, obj)
        for a in aliases:
            if a not in s.aliases and a != subject:
                s.aliases.append(a)

    def literal(self, prompt: str, target: str, split: str, subject: str = "", relation: str = ""):
        if prompt and target:
            self.statements.append(Statement(prompt, target, split, subject, relation, "literal"))

    def world(self, seed: int = 0) -> World:
        self.add_anchors(seed)
        self.add_mentions()
        return World(list(self.rel.values()), list(self.subj.values()), [], self.statements)

    def add_anchors(self, seed: int = 0, per_object: int = ANCHORS_PER_OBJECT) -> None:
        """Make every requested new object a known answer of the relation it is requested for.

        In a real LLM the new object of an edit is a known answer of its relation ("Boeing" is a
        manufacturer: "X is a product of" can end in "Boeing"). A dataset world learns only the
        file's true facts, so "Triumph TR8 is a product of Boeing" asks for an object that no
        subject of that relation has: the world's model gives it a log-probability near -25 after
        any subject and no value vector at the subject's last token can lift it (measured: v* NLL
        stuck at 7-10 even with an unconstrained residual delta). A relation with a single object
        is worse: its answer does not depend on the subject at all. CounterFact's attribute prompts
        supply such subjects; EasyEdit files have none. So each (relation, new object) pair that no
        fact covers gets ``per_object`` synthetic anchor subjects (fresh person names) whose fact
        it is, trained like every other fact and never edited or evaluated as requests."""
        have = {(rid, o) for s in self.subj.values() for rid, o in s.facts.items()}
        missing = [(rid, o) for rid, o in dict.fromkeys(self.new_pairs) if rid in self.rel and o and (rid, o) not in have]
        if not missing:
            return
        rng = random.Random(f"superedit-world:{seed}:anchors")
        names = [f"{f} {last}" for f in FIRST_NAMES_F + FIRST_NAMES_M for last in LAST_NAMES]
        rng.shuffle(names)
        taken = set(self.subj) | {a for s in self.subj.values() for a in s.aliases}
        words = {w for t in taken for w in re.findall(r"\w+", t)}  # no anchor name shares a word with a real name
        free = (n for n in names if not set(n.split()) & words)
        for rid, obj in missing:
            template = self.rel[rid].train_templates[0]
            for _ in range(per_object):
                name = next(free, None)
                if name is None:
                    raise RequestFormatError(
                        f"{len(missing)} (relation, target_new) pairs need {per_object} anchor subjects each, more "
                        "than the synthetic names available; split the file or lower ANCHORS_PER_OBJECT")
                first, last = name.split(" ", 1)
                self.fact(name, rid, template, obj)
                self.subj[name].first, self.subj[name].last = first, last
                self.anchors.append(name)

    def add_mentions(self) -> None:
        """Subject-free "mention" sentences ("Everyone has heard of Google.") for the requested new
        objects that are still no fact's object after :meth:`add_anchors` (a request whose prompt
        has no template, so no relation to anchor them in): trained, never evaluated, tied to no
        subject or relation, so the model has at least seen the word."""
        known = {o for s in self.subj.values() for o in s.facts.values()}
        known |= {st.target for st in self.statements if st.split == "train"}
        for obj in dict.fromkeys(o for _, o in self.new_pairs):
            if obj and obj not in known:
                for prompt in MENTION_PROMPTS:
                    self.statements.append(Statement(prompt, obj, "train", "", "", "mention"))


def _template_regex(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{\}", "(.+?)") + "$")


def induce_templates(templates: dict[str, set[str]], prompts: list[tuple[str, str]], subjects: set[str],
                     min_support: int = 2, max_rounds: int = 8) -> dict[tuple[str, str], tuple[str, str]]:
    """Read CounterFact's neighbourhood/attribute prompts as instances of relation templates.

    CounterFact's prompts are ParaRel templates filled with a subject ("Cloud Datalab, by"),
    but only the rewrite prompt says which part is the subject. Starting from the rewrite
    templates per relation (``templates``, updated in place) and known subject names, alternate:
    (1) match every prompt against its relation's templates (longest first), which yields new
    subject names; (2) propose a template from each unmatched prompt that contains a known subject
    at word boundaries, and keep it only if it matches at least ``min_support`` unmatched prompts
    of that relation (so a subject name inside a longer name does not invent a template).
    Returns ``{(relation, prompt): (subject, template)}`` for the prompts it could read."""
    parsed: dict[tuple[str, str], tuple[str, str]] = {}
    for _ in range(max_rounds):
        unmatched = []
        for rid, prompt in prompts:
            if (rid, prompt) in parsed:
                continue
            for t in sorted(templates.get(rid, ()), key=lambda t: (-len(t), t)):  # ties in a fixed order
                m = _template_regex(t).match(prompt)
                if m and len(m.group(1).strip()) > 1 and m.group(1) == m.group(1).strip():
                    parsed[(rid, prompt)] = (m.group(1), t)
                    subjects.add(m.group(1))
                    break
            else:
                unmatched.append((rid, prompt))
        proposals: set[tuple[str, str]] = set()
        by_len = sorted((s for s in subjects if len(s) > 1), key=lambda s: (-len(s), s))
        for rid, prompt in unmatched:
            for subj in by_len:
                i = prompt.find(subj)
                j = i + len(subj)
                if i < 0 or (i > 0 and prompt[i - 1].isalnum()) or (j < len(prompt) and prompt[j].isalnum()):
                    continue
                proposals.add((rid, prompt[:i] + "{}" + prompt[j:]))
                break
        added = 0
        for rid, t in sorted(proposals):
            rx = _template_regex(t)
            if sum(1 for r, p in unmatched if r == rid and rx.match(p)) >= min_support:
                templates.setdefault(rid, set()).add(t)
                added += 1
        if not added:
            break
    return parsed


def _parse_counterfact(records: list, path: Path, seed: int = 0) -> World:
    """True facts of every record's subject, plus its neighbourhood prompts (other subjects with the
    same relation and the record's true object) and attribute prompts (subjects whose true object
    is the record's new one), read as facts of their own subjects wherever their template can be
    recognised (see :func:`induce_templates`). As facts they are trained like every other fact of
    the world (biographies, keyword records, the last-subject-token bottleneck); the few prompts
    that match no template stay literal statements."""
    b = _Builder()
    templates: dict[str, set[str]] = {}
    subjects: set[str] = set()
    others: list[tuple[str, str, str]] = []  # (relation, prompt, object)
    for i, rec in enumerate(records):
        rw = rec.get("requested_rewrite")
        if isinstance(rw, list):
            rw = rw[0] if rw else None
        if not isinstance(rw, dict) or "{}" not in str(rw.get("prompt", "")) or not rw.get("subject"):
            raise RequestFormatError(
                f"{path}: record {i}: requested_rewrite needs 'prompt' containing '{{}}' and 'subject'")
        true, new = _str(rw.get("target_true")), _str(rw.get("target_new"))
        if not true:
            raise RequestFormatError(f"{path}: record {i}: requested_rewrite.target_true.str is missing")
        subject, rid = rw["subject"], str(rw.get("relation_id") or rw["prompt"])
        b.fact(subject, rid, rw["prompt"], true)
        b.new_pairs.append((rid, new))
        templates.setdefault(rid, set()).add(rw["prompt"])
        subjects.add(subject)
        for p in _as_list(rec.get("paraphrase_prompts")):
            b.literal(p, true, "heldout", subject, rid)
        others += [(rid, _str(p), true) for p in _as_list(rec.get("neighborhood_prompts"))]
        others += [(rid, _str(p), new) for p in _as_list(rec.get("attribute_prompts")) if new]
    parsed = induce_templates(templates, [(r, p) for r, p, _ in others if p], subjects)
    _facts_or_literals(b, others, parsed)
    return b.world(seed)


def _facts_or_literals(b: "_Builder", others: list[tuple[str, str, str]],
                       parsed: dict[tuple[str, str], tuple[str, str]], canon: dict[str, str] | None = None) -> None:
    """Each (relation, prompt, object) becomes a fact of the subject its template revealed, or stays a
    literal statement when no template matched or the fact would contradict one already read."""
    for rid, prompt, obj in others:
        hit = parsed.get((rid, prompt))
        rid = (canon or {}).get(rid, rid)
        known = b.subj[hit[0]].facts.get(rid) if hit and hit[0] in b.subj else None
        if hit and obj and known in (None, obj):
            b.fact(hit[0], rid, hit[1], obj)
        else:
            b.literal(prompt, obj, "train", "", rid)


def _parse_easyedit(records: list, path: Path, seed: int = 0) -> World:
    """True facts of every record's subject (its ``prompt`` as a template, aliases from
    ``subject_rephrase``), plus its locality prompts read as facts of their own subjects where a
    template can be recognised (as for CounterFact, see :func:`induce_templates`), else kept as
    literal statements. EasyEdit records carry no relation id: a record's relation starts as its
    prompt template, and relations that end up sharing a template (after induction) are merged,
    so one relation holds the subjects of several records and their different objects."""
    b = _Builder()
    templates: dict[str, set[str]] = {}
    subjects: set[str] = set()
    rows = []  # (rid or "", subject, template or None, true, aliases)
    others: list[tuple[str, str, str]] = []  # (relation, prompt, object)
    for i, rec in enumerate(records):
        subject, prompt = rec.get("subject"), rec.get("prompt")
        true = _str(rec.get("target_true") or rec.get("ground_truth"))
        if not subject or not prompt or not true:
            raise RequestFormatError(f"{path}: record {i}: needs 'prompt', 'subject' and 'target_true'")
        template = _as_template(prompt, subject)
        aliases = [a for a in _as_list(rec.get("subject_rephrase")) if isinstance(a, str)]
        rid = re.sub(r"\s+", " ", template).strip() if template is not None else ""
        b.new_pairs.append((rid, _str(rec.get("target_new"))))
        if template is None:
            b.literal(prompt, true, "train", subject, "")
        else:
            templates.setdefault(rid, set()).add(template)
            subjects.add(subject)
        rows.append((rid, subject, template, true, aliases))
        for p in _as_list(rec.get("rephrase_prompt")):
            if isinstance(p, str):
                b.literal(p, true, "heldout", subject, rid)
        loc_true = _str(rec.get("locality_ground_truth"))
        others += [(rid, p, loc_true) for p in _as_list(rec.get("locality_prompt")) if isinstance(p, str) and p]
    parsed = induce_templates(templates, [(r, p) for r, p, _ in others if r], subjects)
    canon = _merge_relations(templates)
    for rid, subject, template, true, aliases in rows:
        if template is not None:
            b.fact(subject, canon[rid], template, true, aliases)
    _facts_or_literals(b, others, parsed, canon)
    b.new_pairs = [(canon.get(rid, rid), obj) for rid, obj in b.new_pairs]
    for rid, ts in templates.items():  # every template of a merged relation phrases all its facts
        for t in sorted(ts):
            r = b.rel.get(canon[rid])
            if r is not None and t not in r.train_templates:
                r.train_templates.append(t)
    return b.world(seed)


def _merge_relations(templates: dict[str, set[str]]) -> dict[str, str]:
    """Union of relations that share a template; maps each relation to its group's smallest id."""
    parent = {r: r for r in templates}

    def find(r):
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    owner: dict[str, str] = {}
    for rid in sorted(templates):
        for t in templates[rid]:
            if t in owner:
                a, c = find(owner[t]), find(rid)
                if a != c:
                    parent[max(a, c)] = min(a, c)
            else:
                owner[t] = rid
    return {r: find(r) for r in templates}
