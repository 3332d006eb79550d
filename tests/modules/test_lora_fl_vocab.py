"""FederatedLoRAModule refuses data ids of another vocabulary than the model's (at setup and
on resume), whatever the architecture names its embedding."""

from __future__ import annotations

import shutil

import pytest
import torch

from datamodules.federated import CharVocab, _HFVocab
from modules.hf_models import build_causal_lm, special_token_ids
from modules.lora_fl import FederatedLoRAModule
from modules.lora_fl_vocab import check_checkpoint_vocabulary, check_data_vocabulary
from tests.federated_testkit import NO_MEM, tiny_dm, tiny_trainer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_dir):
    """A tiny pretrained Llama on the project tokenizer's 4096 ids, saved without and with
    that tokenizer."""
    bare = tmp_path_factory.mktemp("bare_llama")
    torch.manual_seed(0)
    build_causal_lm("micro-llama", vocab_size=4096).save_pretrained(bare)
    with_tokenizer = tmp_path_factory.mktemp("llama_with_tokenizer")
    shutil.copytree(bare, with_tokenizer, dirs_exist_ok=True)
    shutil.copytree(tokenizer_dir, with_tokenizer, dirs_exist_ok=True)
    return bare, with_tokenizer


def test_a_model_with_its_own_tokenizer_needs_the_same_vocabulary_in_the_data(model_dirs,
                                                                              tokenizer_dir):  # fmt: skip
    _, own = model_dirs
    net = build_causal_lm(str(own))
    with pytest.raises(ValueError, match=r"ships its own tokenizer .* character vocabulary.*"
                                         r"set data.tokenizer"):  # fmt: skip
        check_data_vocabulary(str(own), net, CharVocab())
    check_data_vocabulary(str(own), net, _HFVocab(str(tokenizer_dir)))  # the same vocabulary


def test_a_model_without_a_tokenizer_needs_room_for_the_datas_ids(model_dirs, tokenizer_dir):
    bare, _ = model_dirs
    net = build_causal_lm(str(bare))
    check_data_vocabulary(str(bare), net, _HFVocab(str(tokenizer_dir)))  # 4096 = 4096
    # More rows than ids: padded embeddings are legitimate, another vocabulary is not.
    with pytest.warns(UserWarning, match=r"embeds 4096 tokens and the data's vocabulary has 98"):
        check_data_vocabulary(str(bare), net, CharVocab())
    small = build_causal_lm("micro-llama", vocab_size=64)
    with pytest.raises(ValueError, match=r"embeds 64 tokens, but .* has 98.*vocab_size >= 98"):
        check_data_vocabulary("micro-llama", small, CharVocab())
    # A random-init preset with room to spare (e.g. vocab_size: 128) is fine, silently, when
    # built with the data's special token ids...
    ids = special_token_ids(CharVocab())
    roomy = build_causal_lm("micro-llama", vocab_size=128, special_ids=ids)
    check_data_vocabulary("micro-llama", roomy, CharVocab())
    # ...and warned about with the preset's own (the project tokenizer's: eos 0, pad 1).
    with pytest.warns(
        UserWarning, match=r"built with .*'pad_token_id': 1.* has .*vocab_size: null"
    ):
        check_data_vocabulary(
            "micro-llama", build_causal_lm("micro-llama", vocab_size=128), CharVocab()
        )


def test_a_preset_built_at_setup_takes_the_datas_special_tokens():
    """EOS of the character vocabulary (1) is a trained input row, not the padding row (the
    preset's pad id 1 made it one: zero at init, no input gradient), and the exported config
    names the data's EOS and PAD."""
    module = FederatedLoRAModule(model="micro-llama", finetune_mode="full", local_steps=1,
                                 memorization=NO_MEM)  # fmt: skip
    tiny_trainer(1).fit(module, tiny_dm())
    config, embedding = module.net.config, module.net.get_input_embeddings()
    assert (config.eos_token_id, config.pad_token_id, embedding.padding_idx) == (1, 0, 0)
    assert embedding.weight[1].norm() > 0


def test_setup_refuses_data_ids_past_a_pretrained_models_embedding(tmp_path):
    torch.manual_seed(0)
    build_causal_lm("micro-llama", vocab_size=64).save_pretrained(tmp_path / "small_llama")
    module = FederatedLoRAModule(model=str(tmp_path / "small_llama"), local_steps=1,
                                 memorization=NO_MEM)  # fmt: skip
    with pytest.raises(ValueError, match=r"embeds 64 tokens.*set data\.tokenizer"):
        tiny_trainer(1).fit(module, tiny_dm())  # the 98 character ids do not fit


@pytest.mark.parametrize(("preset", "key"), [("micro-llama", "net.model.embed_tokens.weight"),
                                             ("tiny-gpt2", "net.transformer.wte.weight")])  # fmt: skip
def test_resuming_with_another_vocabulary_is_named_for_every_architecture(preset, key):
    net = build_causal_lm(preset, vocab_size=98)
    width = net.get_input_embeddings().weight.shape[1]
    with pytest.raises(ValueError, match=r"vocabulary of 4096 tokens, this run's data gives 98"):
        check_checkpoint_vocabulary({key: torch.zeros(4096, width)}, net)
    check_checkpoint_vocabulary({key: torch.zeros(98, width)}, net)  # the same size


def test_load_from_checkpoint_rebuilds_the_network_with_the_datas_tokens(tmp_path):
    """Outside a fit the network (sized from the data at setup) did not exist: every weight was
    an unexpected key; built from the preset with vocab_size set, it named the preset's EOS."""
    module = FederatedLoRAModule(model="micro-llama", finetune_mode="full", local_steps=1,
                                 memorization=NO_MEM)  # fmt: skip
    trainer = tiny_trainer(1)
    trainer.fit(module, tiny_dm())
    trainer.save_checkpoint(tmp_path / "fl.ckpt")
    for kwargs in ({}, {"vocab_size": len(CharVocab())}):
        loaded = FederatedLoRAModule.load_from_checkpoint(tmp_path / "fl.ckpt", **kwargs)
        config = loaded.net.config
        assert (config.eos_token_id, config.pad_token_id) == (1, 0)
        assert torch.equal(loaded.flat_server_state(), module.flat_server_state())
