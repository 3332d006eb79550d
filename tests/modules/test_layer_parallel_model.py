"""Layer parallelism on real (tiny, random) Hugging Face Llama models: exactness, cache, undo."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from modules.hf_models import build_causal_lm
from modules.layer_parallel_model import (
    LPPairFused,
    LPPairReference,
    apply_layer_parallelism,
    layer_block_influence,
    num_sequential_layers,
    sequential_layers,
    undo_layer_parallelism,
)
from ops.layer_parallel import LayerParallelPlan, block_influence

TOL = 1e-5  # spec acceptance 1: fused vs reference, fp32, max abs logit difference
PLAN = {"start": 2, "end": 6}


def _tiny(attn: str = "sdpa", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = {
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "tie_word_embeddings": True,
    }  # fmt: skip
    cfg.update(overrides)
    model = build_causal_lm(cfg, attn_implementation=attn).eval()
    with torch.no_grad():  # non-trivial norm gains so that folding is really exercised
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _lp(model, plan=PLAN, **kw):
    return apply_layer_parallelism(copy.deepcopy(model), plan, **kw)


def _ids(batch=2, length=12, vocab=256, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _decode(model, ids, prompt_len):
    """Logits of a prompt prefill followed by one-token cached decode steps."""
    out = model(ids[:, :prompt_len], use_cache=True)
    logits, cache = [out.logits], out.cache
    for t in range(prompt_len, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.cache
    return torch.cat(logits, dim=1), cache


@torch.no_grad()
def test_empty_plan_is_bit_identical():
    model, ids = _tiny(), _ids()
    base = model(ids).logits
    for mode in ("fused", "reference"):
        lp = _lp(model, None, mode=mode)
        assert num_sequential_layers(lp) == 8
        assert torch.equal(lp(ids).logits, base)


@torch.no_grad()
def test_undo_restores_the_original_model_bit_identically():
    model, ids = _tiny(), _ids()
    base, state = model(ids).logits, model.state_dict()
    for mode in ("fused", "reference"):
        apply_layer_parallelism(model, PLAN, mode=mode)
        assert not torch.equal(model(ids).logits, base)
        undo_layer_parallelism(model)
        assert model.layer_parallel is None
        assert torch.equal(model(ids).logits, base)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("plan", [{"start": 2, "end": 6}, [[0, 1]], [[1, 2], [5, 6]]])
def test_depth_is_L_minus_delta_over_2(plan):
    lp = _lp(_tiny(), plan)
    parsed = LayerParallelPlan.parse(plan)
    assert num_sequential_layers(lp) == 8 - parsed.delta // 2 == parsed.effective_depth(8)
    assert sum(isinstance(m, LPPairFused) for m in lp.model.layers) == len(parsed.pairs)
    assert lp.config.num_hidden_layers == 8  # the cache still has one entry per original layer


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [2, 4])  # 2: GQA (catches interleaved head order)
@torch.no_grad()
def test_fused_equals_reference_full_sequence(attn, kv_heads):
    model, ids = _tiny(attn, num_key_value_heads=kv_heads), _ids()
    ref = _lp(model, mode="reference")(ids).logits
    fused = _lp(model, mode="fused")(ids).logits
    assert (fused - ref).abs().max().item() <= TOL
    assert (ref - model(ids).logits).abs().max().item() > 1e-3  # LP really changes the function


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fused_equals_reference_and_full_sequence_in_cached_decode(attn):
    model, ids = _tiny(attn), _ids(length=12)
    prompt = 7  # > 1, so the prefill mask and 5 decode steps both need bottom-right alignment
    ref, fused = _lp(model, mode="reference"), _lp(model, mode="fused")
    ref_dec, _ = _decode(ref, ids, prompt)
    fused_dec, cache = _decode(fused, ids, prompt)
    assert (fused_dec - ref_dec).abs().max().item() <= TOL
    with torch.no_grad():
        full = fused(ids).logits
    assert (fused_dec - full).abs().max().item() <= TOL  # cached decode == full sequence under LP
    assert len(cache.layers) == 8
    assert all(layer.keys.shape[-2] == ids.shape[1] for layer in cache.layers)


def test_cache_entries_of_first_member_match_sequential_model():
    model, ids = _tiny(), _ids(length=10)
    _, seq_cache = _decode(model, ids, 6)
    _, lp_cache = _decode(_lp(model, mode="fused"), ids, 6)
    for idx in range(3):  # layers 0, 1 untouched and layer 2 = first member: same input x
        torch.testing.assert_close(lp_cache.layers[idx].keys, seq_cache.layers[idx].keys)
        torch.testing.assert_close(lp_cache.layers[idx].values, seq_cache.layers[idx].values)
    assert not torch.allclose(lp_cache.layers[4].keys, seq_cache.layers[4].keys)


@pytest.mark.parametrize("mode", ["fused", "reference"])
def test_generate_with_dynamic_cache_matches_manual_greedy(mode):
    lp, ids = _lp(_tiny(), mode=mode), _ids(batch=1, length=5)
    out = lp.generate(ids, max_new_tokens=6, do_sample=False, cache=DynamicCache(config=lp.config))
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, lp(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


@torch.no_grad()
def test_left_padded_batch_matches_unpadded_rows():
    lp = _lp(_tiny(), mode="fused")
    ids = _ids(batch=2, length=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 is left-padded by 3 tokens
    out = lp.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    alone = lp.generate(ids[:1, 3:], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 9:], alone[0, 6:])


def _set_zero(layer, *names):
    for name in names:
        sub, attr = name.split(".")
        getattr(getattr(layer, sub), attr).weight.zero_()


@pytest.mark.parametrize("zero_member", [0, 1])
@torch.no_grad()
def test_reduction_pair_with_a_silent_member_equals_sequential(zero_member):
    # Spec unit test 2: if one member's o_proj and down_proj are zero it adds nothing; the pair
    # then equals running both layers sequentially (both reduce to the other member).
    model, ids = _tiny(), _ids()
    _set_zero(model.model.layers[2 + zero_member], "self_attn.o_proj", "mlp.down_proj")
    for mode in ("fused", "reference"):
        got = _lp(model, [[2, 3]], mode=mode)(ids).logits
        assert (got - model(ids).logits).abs().max().item() <= TOL


@torch.no_grad()
def test_clone_identity_pair_equals_one_layer_with_doubled_outputs():
    # Spec unit test 3: pairing two identical layers == one layer whose o_proj and down_proj are
    # doubled (and the other layer removed, i.e. made silent).
    model, ids = _tiny(), _ids()
    layers = model.model.layers
    layers[3].load_state_dict(layers[2].state_dict())
    doubled = copy.deepcopy(model)
    dl = doubled.model.layers
    dl[2].self_attn.o_proj.weight.mul_(2)
    dl[2].mlp.down_proj.weight.mul_(2)
    _set_zero(dl[3], "self_attn.o_proj", "mlp.down_proj")
    for mode in ("fused", "reference"):
        got = _lp(model, [[2, 3]], mode=mode)(ids).logits
        assert (got - doubled(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("post", ["averaged", "rank_mixed"])
@torch.no_grad()
def test_code_faithful_post_norm_modes(post):
    model, ids = _tiny(), _ids()
    per_member = _lp(model, mode="reference")(ids).logits
    ref = _lp(model, mode="reference", post_norm_mode=post)(ids).logits
    fused = _lp(model, mode="fused", post_norm_mode=post)(ids).logits
    assert (fused - ref).abs().max().item() <= TOL
    assert (ref - per_member).abs().max().item() > 1e-4  # differs when N2_i != N2_j
    same = copy.deepcopy(model)
    for i, j in ((2, 3), (4, 5)):
        norm_j = same.model.layers[j].post_attention_layernorm.weight
        norm_j.copy_(same.model.layers[i].post_attention_layernorm.weight)
    a = _lp(same, mode="reference")(ids).logits
    b = _lp(same, mode="reference", post_norm_mode=post)(ids).logits
    assert (a - b).abs().max().item() <= TOL  # ... and coincides when N2_i == N2_j


@torch.no_grad()
def test_biases_fold_into_fused_projections():
    model, ids = _tiny(attention_bias=True, mlp_bias=True), _ids()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ref = _lp(model, mode="reference")(ids).logits
    assert (_lp(model, mode="fused")(ids).logits - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_mistral_is_accepted():
    model = build_causal_lm(
        {"model_type": "mistral", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    ).eval()  # fmt: skip
    ids = _ids(vocab=128)
    ref = _lp(model, [[1, 2]], mode="reference")(ids).logits
    assert (_lp(model, [[1, 2]], mode="fused")(ids).logits - ref).abs().max().item() <= TOL


def test_reference_mode_is_differentiable():
    lp = _lp(_tiny(), mode="reference")
    assert any(isinstance(m, LPPairReference) for m in lp.model.layers)
    ids = _ids()
    lp(ids, labels=ids).loss.backward()
    assert lp.model.layers[2].members[1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_clear_errors():
    model = _tiny()
    with pytest.raises(TypeError, match="model_type"):
        apply_layer_parallelism(build_causal_lm("tiny-gpt2"), PLAN)
    with pytest.raises(ValueError, match="odd length"):
        apply_layer_parallelism(copy.deepcopy(model), {"start": 2, "end": 5})
    with pytest.raises(ValueError, match="out of range"):
        apply_layer_parallelism(copy.deepcopy(model), {"start": 6, "end": 10})
    with pytest.raises(ValueError, match="overlaps"):
        apply_layer_parallelism(copy.deepcopy(model), [[2, 3], [3, 4]])
    with pytest.raises(ValueError, match="mode="):
        apply_layer_parallelism(copy.deepcopy(model), PLAN, mode="fast")
    lp = _lp(model)
    with pytest.raises(RuntimeError, match="already has layer parallelism"):
        apply_layer_parallelism(lp, PLAN)
    dropped = _lp(model, keep_originals=False)
    with pytest.raises(RuntimeError, match="keep_originals=False"):
        undo_layer_parallelism(dropped)


@pytest.mark.parametrize("mode", ["fused", "reference"])
@torch.no_grad()
def test_save_pretrained_of_an_lp_model_writes_the_sequential_model(mode, tmp_path):
    # The pair modules' keys (layers.<k>.members.<m>.*, shifted positions) would reload as a
    # different model with layers initialised at random.
    model, ids = _tiny(), _ids()
    lp = _lp(model, mode=mode)
    lp.save_pretrained(tmp_path)
    back = build_causal_lm(str(tmp_path)).eval()
    assert torch.equal(back(ids).logits, model(ids).logits)
    assert num_sequential_layers(lp) == 6  # still LP after saving
    copied = copy.deepcopy(lp)  # the override follows the copy, not the original
    copied.model.layers[0].mlp.down_proj.weight.zero_()
    copied.save_pretrained(tmp_path / "copy")
    reloaded = build_causal_lm(str(tmp_path / "copy")).eval()
    assert torch.equal(reloaded.model.layers[0].mlp.down_proj.weight, torch.zeros(64, 96))
    undo_layer_parallelism(lp)
    assert "save_pretrained" not in vars(lp)


@pytest.mark.parametrize("post", ["per_member", "rank_mixed"])
def test_fused_refuses_members_with_different_post_norm_eps(post):
    model = _tiny()
    model.model.layers[3].post_attention_layernorm.variance_epsilon = 0.1  # layer 2 keeps 1e-6
    with pytest.raises(ValueError, match=r"\(2, 3\): post_attention_layernorm.*0.1.*reference"):
        _lp(model, [[2, 3]], mode="fused", post_norm_mode=post)
    _lp(model, [[2, 3]], mode="reference", post_norm_mode=post)  # the reference path is exact


@torch.no_grad()
def test_averaged_post_norm_folds_with_different_eps():
    # `averaged` is defined with one norm using the smaller eps, so folding stays exact.
    model, ids = _tiny(), _ids()
    model.model.layers[3].post_attention_layernorm.variance_epsilon = 0.1
    ref = _lp(model, [[2, 3]], mode="reference", post_norm_mode="averaged")(ids).logits
    fused = _lp(model, [[2, 3]], mode="fused", post_norm_mode="averaged")(ids).logits
    assert (fused - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("mode", ["fused", "reference"])
@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
@torch.no_grad()
def test_per_layer_outputs_are_refused_under_lp(mode, flag):
    # HF records them from LlamaDecoderLayer / LlamaAttention calls: paired layers would be missing.
    lp, ids = _lp(_tiny("eager"), mode=mode), _ids()
    with pytest.raises(NotImplementedError, match=f"{flag}=True.*sequential_layers"):
        lp(ids, **{flag: True})
    lp.config.update({flag: True})  # the config default is read too
    with pytest.raises(NotImplementedError, match=flag):
        lp(ids)
    lp.config.update({flag: False})
    with sequential_layers(lp):  # the original layers run: capture is exact
        out = lp(ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 9 and len(out.attentions) == 8
    assert lp(ids).logits.shape == (2, 12, 256)


def test_training_through_fused_pairs_is_refused():
    lp, ids = _lp(_tiny(), [[2, 3]], mode="fused"), _ids()
    lp.train()
    with pytest.raises(RuntimeError, match=r"\(2, 3\) is fused.*mode='reference'"):
        lp(ids, labels=ids).loss.backward()
    with torch.no_grad():
        lp(ids)  # inference in train mode is fine
    for p in lp.model.layers[2].members.parameters():
        p.requires_grad_(False)
    lp(ids, labels=ids).loss.backward()  # frozen members: nothing is lost, other layers train
    assert lp.model.layers[3].mlp.down_proj.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_fused_uses_each_members_post_attention_norm_eps():
    # Every other test has all eps equal; here the post-attention norms differ from the input
    # norms, so a fused N2 that borrowed the input-norm eps would be off (by 0.07 in logits).
    model, ids = _tiny(), _ids()
    for k in (2, 3):
        model.model.layers[k].post_attention_layernorm.variance_epsilon = 0.5
    ref = _lp(model, [[2, 3]], mode="reference")(ids).logits
    fused = _lp(model, [[2, 3]], mode="fused")(ids).logits
    assert (fused - ref).abs().max().item() <= TOL


@torch.no_grad()
def test_layer_block_influence_compares_each_layers_input_and_output():
    model, ids = _lp(_tiny(), [[2, 3]]), _ids()
    influence = layer_block_influence(model, [ids])
    with sequential_layers(model):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(influence) == len(hidden) - 1 == 8
    for layer in range(7):  # hidden[-1] is after the final norm, not the last layer's output
        expected = block_influence(hidden[layer], hidden[layer + 1]).item()
        assert influence[layer] == pytest.approx(expected, abs=1e-6)
    assert min(influence) > 0  # not a layer compared with itself
