import json
import warnings

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from datamodules.text import TextDataModule, load_tokenizer
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


def test_loss_is_token_mean_next_token_cross_entropy_of_the_labels(tokenizer_dir, monkeypatch):
    """compute_loss and training_step: logits at t predict labels[t + 1]; -100 labels do not
    count; the mean is over the batch's counted tokens (rows with more tokens weigh more)."""
    torch.manual_seed(0)
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    vocab = module.model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 16))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt of 4 tokens in row 0, of 11 in row 1
    labels[1, :11] = -100
    labels[0, 9] = -100  # and a masked token inside row 0's targets
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        logits = module.model(input_ids=ids).logits.float()
    # By hand: per-token negative log-likelihood of the shifted labels, then the token mean.
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    counted = targets != -100
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = nll[counted].sum() / counted.sum()
    row_means = torch.stack([nll[r][counted[r]].mean() for r in range(2)]).mean()
    assert not torch.isclose(expected, row_means, rtol=1e-3)  # the reductions are told apart
    assert counted.sum(dim=1).tolist() == [11, 5]  # labels 4..15 but 9; labels 11..15
    with torch.no_grad():
        loss = module.compute_loss(batch)
        torch.testing.assert_close(loss, expected)

        logged = {}
        monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.update({name: value}))
        returned = module.training_step(batch, 0)
    torch.testing.assert_close(returned, expected)
    torch.testing.assert_close(logged["train/loss"], expected)


def test_weight_decay_groups(tokenizer_dir):
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    decay, no_decay = module.parameter_groups()
    # named: LearningRateMonitor logs lr-AdamW/decay and lr-AdamW/no_decay, not pg1 and pg2
    assert (decay["name"], no_decay["name"]) == ("decay", "no_decay")
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

    # A random-init base cannot be rebuilt under another seed: its checkpoints are full.
    ckpt_path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert set(trainable) < set(ckpt["state_dict"]) and not ckpt.get("trainable_only")
    torch.manual_seed(7)  # another seed: the base still comes back from the checkpoint
    restored = CausalLMModule.load_from_checkpoint(
        ckpt_path, model="micro-llama", tokenizer=str(tokenizer_dir), lora=lora
    )
    for n, p in module.named_parameters():
        assert torch.equal(restored.get_parameter(n), p), n

    # The adapter export carries its random base in ``base/`` and points its config at it.
    adapter_dir = module.save_pretrained(tmp_path / "adapter")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4
    assert adapter_config["base_model_name_or_path"] == str((adapter_dir / "base").resolve())
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    plain = PeftModel.from_pretrained(base, adapter_dir)
    ids = torch.randint(0, 4096, (1, 12))
    module.eval()
    with torch.no_grad():
        assert torch.allclose(
            plain(input_ids=ids).logits, module.model(input_ids=ids).logits, atol=1e-5
        )

    merged_dir = module.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert not (merged_dir / "base").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)


def test_full_model_export_reloads_with_transformers(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir)).eval()
    with torch.no_grad():  # weights no fresh initialization would draw
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = module.save_pretrained(tmp_path / "full")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(module.model)
    ids = torch.randint(0, 4096, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits
        )
    assert load_tokenizer(str(out)).get_vocab() == module.tokenizer.get_vocab()
    exported = json.loads((out / "mlo_export.json").read_text())
    assert exported["lora_adapter_only"] is False and exported["lora"] is None
    assert not (out / "adapter_config.json").exists() and not (out / "base").exists()


def test_training_lowers_validation_perplexity(tmp_path, tokenizer_dir, datamodule):
    torch.manual_seed(0)
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir),
                            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))  # fmt: skip
    trainer = _trainer(tmp_path, 40)
    before = trainer.validate(module, datamodule, verbose=False)[0]["val/ppl"]
    trainer.fit(module, datamodule)
    after = trainer.validate(module, datamodule, verbose=False)[0]["val/ppl"]
    assert after < 0.5 * before, (before, after)


def test_fp16_true_training_is_refused_but_evaluation_runs(tmp_path, tokenizer_dir, datamodule):
    # fp16 AdamW states: eps=1e-8 is 0 in fp16, and the loss was NaN from step 2 on (exit 0)
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    trainer = _trainer(tmp_path, 3, precision="16-true")
    with pytest.raises(ValueError, match=r"precision='16-true' trains fp16 weights .*bf16-mixed"):
        trainer.fit(module, datamodule)
    assert trainer.global_step == 0
    (metrics,) = _trainer(tmp_path, 1, precision="16-true").validate(module, datamodule)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_bf16_true_training_warns_that_small_updates_round_away(
    tmp_path, tokenizer_dir, datamodule
):
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    gains = {n: p.clone() for n, p in module.named_parameters() if n.endswith("layernorm.weight")}
    with pytest.warns(UserWarning, match=r"precision='bf16-true' keeps the weights .*'bf16-mixed'"):
        _trainer(tmp_path, 3, precision="bf16-true").fit(module, datamodule)
    # what the warning is about: the norm gains (1.0) did not move in bfloat16
    assert all(torch.equal(p.float(), gains[n]) for n, p in module.named_parameters() if n in gains)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*bf16-true")
        _trainer(tmp_path, 1, precision="bf16-true").validate(module, datamodule)
        _trainer(tmp_path, 1, precision="bf16-mixed").fit(module, datamodule)


def test_lora_on_pretrained_weights_checkpoints_only_the_adapter(tmp_path, tokenizer_dir):
    pretrained = tmp_path / "pretrained"
    source = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir)).eval()
    source.save_pretrained(pretrained)
    lora = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}  # as LightningCLI passes it
    module = CausalLMModule(str(pretrained), lora=lora)  # tokenizer: the model's own
    ids = torch.randint(0, 4096, (2, 12))
    with torch.no_grad():  # the base is the saved model (new adapters start as the identity)
        torch.testing.assert_close(
            module.model.eval()(input_ids=ids).logits, source.model(input_ids=ids).logits
        )
    assert module.tokenizer.get_vocab() == load_tokenizer(str(tokenizer_dir)).get_vocab()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    state = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(state)
    assert set(state["state_dict"]) == trainable and state["trainable_only"]
    exported = json.loads(
        (module.save_pretrained(tmp_path / "out") / "mlo_export.json").read_text()
    )
    assert exported["lora"]["r"] == 4 and exported["base_model_dir"] is None


def test_a_tokenizer_other_than_the_pretrained_models_own_is_refused(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    pretrained = tmp_path / "pretrained"
    CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir)).save_pretrained(pretrained)
    other = tmp_path / "other_tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="different vocabulary"):
        CausalLMModule(str(pretrained), tokenizer=str(other))


def test_config_dict_models_take_special_ids_from_the_tokenizer(tokenizer_dir):
    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}  # fmt: skip
    module = CausalLMModule(config, tokenizer=str(tokenizer_dir))
    tok = module.tokenizer
    assert module.model.config.eos_token_id == tok.eos_token_id
    assert module.model.config.pad_token_id == tok.pad_token_id


def test_older_adapter_only_checkpoint_of_a_random_base_loads_with_a_warning(
    tmp_path, tokenizer_dir
):
    """Such checkpoints predate full checkpoints for random bases: the base is re-seeded."""
    torch.manual_seed(0)
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir), lora=LoraSettings(r=4))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    path = tmp_path / "old_adapter_only.ckpt"
    torch.save(
        {
            "state_dict": {k: v for k, v in module.state_dict().items() if k in trainable},
            "trainable_only": True,
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    with pytest.warns(UserWarning, match="base weights were never saved"):
        restored = CausalLMModule.load_from_checkpoint(path, weights_only=False)
    for name in trainable:
        assert torch.equal(restored.get_parameter(name), module.get_parameter(name))


def test_lora_targets_that_name_no_layer_list_the_models_layers():
    from modules.causal_lm import check_lora_targets
    from modules.hf_models import build_causal_lm

    gpt2 = build_causal_lm("tiny-gpt2", vocab_size=64)
    with pytest.raises(ValueError, match=r"\['q_proj'\] name no linear layer.*'c_attn'"):
        check_lora_targets(gpt2, ["c_attn", "q_proj"])
    check_lora_targets(gpt2, ["c_attn", "attn.c_proj"])  # peft also takes a dotted suffix
    check_lora_targets(gpt2, "all-linear")


def test_predict_is_refused_on_several_fsdp_processes_only(tokenizer_dir):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    fsdp = FSDPStrategy.__new__(FSDPStrategy)  # only its type is read
    module._trainer = SimpleNamespace(strategy=fsdp, world_size=2)
    # every FSDP forward is a collective; ranks generate for different numbers of prompts
    with pytest.raises(RuntimeError, match="mlo predict does not run under multi-process FSDP"):
        module.on_predict_start()
    module._trainer = SimpleNamespace(strategy=fsdp, world_size=1)
    module.on_predict_start()


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_half_precision_evaluation_sums_its_metrics_in_float32(
    tmp_path, tokenizer_dir, corpus_file, precision
):
    # Lightning casts metric states to the half type: fp16 sums overflowed to inf past 65504
    # (val/loss=inf) and bf16 sums kept 8 bits (val/loss 8.125 for 8.104)
    dm = TextDataModule(
        data_files=str(corpus_file),
        tokenizer=str(tokenizer_dir),
        block_size=128,
        batch_size=16,
        val_fraction=0.2,
    )
    torch.manual_seed(0)
    module = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    settings = dict(accelerator="cpu", limit_val_batches=5, logger=False, enable_progress_bar=False)
    (metrics,) = L.Trainer(precision=precision, **settings).validate(module, dm, verbose=False)
    # the same (half-representable) weights in a float32 module: only the forward's rounding
    # differs (module.float() would leave the metric states half: torchmetrics skips them)
    reference = CausalLMModule("micro-llama", tokenizer=str(tokenizer_dir))
    reference.load_state_dict(module.state_dict())
    (exact,) = L.Trainer(**settings).validate(reference, dm, verbose=False)
    assert metrics["val/loss"] == pytest.approx(exact["val/loss"], rel=1e-4)
    assert metrics["val/ppl"] == pytest.approx(exact["val/ppl"], rel=1e-3)
