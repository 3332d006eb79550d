"""LoRATailClassifier: the precomputed prefix + tail equals the whole model; vmap grads exact.

Uses a tiny random Llama saved to a directory (the real SmolLM2 run is the experiment
``experiments/hyperinf_smollm2.py``); the code path (decoder layers called directly with rotary
embeddings and an explicit causal mask) is the same.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from datamodules.text_classification import SentimentNoisyDataModule
from modules.hf_models import build_causal_lm
from modules.llm_tail_classifier import LoRATailClassifier
from ops.per_sample_grads import per_sample_grads, select_params


@pytest.fixture(scope="module")
def data(tiny_llama_dir, tokenizer_dir):
    dm = SentimentNoisyDataModule(
        tokenizer=str(tokenizer_dir),
        n_train=12,
        n_val=4,
        frozen_prefix_model=str(tiny_llama_dir),
        tail_layers=2,
    )
    dm.setup("fit")
    ids = SentimentNoisyDataModule(
        tokenizer=str(tokenizer_dir), n_train=12, n_val=4, frozen_prefix_model=None
    )
    ids.setup("fit")
    return dm.train_dataset.tensors, ids.train_dataset.tensors["input_ids"]


def test_tail_on_prefix_states_equals_whole_model(tiny_llama_dir, data):
    tensors, input_ids = data
    clf = LoRATailClassifier(model=str(tiny_llama_dir), tail_layers=2, init_seed=0).eval()
    net = build_causal_lm(str(tiny_llama_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        last = net.model(input_ids=input_ids).last_hidden_state  # normed, no padding mask
        pooled = last[torch.arange(len(input_ids)), tensors["length"] - 1]
        expected = clf.head(pooled)
        got = clf(tensors["hidden"], tensors["length"])  # LoRA B = 0: the base tail
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_only_lora_and_head_train_and_vmap_grads_match_loop(tiny_llama_dir, data):
    tensors, _ = data
    clf = LoRATailClassifier(model=str(tiny_llama_dir), tail_layers=2, init_seed=0)
    assert all(m.training for m in clf.modules())  # from_pretrained's eval mode is undone
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n == "head.weight" for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 4  # q_proj, v_proj x 2 layers
    with torch.no_grad():  # move B off zero so the lora_A gradients are not trivially zero
        for n, p in clf.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    params = select_params(clf, ["lora_A", "lora_B", "head.weight"])
    batch = {k: v[:5] for k, v in tensors.items()}
    fast = per_sample_grads(clf, params, clf.per_sample_loss, batch, mode="vmap")
    slow = per_sample_grads(clf, params, clf.per_sample_loss, batch, mode="loop")
    for name in params:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6)
        assert fast[name].abs().sum() > 0


def test_a_left_padding_tokenizer_still_gives_right_padded_rows(tmp_path, tokenizer_dir):
    """Decoder-only tokenizers often ship ``padding_side: left``; the classifier pools the state
    at ``length - 1``, which must be the last real token."""
    import json
    import shutil

    left = tmp_path / "left_tokenizer"
    shutil.copytree(tokenizer_dir, left)
    config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    rows = {}
    for name, path in (("right", tokenizer_dir), ("left", left)):
        dm = SentimentNoisyDataModule(tokenizer=str(path), n_train=12, n_val=4,
                                      frozen_prefix_model=None)  # fmt: skip
        dm.setup("fit")
        rows[name] = dm.train_dataset.tensors
    torch.testing.assert_close(rows["left"]["input_ids"], rows["right"]["input_ids"])
    torch.testing.assert_close(rows["left"]["length"], rows["right"]["length"])


def test_the_tail_must_continue_the_datas_prefix(tiny_llama_dir, tokenizer_dir):
    from types import SimpleNamespace

    from modules.llm_tail_classifier import check_prefix_matches_tail

    data = SentimentNoisyDataModule(tokenizer=str(tokenizer_dir),
                                    frozen_prefix_model=str(tiny_llama_dir), tail_layers=2)  # fmt: skip
    module = SimpleNamespace(model=str(tiny_llama_dir), tail_layers=1)
    with pytest.raises(ValueError, match=r"data.tail_layers=2 but model.tail_layers=1"):
        check_prefix_matches_tail(module, data)
    module.tail_layers = 2
    check_prefix_matches_tail(module, data)  # consistent: no error
    module.model = "another-model"
    with pytest.warns(UserWarning, match="frozen_prefix_model=.* and model.model='another-model'"):
        check_prefix_matches_tail(module, data)


def test_a_head_with_fewer_outputs_than_classes_is_refused_at_setup(
    tiny_llama_dir, tokenizer_dir, tmp_path
):
    data = SentimentNoisyDataModule(
        tokenizer=str(tokenizer_dir), n_train=12, n_val=4, frozen_prefix_model=None
    )
    module = LoRATailClassifier(model=str(tiny_llama_dir), tail_layers=1, num_classes=1)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"LoRATailClassifier num_classes=1 .* has 2 classes"):
        trainer.fit(module, data)
    assert trainer.global_step == 0


def test_a_model_without_llama_style_decoder_parts_is_named():
    from modules.llm_tail_classifier import llama_style_decoder

    gpt2 = build_causal_lm("tiny-gpt2", vocab_size=64)
    with pytest.raises(ValueError, match=r"'tiny-gpt2' \(model_type 'gpt2'\) is not a Llama-style"):
        llama_style_decoder(gpt2, "tiny-gpt2")
