"""HyperINFCallback inside a real Trainer: files, logging, validate trigger, DDP (spec V4, 7.13)."""

from __future__ import annotations

import json

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from callbacks.hyperinf import HyperINFCallback
from datamodules.noisy_labels import NoisyLabelDataModule
from modules.sequence_classifier import LoRAClassifier
from ops.influence_config import GradConfig

METHODS = ["hyperinf", "exact_gfim", "datainf", "grad_dot"]
INCLUDE = ["lora_A", "lora_B", "head.weight"]


# One intra-op thread (tests/conftest.py): threads oversubscribe a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(**kw) -> NoisyLabelDataModule:
    return NoisyLabelDataModule(n_train=60, n_val=20, d_in=8, batch_size=20, seed=0, **kw)


def _model() -> LoRAClassifier:
    return LoRAClassifier(in_features=8, hidden_size=16, lora_r=2, init_seed=0, lr=1e-2)


def _callback(out, run_on: str = "fit_end", **kw) -> HyperINFCallback:
    return HyperINFCallback(
        methods=METHODS,
        include=INCLUDE,
        grads=GradConfig(batch_size=16),
        run_on=run_on,
        output_dir=str(out),
        **kw,
    )


def _trainer(tmp_path, callback, logger=None, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=logger if logger is not None else CSVLogger(tmp_path),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **kw,
    )


def test_fit_end_writes_aligned_table_and_metrics(tmp_path) -> None:
    dm = _data()
    cb = _callback(tmp_path / "inf")
    trainer = _trainer(tmp_path, cb)
    trainer.fit(_model(), dm)
    table = pd.read_csv(tmp_path / "inf" / "influence.csv")
    assert len(table) == 60
    assert table["index"].tolist() == list(range(60))
    assert table["sample_id"].tolist() == dm.train_dataset.sample_id.tolist()
    assert table["is_noisy"].tolist() == dm.noisy_mask.tolist()
    for m in METHODS:
        assert table[f"score_{m}"].notna().all()
    assert (table["score_hyperinf"] - table["score_exact_gfim"]).abs().max() < 1e-3 * (
        table["score_exact_gfim"].abs().max()
    )
    summary = json.loads((tmp_path / "inf" / "influence_summary.json").read_text())
    assert summary["n_train"] == 60 and 0.0 <= summary["metrics"]["influence/hyperinf/auc"] <= 1.0
    logged = pd.read_csv(trainer.logger.log_dir + "/metrics.csv")
    assert "influence/hyperinf/auc" in logged.columns
    assert "influence/datainf/score_mean" in logged.columns
    assert trainer.lightning_module.training  # train/eval flag restored


def test_parquet_and_tensorboard_histograms(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = _callback(tmp_path / "inf", output_format="parquet")
    trainer = _trainer(tmp_path, cb, logger=TensorBoardLogger(tmp_path, name="tb"))
    trainer.fit(_model(), _data())
    assert len(pd.read_parquet(tmp_path / "inf" / "influence.parquet")) == 60
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0, "tensors": 0})
    acc.Reload()
    assert "influence/hyperinf/scores" in acc.Tags()["histograms"]
    assert "influence/hyperinf/auc" in acc.Tags()["scalars"]
    assert any("top_bottom" in t for t in acc.Tags()["tensors"])


def test_standalone_validate_computes_with_noise_file(tmp_path) -> None:
    dm = _data()
    dm.setup("fit")
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps(torch.nonzero(dm.noisy_mask).flatten().tolist()))
    cb = _callback(tmp_path / "inf", run_on="validate", noise_index_path=str(noise))
    trainer = _trainer(tmp_path, cb)
    model = _model()
    trainer.fit(model, dm)  # fit's validation loops must not trigger it
    assert not (tmp_path / "inf").exists()
    trainer.validate(model, dm)  # runs under inference_mode: the engine must re-enable grad
    table = pd.read_csv(tmp_path / "inf" / "influence.csv")
    assert table["is_noisy"].sum() == int(dm.noisy_mask.sum())
    assert cb.result is not None and cb.result.scores["hyperinf"].shape == (60,)


def test_bad_configuration_fails_before_training(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown influence method"):
        HyperINFCallback(methods=["tracin"])
    with pytest.raises(ValueError, match="run_on"):
        HyperINFCallback(run_on="epoch_end")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="output_format"):
        HyperINFCallback(output_format="xlsx")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="per_sample_loss"):
        _callback(tmp_path).compute(_trainer(tmp_path, _callback(tmp_path)), L.LightningModule())


def _ddp_scores(tmp_path, devices: int, strategy: str) -> pd.DataFrame:
    out = tmp_path / f"inf_{devices}"
    cb = _callback(out, run_on="validate")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = _model()
    with torch.no_grad():  # non-zero lora_B so every tensor has gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    trainer.validate(model, _data())
    return pd.read_csv(out / "influence.csv")


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_sharded_scores_equal_single_process(tmp_path) -> None:
    single = _ddp_scores(tmp_path, 1, "auto")
    ddp = _ddp_scores(tmp_path, 2, "ddp_spawn")
    assert ddp["index"].tolist() == list(range(60))
    for m in METHODS:
        torch.testing.assert_close(
            torch.tensor(ddp[f"score_{m}"].values),
            torch.tensor(single[f"score_{m}"].values),
            rtol=1e-4,
            atol=1e-6,
        )


def test_causal_lm_module_via_dataloader_fallback(tmp_path, tokenizer_dir, corpus_file) -> None:
    # the shared CausalLMModule has no per_sample_loss and TextDataModule no train_dataset:
    # loss_fn + the datamodule's own loaders (dataset + collate_fn) make it work unchanged
    from datamodules.text import TextDataModule
    from modules.causal_lm import CausalLMModule, LoraSettings

    short = [ln for ln in corpus_file.read_text().splitlines() if len(ln) < 1500]
    lines = short[:6]  # ~50 training blocks of 32 tokens
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines) + "\n")
    dm = TextDataModule(
        data_files=str(small),
        tokenizer=str(tokenizer_dir),
        block_size=32,
        batch_size=4,
        val_fraction=0.2,
        test_fraction=0.0,
    )
    model = CausalLMModule(
        model="micro-llama",
        tokenizer=str(tokenizer_dir),
        lora=LoraSettings(r=2, alpha=4.0, target_modules=["q_proj", "v_proj"]),
    )
    cb = HyperINFCallback(
        methods=["hyperinf", "exact_gfim", "grad_dot"],
        include=["lora_A", "lora_B"],
        loss_fn="ops.per_sample_grads.causal_lm_per_sample_loss",
        grads=GradConfig(batch_size=8),
        run_on="fit_end",
        output_dir=str(tmp_path / "inf"),
    )
    trainer = _trainer(tmp_path, cb, max_steps=3, limit_val_batches=0)
    trainer.fit(model, dm)
    table = pd.read_csv(tmp_path / "inf" / "influence.csv")
    assert table["index"].tolist() == list(range(len(dm.splits["train"])))
    torch.testing.assert_close(
        torch.tensor(table["score_hyperinf"].values),
        torch.tensor(table["score_exact_gfim"].values),
        rtol=1e-2,
        atol=1e-3 * float(table["score_exact_gfim"].abs().max()),
    )
