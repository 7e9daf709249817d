"""Family table, adapter, loading and the hook primitive on tiny random models of every family."""

import pytest
import torch

from helpers import tiny_model
from superedit.errors import ModelNotFoundError, UnsupportedFamilyError
from superedit.models import FAMILY_TABLE, ModelAdapter, StopForward, Trace, encode_prompts, family_of, load_model
from superedit.models.hooks import add_at_positions, at_positions

PROMPTS = ["The Eiffel Tower is located in", "Anna Berg was born in"]


def _batch(adapter):
    enc = adapter.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_table_covers_required_families():
    assert {"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma3_text"} <= set(FAMILY_TABLE)


def test_site_shapes(adapter):
    batch = _batch(adapter)
    n = adapter.n_layers
    reads = [(s, l) for s in ("resid", "attn", "key", "value") for l in range(n)]
    with Trace(adapter, reads=reads) as tr:
        adapter.model(**batch)
    b, t = batch["input_ids"].shape
    for l in range(n):
        assert tr["key", l].shape == (b, t, adapter.d_mlp)
        assert tr["value", l].shape == (b, t, adapter.d_model)
        assert tr["attn", l].shape == (b, t, adapter.d_model)
        assert tr["resid", l].shape == (b, t, adapter.d_model)
    assert adapter.down_weight(0).shape == (adapter.d_model, adapter.d_mlp)


def test_value_equals_down_projection_of_key(adapter):
    batch = _batch(adapter)
    layer = adapter.n_layers // 2
    with Trace(adapter, reads=[("key", layer), ("value", layer)]) as tr:
        adapter.model(**batch)
    k, v = tr["key", layer], tr["value", layer]
    expected = k @ adapter.down_weight(layer).T
    bias = getattr(adapter.down_proj(layer), "bias", None)
    if bias is not None:
        expected = expected + bias
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-6)


def test_last_resid_matches_hidden_states(adapter):
    batch = _batch(adapter)
    with Trace(adapter, reads=[("resid", 0)]) as tr:
        out = adapter.model(**batch, output_hidden_states=True)
    torch.testing.assert_close(tr["resid", 0], out.hidden_states[1])


def test_final_norm_and_head_reproduce_the_logits(adapter):
    """Every module path of the family table resolves, and head(norm(last resid)) = the model's logits."""
    assert adapter.embedding() is adapter.model.get_input_embeddings()
    assert adapter.lm_head() is adapter.model.get_output_embeddings()
    ids = torch.randint(0, 50, (2, 7))
    with Trace(adapter, reads=[("resid", adapter.n_layers - 1)]) as tr:
        logits = adapter.model(input_ids=ids).logits
    again = adapter.lm_head()(adapter.final_norm()(tr["resid", adapter.n_layers - 1]))
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-4)


def test_hooks_removed_on_exit_and_on_exception(adapter):
    batch = _batch(adapter)
    before = _n_hooks(adapter.model)
    with Trace(adapter, reads=[("key", 0), ("resid", 1)], edits={("value", 1): lambda t: t}):
        assert _n_hooks(adapter.model) > before
        adapter.model(**batch)
    assert _n_hooks(adapter.model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with Trace(adapter, reads=[("key", 0)], edits={("attn", 1): lambda t: (_ for _ in ()).throw(RuntimeError("boom"))}):
            adapter.model(**batch)
    assert _n_hooks(adapter.model) == before


def test_early_stop_really_stops(adapter):
    batch = _batch(adapter)
    ran = []
    handles = [adapter.block(l).register_forward_hook(lambda m, a, o, l=l: ran.append(l)) for l in range(adapter.n_layers)]
    try:
        with Trace(adapter, reads=[("key", 1)], stop_after=True) as tr:
            adapter.model(**batch)
            pytest.fail("the forward pass should have been stopped")
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]  # block 1 raised inside its MLP: it never finished, blocks 2.. never ran
    assert tr["key", 1].shape[-1] == adapter.d_mlp
    assert issubclass(StopForward, Exception)


def test_edits_patch_the_forward(adapter):
    batch = _batch(adapter)
    clean = adapter.model(**batch).logits
    with Trace(adapter, edits={("value", 1): lambda t: t}):
        same = adapter.model(**batch).logits
    torch.testing.assert_close(clean, same)
    zero = torch.zeros(adapter.d_model)
    with Trace(adapter, edits={("resid", 0): at_positions(1, zero)}, reads=[("resid", 0)]) as tr:
        patched = adapter.model(**batch).logits
    assert torch.all(tr["resid", 0][:, 1] == 0)
    assert not torch.allclose(patched[:, 1:], clean[:, 1:])
    torch.testing.assert_close(patched[:, 0], clean[:, 0])  # causal: position 0 untouched
    delta = torch.zeros(adapter.d_mlp, requires_grad=True)
    with Trace(adapter, edits={("key", 2): add_at_positions([2, 3], delta)}):
        loss = adapter.model(**batch).logits.sum()
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_weight_add_and_revert_exact(adapter):
    layer = 1
    w0 = adapter.down_weight_param(layer).detach().clone()
    delta = torch.randn(adapter.d_model, adapter.d_mlp)
    adapter.add_to_down_weight(layer, delta)
    torch.testing.assert_close(adapter.down_weight(layer), (w0.T if adapter.spec.down_orientation == "in_out" else w0) + delta)
    adapter.set_down_weight(layer, w0.T if adapter.spec.down_orientation == "in_out" else w0)
    assert torch.equal(adapter.down_weight_param(layer), w0)


def test_layer_out_of_range(adapter):
    with pytest.raises(IndexError, match="out of range"):
        Trace(adapter, reads=[("key", adapter.n_layers)])


def test_unknown_family_names_the_table():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2,
                               vocab_size=50, word_embed_proj_dim=16)
    with pytest.raises(UnsupportedFamilyError, match="FAMILY_TABLE.*opt|opt.*FAMILY_TABLE"):
        family_of(cfg)
    with pytest.raises(UnsupportedFamilyError, match="FAMILY_TABLE"):
        ModelAdapter(model=AutoModelForCausalLM.from_config(cfg), tokenizer=None)


@pytest.mark.parametrize("fam", ["gpt2", "llama", "gemma3_text"])
def test_load_model_from_directory(tmp_path, fam):
    model, tok = tiny_model(fam)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    adapter = load_model(str(tmp_path))
    assert adapter.family == fam
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    torch.testing.assert_close(adapter.model(**enc).logits, model(**enc).logits)
    assert adapter.revision.startswith("local-")


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_encode_prompts_with_trace_reads_subject_keys(adapter):
    b = encode_prompts(adapter.tokenizer, ["{} was born in", "I think {} works as a"], ["Anna Berg", "Toko Yasuda"],
                       padding_side="right")
    with Trace(adapter, reads=[("key", 0)], stop_after=True) as tr:
        adapter.model(**b.model_inputs())
    rows = torch.arange(2)
    keys = tr["key", 0][rows, torch.tensor(b.subject_last)]
    assert keys.shape == (2, adapter.d_mlp)
