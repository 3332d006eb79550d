"""ExportPretrained: LoRA exports (merged or adapter) reload to the trained model. The FSDP
exports (one and two processes) are tested in tests/strategies/test_fsdp_cpu.py."""

import json

import lightning as L
import pytest
import torch
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from callbacks.export import ExportPretrained
from modules.causal_lm import CausalLMModule, LoraSettings
from modules.hf_models import build_causal_lm


def _fit_lora_with_export(tmp_path, tokenizer_dir, merge_lora):
    """Two AdamW steps of a LoRA micro-llama (adapters move off zero) with ExportPretrained."""
    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    module = CausalLMModule(
        "micro-llama", tokenizer=str(tokenizer_dir), lora=lora,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )  # fmt: skip
    ids = torch.randint(0, 4096, (4, 16))
    batches = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[ExportPretrained(merge_lora=merge_lora)],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=batches)
    # The export leaves the module's adapters in place (a merge in place would leave it unable
    # to load its own checkpoints), and training moved them off zero: they change the model.
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 4 and all(p.abs().sum() > 0 for p in lora_b)
    return module.eval(), tmp_path / "hf_model"  # logger=False: the log dir is default_root_dir


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.usefixtures("one_thread")
def test_merge_lora_export_is_a_plain_model_with_the_trained_adapters(tmp_path, tokenizer_dir):
    module, out = _fit_lora_with_export(tmp_path, tokenizer_dir, merge_lora=True)
    assert (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists() and not (out / "base").exists()
    assert json.loads((out / "mlo_export.json").read_text())["lora_adapter_only"] is False
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not isinstance(merged, PeftModel)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.randint(0, 4096, (2, 12))
    expected = _logits(module.model, ids)
    torch.testing.assert_close(_logits(merged, ids), expected)
    # The adapters count: the base alone gives other logits.
    assert not torch.allclose(_logits(module.base_model_copy().eval(), ids), expected, atol=1e-3)


@pytest.mark.usefixtures("one_thread")
def test_default_export_of_a_lora_model_is_the_adapter_with_its_base(tmp_path, tokenizer_dir):
    module, out = _fit_lora_with_export(tmp_path, tokenizer_dir, merge_lora=False)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4
    # A random-init base is written next to the adapter, which points at it.
    assert adapter_config["base_model_name_or_path"] == str((out / "base").resolve())
    assert json.loads((out / "mlo_export.json").read_text())["lora_adapter_only"] is True
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    reloaded = PeftModel.from_pretrained(base, out).eval()
    ids = torch.randint(0, 4096, (2, 12))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(module.model, ids))


@pytest.mark.usefixtures("one_thread")
def test_an_adapter_export_named_as_model_is_the_adapted_model(tmp_path, tokenizer_dir):
    """``model: <run>/hf_model`` of a LoRA run loads merged into its bundled base, even moved
    elsewhere: transformers loaded it with the adapter frozen (no trainable weight for a new
    fit), and layer-parallel fusion read the base weights without it."""
    module, out = _fit_lora_with_export(tmp_path, tokenizer_dir, merge_lora=False)
    moved = tmp_path / "moved"
    out.rename(moved)  # the adapter config's absolute base path no longer exists
    net = build_causal_lm(str(moved)).eval()
    assert not any("lora" in name for name, _ in net.named_parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in net.parameters())
    ids = torch.randint(0, 4096, (2, 12))
    torch.testing.assert_close(_logits(net, ids), _logits(module.model, ids))


def test_stored_half_precision_weights_load_as_float32(tmp_path):
    # transformers 5 loads the stored dtype: a float16 export fine-tuned again trained float16
    # weights (AdamW's eps rounds to 0 there: NaN from the second step on).
    build_causal_lm("micro-llama").to(torch.float16).save_pretrained(tmp_path / "half")
    assert build_causal_lm(str(tmp_path / "half")).dtype == torch.float32
    assert build_causal_lm(str(tmp_path / "half"), dtype="float16").dtype == torch.float16


def test_float16_trainable_weights_are_refused_for_training(tmp_path, tokenizer_dir):
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir), dtype="float16")
    ids = torch.randint(0, 4096, (2, 8))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="trainable weights are float16"):
        trainer.fit(module, DataLoader([{"input_ids": r, "labels": r} for r in ids]))


def test_a_module_without_save_pretrained_is_refused_before_fit(tmp_path):
    class NoExport(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            raise AssertionError("training must not start")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=tmp_path, callbacks=[ExportPretrained()],
    )  # fmt: skip
    with pytest.raises(TypeError, match="NoExport has no save_pretrained"):
        trainer.fit(NoExport(), train_dataloaders=DataLoader(torch.zeros(4, 2), batch_size=2))


@pytest.mark.usefixtures("one_thread")
def test_exporting_a_diverged_model_warns(tmp_path, tokenizer_dir):
    module = CausalLMModule(
        "micro-llama", tokenizer=str(tokenizer_dir),
        optimizer=lambda params: torch.optim.SGD(params, lr=float("nan")),  # NaN weights
    )  # fmt: skip
    ids = torch.randint(0, 4096, (2, 16))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[ExportPretrained()],
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"holds non-finite weights \(\d+ entries of model\."):
        trainer.fit(module, DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=2))
    assert (tmp_path / "hf_model" / "config.json").is_file()  # exported all the same
