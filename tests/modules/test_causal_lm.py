import copy
import json

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from datamodules.text import TextDataModule
from modules.causal_lm import CausalLMModule, LoraSettings


def _trainer(tmp_path, steps, **kwargs):
    return L.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def datamodule(corpus_file, tokenizer_dir):
    dm = TextDataModule(
        data_files=str(corpus_file), tokenizer=str(tokenizer_dir), block_size=32, batch_size=4
    )
    dm.setup("fit")
    return dm


def test_loss_is_next_token_cross_entropy(tokenizer_dir):
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    ids = torch.randint(0, 4096, (2, 16))
    out = module.model(input_ids=ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 4096), ids[:, 1:].reshape(-1)
    )
    assert torch.allclose(out.loss, manual, atol=1e-5)
    labels = ids.clone()
    labels[:, :8] = -100  # masked prompt tokens do not count
    masked = module.model(input_ids=ids, labels=labels).loss
    manual_masked = torch.nn.functional.cross_entropy(
        out.logits[:, 7:-1].reshape(-1, 4096), ids[:, 8:].reshape(-1)
    )
    assert torch.allclose(masked, manual_masked, atol=1e-5)


def test_weight_decay_groups(tokenizer_dir):
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    decay, no_decay = module.parameter_groups()
    assert all(p.ndim >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert any(p is module.model.model.embed_tokens.weight for p in no_decay["params"])
    names = dict(module.named_parameters())
    for group in (decay, no_decay):  # names travel with the groups (LionAR selects by name)
        assert len(group["param_names"]) == len(group["params"])
        assert all(
            names[n] is p for n, p in zip(group["param_names"], group["params"], strict=True)
        )


def test_lionar_gets_the_block_matrices_and_refuses_gpt2_conv1d(tokenizer_dir):
    from functools import partial

    from optim.lion import LionAR

    module = CausalLMModule(
        "micro-llama", tokenizer=str(tokenizer_dir), optimizer=partial(LionAR, lr=0.1)
    )
    opt = module.configure_optimizers()
    rotating = [n for g in opt.param_groups if g["rotational"] for n in g["param_names"]]
    assert rotating and all(".layers." in n and n.endswith(".weight") for n in rotating)
    gpt2 = CausalLMModule(
        "tiny-gpt2", tokenizer=str(tokenizer_dir), optimizer=partial(LionAR, lr=0.1)
    )
    with pytest.raises(ValueError, match="Conv1D"):
        gpt2.configure_optimizers()


def test_lora_trains_only_adapters_and_exports_for_peft(tmp_path, tokenizer_dir, datamodule):
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True)
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir), lora=lora)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {n: p.clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainer = _trainer(tmp_path, 3)
    trainer.fit(module, datamodule)
    for n, p in module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n
    assert any(module.get_parameter(n).abs().sum() > 0 for n in trainable if "lora_B" in n)

    ckpt_path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert set(ckpt["state_dict"]) == set(trainable) and ckpt["trainable_only"]
    torch.manual_seed(1234)  # rebuild the same random base, as a seeded resume does
    restored = CausalLMModule.load_from_checkpoint(
        ckpt_path, model="micro-llama", tokenizer=str(tokenizer_dir), lora=lora
    )
    for n in trainable:
        assert torch.equal(restored.get_parameter(n), module.get_parameter(n))

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    copy.deepcopy(module.model).unload().save_pretrained(
        base_dir
    )  # the frozen base, adapters removed
    module.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    ids = torch.randint(0, 4096, (1, 12))
    module.eval()
    with torch.no_grad():
        assert torch.allclose(
            plain(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-5
        )

    merged_dir = module.save_pretrained(tmp_path / "merged", merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


def test_training_lowers_validation_perplexity(tmp_path, tokenizer_dir, datamodule):
    torch.manual_seed(0)
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir),
                            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))  # fmt: skip
    trainer = _trainer(tmp_path, 40)
    before = trainer.validate(module, datamodule, verbose=False)[0]["val/ppl"]
    trainer.fit(module, datamodule)
    after = trainer.validate(module, datamodule, verbose=False)[0]["val/ppl"]
    assert after < 0.5 * before, (before, after)
