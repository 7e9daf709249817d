"""What the rest of superedit reads from a testbed directory: corpus, facts, default edit requests."""

from superedit.testbed import SHIPPED_DIR, load_world
from superedit.testbed import access


def test_default_edit_requests_distinct_subjects_first_and_seeded():
    world = load_world(SHIPPED_DIR)
    n_subj = len(world.subjects)
    reqs = access.default_edit_requests(SHIPPED_DIR, n_subj + 10, seed=0)
    assert len({r.subject for r in reqs[:n_subj]}) == n_subj  # one fact per subject before any repeat
    assert [r.case_id for r in access.default_edit_requests(SHIPPED_DIR, 20, seed=0)] == [r.case_id for r in reqs[:20]]
    assert [r.case_id for r in access.default_edit_requests(SHIPPED_DIR, 20, seed=1)] != [r.case_id for r in reqs[:20]]
    for r in reqs:
        assert r.target_new != r.target_true and world.subject(r.subject).facts[r.relation_id] == r.target_true
        assert r.paraphrase_prompts and r.subject_rephrases  # held-out templates and aliases come along


def test_true_facts_and_corpus():
    facts = access.true_facts(SHIPPED_DIR)
    world = load_world(SHIPPED_DIR)
    assert len(facts) == len(world.facts())
    corpus = access.testbed_corpus(SHIPPED_DIR)
    assert len(corpus) > len(world.subjects) and all(isinstance(t, str) and t for t in corpus)
    heldout = set(world.heldout_strings())
    assert not any(h in doc for doc in corpus[:300] for h in list(heldout)[:50])  # held-out text stays out


def test_builtin_spec_and_plain_directory_give_identical_logits():
    import torch

    from superedit.models import load_model

    a, b = load_model("builtin"), load_model(str(SHIPPED_DIR))
    assert a.family == b.family == "gpt2" and a.revision == b.revision
    enc = a.tokenizer(["Anna Berg was born in", "The museum was quiet"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(a.model(**enc).logits, b.model(**enc).logits)


def test_testbed_requests_name_their_neighbours_so_a_stream_scores_only_unedited_ones():
    """Each neighbourhood prompt's subject is in the request's meta; a lifelong stream that edits a
    neighbour on the same relation leaves that prompt out (its answer is meant to change)."""
    from superedit.lifelong.runner import unedited_neighbours

    world = load_world(SHIPPED_DIR)
    reqs = access.default_edit_requests(SHIPPED_DIR, None, seed=0)
    for r in reqs[:50]:
        subjects = r.meta["neighborhood_subjects"]
        assert len(subjects) == len(r.neighborhood_prompts) and r.subject not in subjects
        for s, p, a in zip(subjects, r.neighborhood_prompts, r.neighborhood_answers):
            assert p == r.prompt.replace("{}", s) and world.subject(s).facts[r.relation_id] == a
    r = next(r for r in reqs if len(r.meta["neighborhood_subjects"]) >= 2)
    edited_neighbour = r.meta["neighborhood_subjects"][0]
    stream = [r] + [q for q in reqs if q.subject == edited_neighbour and q.relation_id == r.relation_id]
    assert len(stream) == 2
    kept = unedited_neighbours([r], stream)[0]
    assert kept.meta["neighborhood_subjects"] == r.meta["neighborhood_subjects"][1:]
    assert kept.neighborhood_prompts == r.neighborhood_prompts[1:]
    # a stream that edits the neighbour on ANOTHER relation keeps the prompt
    other = [q for q in reqs if q.subject == edited_neighbour and q.relation_id != r.relation_id][:1]
    assert unedited_neighbours([r], [r] + other)[0].neighborhood_prompts == r.neighborhood_prompts
