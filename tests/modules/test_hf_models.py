import pytest
import torch

from modules.hf_models import TINY_PRESETS, build_causal_lm, build_config, max_positions


@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_presets_build(preset):
    model = build_causal_lm(preset, vocab_size=512)
    assert model.get_input_embeddings().num_embeddings == 512
    assert max_positions(model.config) >= 256


def test_config_dict_and_errors(monkeypatch):
    model = build_causal_lm({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64})  # fmt: skip
    assert model.config.hidden_size == 16
    with pytest.raises(ValueError, match="model_type"):
        build_config({"hidden_size": 16})
    with pytest.raises(ValueError, match="not-a-family"):
        build_config({"model_type": "not-a-family"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        build_causal_lm("no/such-model")
    with pytest.raises(ValueError, match="dtype"):
        build_causal_lm("micro-llama", dtype="float8")


def test_local_directory_roundtrip(tmp_path):
    model = build_causal_lm("micro-llama", vocab_size=128)
    model.save_pretrained(tmp_path)
    loaded = build_causal_lm(str(tmp_path))
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert (a == b).all(), name


def test_conv1d_to_linear_keeps_gpt2_outputs_and_uses_linear_layout():
    from transformers.pytorch_utils import Conv1D

    from modules.hf_models import conv1d_to_linear

    torch.manual_seed(0)
    net = build_causal_lm({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4,
                           "n_positions": 16}, vocab_size=50)  # fmt: skip
    net.eval()
    ids = torch.randint(50, (2, 16))
    before = net(input_ids=ids).logits
    n_params = sum(p.numel() for p in net.parameters())
    assert conv1d_to_linear(net) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert not any(isinstance(m, Conv1D) for m in net.modules())
    attn = net.transformer.h[0].attn.c_attn
    assert isinstance(attn, torch.nn.Linear) and attn.weight.shape == (3 * 32, 32)  # [out, in]
    assert sum(p.numel() for p in net.parameters()) == n_params
    torch.testing.assert_close(net(input_ids=ids).logits, before, rtol=0, atol=1e-5)


def test_tokenizer_ids_replace_a_presets_and_fill_a_dicts():
    """A preset's ids are the project tokenizer's: another tokenizer's replace them (one it
    lacks becomes None); a config dict's explicit ids are kept, its missing ones filled."""
    char_ids = {"eos_token_id": 1, "pad_token_id": 0}  # the federated character vocabulary
    preset = build_config("micro-llama", vocab_size=98, special_ids=char_ids)
    assert (preset.bos_token_id, preset.eos_token_id, preset.pad_token_id) == (None, 1, 0)
    kept = build_config("micro-llama", vocab_size=98)  # no tokenizer given: the preset's ids
    assert (kept.bos_token_id, kept.eos_token_id, kept.pad_token_id) == (0, 0, 1)
    spec = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 2, "eos_token_id": 5}
    filled = build_config(spec, vocab_size=98, special_ids=char_ids)
    assert (filled.eos_token_id, filled.pad_token_id) == (5, 0)
